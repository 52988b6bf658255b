"""Hard-concrete gates (Louizos et al., 2018), the distribution behind every pruning mask.

A gate z in [0, 1] is a stretched, clipped binary-concrete variable with a learned logit
``log_alpha``; it is exactly 0 or exactly 1 with non-zero probability, which lets an L0-style
penalty act through gradients. Constants follow SPEC §1: stretch limits l = -0.1, r = 1.1,
temperature beta = 2/3, eps = 1e-6.

- sample (training): u ~ U(eps, 1 - eps); s = sigmoid((log u - log(1-u) + log_alpha) / beta);
  z = clamp(s (r - l) + l, 0, 1).
- keep probability: p = P(z > 0) = sigmoid(log_alpha - beta log(-l / r)) = sigmoid(log_alpha + 1.5986).
- deterministic value of a kept unit: v = sigmoid(log_alpha / beta * 0.8) (the reference code's
  "magical number" 0.8). Surviving units keep their soft value v, which is folded into the weights at
  export, so the exported model computes what the masked model computed.

The clamp to [ln 0.01, ln 100]. The reference clamps ``log_alpha`` in place before every use. That
cannot be done inside forward under FSDP: FSDP1 hands the module views of its flat parameter (an
in-place op on them is an autograd error), and under FSDP2 and multi-rank FSDP1 the forward sees an
unsharded copy, so the write never reaches the stored shard (the stored logits drift to ~17 and a
mask then needs many more steps to respond than on one rank). So the clamp has two halves:

- ``clamped(log_alpha)`` in forward: a straight-through clamp, out of place: its value is the clamped
  logit and its gradient is 1 everywhere, on the bounds and beyond them, by construction (a custom
  autograd function, not ``torch.clamp``, whose gradient at the bounds is 1 up to torch 2.11 and 0 from
  torch 2.15: with the latter a logit the post-step clamp left exactly at ln 100 or ln 0.01 would never
  receive a gradient again and its mask would freeze);
- ``clamp_log_alpha_`` after every optimizer step (``register_log_alpha_clamp`` installs it as
  an optimizer step post-hook): clamps the *local shard* in place, whatever holds it (a plain tensor,
  an FSDP1 flat-parameter view with ``use_orig_params``, an FSDP2 ``DTensor``).

Together they compute exactly the reference's math: the stored value is always in range when a
forward reads it, and the forward's gradient is that of the unclamped value (the reference clamps
``.data`` in place, outside the graph, so its logits always get their gradient).

The stretched gate's clip to [0, 1] in ``sample_gates`` passes gradient strictly inside (0, 1) only
(``hardtanh``'s rule; torch <= 2.11's ``clamp`` also passes it on the bounds). It is written out
(``torch.where`` on the open interval) rather than left to ``clamp``'s gradient at the bounds, for the
same reason. A draw lands exactly on a bound with probability ~0, so this fixes the semantics without
moving any number. Ties elsewhere are broken explicitly too: ``topk_mask`` and the one-shot ranking
sort stably (ties go by index).

Init: ``init_log_alpha`` draws ln 100 - |N(0, 0.01)|. The reference draws N(5, 0.01) and its first
clamp maps every unit to exactly ln 100 = 4.605, so its effective init is ln 100 for all units and the
noise is erased; after a short run many units are still tied and a final top-k that breaks ties by
index drops the first layers/channels. Drawing inside the range keeps the same mean start (all masks
"on", within 0.01 of ln 100) and lets the noise, not the index, break ties.
"""

from __future__ import annotations

import math

import torch

LIMIT_LEFT = -0.1
LIMIT_RIGHT = 1.1
TEMPERATURE = 2.0 / 3.0
EPS = 1e-6
DETERMINISTIC_SCALE = 0.8
LOG_ALPHA_MIN = math.log(0.01)
LOG_ALPHA_MAX = math.log(100.0)
INIT_STD = 0.01

# beta * log(-l / r): keep probability is sigmoid(log_alpha - KEEP_SHIFT) = sigmoid(log_alpha + 1.5986).
KEEP_SHIFT = TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT)


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One differentiable hard-concrete draw per element of ``log_alpha``."""
    u = torch.empty_like(log_alpha, dtype=torch.float32).uniform_(EPS, 1.0 - EPS, generator=generator)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / TEMPERATURE)
    stretched = s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT
    inside = (stretched > 0.0) & (stretched < 1.0)  # gradient on the open interval only (hardtanh's)
    return torch.where(inside, stretched, stretched.detach().clamp(0.0, 1.0))


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0): the expected 'score' of each unit (differentiable)."""
    return torch.sigmoid(log_alpha.float() - KEEP_SHIFT)


