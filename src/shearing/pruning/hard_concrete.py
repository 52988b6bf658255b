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
INIT_MEAN = 5.0
INIT_STD = 0.01

# beta * log(-l / r): keep probability is sigmoid(log_alpha - KEEP_SHIFT) = sigmoid(log_alpha + 1.5986).
KEEP_SHIFT = TEMPERATURE * math.log(-LIMIT_LEFT / LIMIT_RIGHT)


def sample_gates(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """One differentiable hard-concrete draw per element of ``log_alpha``."""
    u = torch.empty_like(log_alpha, dtype=torch.float32).uniform_(EPS, 1.0 - EPS, generator=generator)
    s = torch.sigmoid((torch.log(u) - torch.log1p(-u) + log_alpha.float()) / TEMPERATURE)
    return (s * (LIMIT_RIGHT - LIMIT_LEFT) + LIMIT_LEFT).clamp(0.0, 1.0)


def keep_probability(log_alpha: torch.Tensor) -> torch.Tensor:
    """P(z > 0): the expected 'score' of each unit (differentiable)."""
    return torch.sigmoid(log_alpha.float() - KEEP_SHIFT)


def soft_value(log_alpha: torch.Tensor) -> torch.Tensor:
    """The value a unit keeps in deterministic masks."""
    return torch.sigmoid(log_alpha.float() / TEMPERATURE * DETERMINISTIC_SCALE)


def init_log_alpha(log_alpha: torch.Tensor, generator: torch.Generator | None = None) -> None:
    """log_alpha ~ Normal(5, 0.01): every mask starts 'on' (it is clamped to ln 100 on first use)."""
    with torch.no_grad():
        log_alpha.normal_(INIT_MEAN, INIT_STD, generator=generator)


def clamp_log_alpha_(log_alpha: torch.Tensor) -> None:
    """Keep log_alpha in [ln 0.01, ln 100], in place, as the reference does before every use."""
    with torch.no_grad():
        log_alpha.clamp_(LOG_ALPHA_MIN, LOG_ALPHA_MAX)


def topk_mask(values: torch.Tensor, num_zeros: torch.Tensor | int) -> torch.Tensor:
    """Zero the ``num_zeros`` smallest entries of each row of ``values`` (last axis), keep the rest.

    ``num_zeros`` is an int or a tensor with one count per row. Ties break by index (stable sort),
    so the result is deterministic on every rank.
    """
    rows = values.reshape(-1, values.shape[-1])
    zeros = torch.as_tensor(num_zeros, device=values.device).reshape(-1).expand(rows.shape[0])
    order = torch.argsort(rows, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(rows.shape[-1], device=values.device).expand_as(order))
    keep = rank >= zeros[:, None]
    return (rows * keep).reshape(values.shape)