def soft_value(log_alpha: torch.Tensor) -> torch.Tensor:
    """The value a unit keeps in deterministic masks."""
    return torch.sigmoid(log_alpha.float() / TEMPERATURE * DETERMINISTIC_SCALE)


def init_log_alpha(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """log_alpha = ln 100 - |N(0, 0.01)|: every mask starts 'on', values distinct and inside the clamp.

    The reference's N(5, 0.01) becomes exactly ln 100 for every unit at its first clamp (see the module
    docstring); drawing below the upper bound keeps that start and keeps the tie-breaking noise.
    """
    with torch.no_grad():
        noise = torch.empty_like(log_alpha).normal_(0.0, INIT_STD, generator=generator)
        log_alpha.copy_(LOG_ALPHA_MAX - noise.abs())


class _StraightThroughClamp(torch.autograd.Function):
    """Forward: ``clamp(x, low, high)``; backward: the incoming gradient unchanged, for every x."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
        return x.clamp(low, high)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad, None, None


def clamped(log_alpha: torch.Tensor) -> torch.Tensor:
    """log_alpha clamped to [ln 0.01, ln 100], out of place (safe on FSDP views), with gradient 1
    everywhere, bounds and beyond included (straight-through; see the module docstring)."""
    return _StraightThroughClamp.apply(log_alpha, LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def clamp_log_alpha_(log_alpha: torch.Tensor) -> None:
    """Keep the stored log_alpha in [ln 0.01, ln 100], in place, on the local shard.

    For a plain tensor or parameter this is the whole tensor; for an FSDP2 ``DTensor`` its local shard;
    for an FSDP1 ``use_orig_params`` parameter outside forward, its view into this rank's flat shard
    (possibly empty). Call it outside forward (after the optimizer step), never on an unsharded copy.
    """
    with torch.no_grad():
        local = (log_alpha.to_local() if hasattr(log_alpha, "to_local") else log_alpha).data
        if local.numel():
            local.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def topk_mask(
    values: torch.Tensor, num_zeros: torch.Tensor | int, ranking: torch.Tensor | None = None
) -> torch.Tensor:
    """Zero the ``num_zeros`` smallest entries of each row of ``values`` (last axis), keep the rest.

    ``num_zeros`` is an int or a tensor with one count per row. ``ranking`` (same shape, default
    ``values``) decides the order: pass the logits when ``values`` are their sigmoid, which near 1 maps
    logits 1e-6 apart to the same float. Ties break by index (stable sort), so the result is
    deterministic on every rank. Non-finite entries raise ``ValueError``: a sort places NaN last, so a
    NaN unit would count as kept by sorting luck; a NaN mask logit means the run diverged.
    """
    ranking = values if ranking is None else ranking
    bad = ~(torch.isfinite(values) & torch.isfinite(ranking))
    if bool(bad.any()):
        raise ValueError(
            f"non-finite mask logits: {int(bad.sum())} of {values.numel()} mask values are NaN/inf, so which "
            "units to keep is undefined; the pruning run diverged: resume from an earlier checkpoint, or "
            "lower optimizer.mask_lr / check the loss for NaN"
        )
    rows = values.reshape(-1, values.shape[-1])
    zeros = torch.as_tensor(num_zeros, device=values.device).reshape(-1).expand(rows.shape[0])
    order = torch.argsort(ranking.reshape(rows.shape), dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(rows.shape[-1], device=values.device).expand_as(order))
    keep = rank >= zeros[:, None]
    return (rows * keep).reshape(values.shape)


def register_log_alpha_clamp(optimizer: torch.optim.Optimizer, log_alphas) -> object:
    """Clamp the stored ``log_alphas`` (an iterable of tensors, or a callable returning one) after every
    ``optimizer.step()``; returns the hook handle.

    A callable is re-evaluated at every step, so it sees the parameters FSDP installed after wrapping
    (FSDP2 replaces them with ``DTensor`` parameters of the same module).
    """
    get = log_alphas if callable(log_alphas) else (lambda: log_alphas)

    def hook(opt, args, kwargs) -> None:
        for log_alpha in get():
            clamp_log_alpha_(log_alpha)

    return optimizer.register_step_post_hook(hook)
