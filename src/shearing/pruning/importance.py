"""One-shot activation importance: scores for every mask family, and mask logits that start from them.

Shape legend: B batch, T sequence, N tokens (B·T), D hidden, L layers, H query heads, G KV groups,
g = H / G heads per group, K head_dim, F MLP width.

``activation_importance(model, batches)`` runs the unmasked source forward only (no gradients) over a
few hundred calibration sequences (``calibration_batches``: the prepared train split, spread over the
domains by the run's initial proportions) with hooks on ``MaskedLlamaForCausalLM``, and returns one
score tensor per mask family (larger = more important). Every score is what the unit *adds to the
residual stream*, so a unit whose output weights are zero scores 0 whatever its activations:

=============  =======  =========================================================================
family         shape    score
=============  =======  =========================================================================
head           [L, H]   RMS over tokens of the head's output ``W_o[:, h] · ctx_h`` (``o_proj`` input)
kv_group       [L, G]   RMS of the summed output of the group's g heads (cross terms included)
intermediate   [L, F]   RMS of the channel's activation (``down_proj`` input) × ``‖W_down[:, f]‖``
hidden         [D]      RMS of the residual channel, each of the L+1 stream positions (embedding
                        output, every layer's output) normalised by its mean square over channels
                        first, so late layers' larger stream does not outvote the early ones
layer          [L]      mean over tokens of 1 - cos(layer input, layer output): a layer that barely
                        turns the stream is unimportant
head_layer     [L]      1 - cos(x, x + attention output) (the CoFi-style pair's attention block)
mlp            [L]      1 - cos(x + attention, layer output) (its MLP block)
=============  =======  =========================================================================

Sums are accumulated in fp32 (on CUDA the forward runs under bf16 autocast, the hooks upcast), so
memory is O(L·H + L·F + L·D) plus one chunk of per-head outputs (``_CHUNK_ELEMENTS``), never O(tokens).
The forward stops at the LM head (a pre-hook raises), so no logits are made.

Log-alpha from importance (``importance_log_alphas``)
-----------------------------------------------------
Per row (per block of ``group`` units for a grouped ``head`` family, over the groups for
``kv_group``), units are ranked by score and spread linearly in rank over the family's band
(``IMPORTANCE_BANDS``): [4.0, 4.4] for gates that touch the whole network (``hidden``, ``layer``,
``head_layer``, ``mlp``), [3.0, 4.4] for the within-layer families (``head``, ``kv_group``,
``intermediate``). Ties in score go to the lower index (ranked lower, as ``topk_mask`` breaks ties).
Why (``hard_concrete`` constants; SmolLM2-135M to a 24-layer / 448-hidden / 2-KV-group target, 64
calibration sequences of 128 tokens, eval on 16 sequences, unmasked eval loss 3.405):

- no logit at a clamp edge: the constant init sits at ln 100 = 4.605, where 95% of sampled gates are
  exactly 1 (no loss gradient reaches those draws) and dp/dlog_alpha = 0.002. The top of every band
  (4.4) is below the edge; at 3.0 the gate is exactly 1 in 80% of draws and p(1-p) = 0.010 (5x).
- start loss (sampled masks at step 0, mean of two draws): constant 3.71; these bands 3.95; one band
  [2, 4] for every family 5.20, [0, 4] 7.49. Gate noise on residual channels compounds through every
  layer: with [2, 4] on ``hidden`` alone the loss is 4.53, on ``layer`` alone 4.05, on
  ``intermediate`` alone 3.82, on ``kv_group`` alone 3.84, hence the narrow band for the
  whole-network gates. The deterministic (expected-count) masks at step 0 cost nothing: 3.413 against
  constant 3.410.
- ordering: the map is strictly monotone in rank, so the final top-k at step 0 keeps exactly the most
  important units, and until training reorders two units importance decides between them (the
  constant init leaves that to 0.01-sized noise). Units that later reach the same clamped value tie
  again and ``topk_mask`` breaks those by index.

Expected sparsity at the start is 0.3% (whole-network families) and 0.55% (within-layer) against 0.2%
for the constant init; the Lagrangian target ramps from 0, so this is a negligible head start.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from shearing.pruning import hard_concrete as hc

# Per family: (least important, most important) logit of a row; ln 100 = 4.605 is the clamp edge. Gates
# that touch the whole network (a residual channel, a whole layer or block) get the narrow top band.
WHOLE_NETWORK_BAND = (4.0, 4.4)
WITHIN_LAYER_BAND = (3.0, 4.4)
IMPORTANCE_BANDS = {
    "hidden": WHOLE_NETWORK_BAND,
    "layer": WHOLE_NETWORK_BAND,
    "head_layer": WHOLE_NETWORK_BAND,
    "mlp": WHOLE_NETWORK_BAND,
    "head": WITHIN_LAYER_BAND,
    "kv_group": WITHIN_LAYER_BAND,
    "intermediate": WITHIN_LAYER_BAND,
}
SCORE_NAMES = ("hidden", "head", "kv_group", "intermediate", "layer", "head_layer", "mlp")
_CHUNK_ELEMENTS = 1 << 24  # per-head outputs computed at once in the o_proj hook (64 MB of fp32)


class _StopForward(Exception):
    """Raised by the LM-head pre-hook: the scores are complete once the last layer has run."""


# ---------------------------------------------------------------------------------------------------
# Calibration data


def calibration_batches(
    data_local: str | os.PathLike,
    num_sequences: int,
    seq_len: int,
    batch_size: int,
    seed: int = 17,
    domains: Sequence[str] | None = None,
    proportions: Sequence[float] | Mapping[str, float] | None = None,
) -> list[torch.Tensor]:
    """``num_sequences`` train sequences as LongTensors [B, seq_len] (the last batch may be smaller).

    Domains and proportions default to the mixture loader's: the manifest's domains, each by its share of
    the train tokens. Each domain's count is its largest-remainder share; a domain with fewer sequences
    than its share gives them all and the rest go to the others. Sequences are drawn without
    replacement (seeded), truncated to ``seq_len`` when the data was packed longer, and shuffled across
    domains. Fewer train sequences than asked for is a ``ValueError``.
    """
    from shearing.data.mixture import validate_proportions
    from shearing.data.shards import _domain_list, _open_domains, _split_root

    if int(num_sequences) != num_sequences or num_sequences <= 0:
        raise ValueError(f"pruning.calibration_sequences must be a positive integer, got {num_sequences}")
    if int(batch_size) != batch_size or batch_size <= 0:
        raise ValueError(f"calibration batch size must be a positive integer, got {batch_size}")
    root, split, manifest = _split_root(data_local, "train")
    names = _domain_list(manifest, domains)
    if seq_len > manifest.seq_len:
        raise ValueError(
            f"calibration sequences of {seq_len} tokens asked for, but the data at {root} was packed into "
            f"{manifest.seq_len}-token sequences: set max_seq_len to {manifest.seq_len} or re-run data prep"
        )
    available = np.asarray([getattr(manifest.domains[d], split).sequences for d in names], dtype=np.int64)
    if available.sum() < num_sequences:
        raise ValueError(
            f"pruning.calibration_sequences={num_sequences} but the {split} split at {root} holds only "
            f"{int(available.sum())} sequences in domains {names}: lower pruning.calibration_sequences"
        )
    if proportions is None:
        shares = manifest.token_proportions(split)
        total = sum(shares[d] for d in names)
        proportions = [shares[d] / total for d in names]
    counts = _allocate(num_sequences, np.asarray(validate_proportions(proportions, names)), available)
    rng = np.random.default_rng(seed)
    rows = []
    for shards, count in zip(_open_domains(root, split, manifest, names), counts):
        if count:
            ids = np.sort(rng.choice(shards.num_samples, size=int(count), replace=False))
            rows.append(shards.read(ids)[:, :seq_len].astype(np.int64))
    tokens = torch.from_numpy(np.concatenate(rows)[rng.permutation(num_sequences)])
    return list(torch.split(tokens, int(batch_size)))


def _allocate(n: int, proportions: np.ndarray, available: np.ndarray) -> np.ndarray:
    """Largest-remainder split of n by ``proportions``, capped by ``available`` (sum(available) >= n)."""
    counts = np.zeros(len(proportions), dtype=np.int64)
    open_ = available > 0
    while counts.sum() < n:
        left = n - int(counts.sum())
        weights = np.where(open_, proportions, 0.0)
        if weights.sum() <= 0:  # the proportions name only full domains: spread over the rest evenly
            weights = open_.astype(np.float64)
        ideal = left * weights / weights.sum()
        extra = np.floor(ideal).astype(np.int64)
        order = np.argsort(-(ideal - extra), kind="stable")
        extra[order[: left - int(extra.sum())]] += 1
        counts = np.minimum(counts + extra, available)
        open_ = counts < available
    return counts


# ---------------------------------------------------------------------------------------------------
# Scores


class _Accumulator:
    """Running sums of the hooks (fp32 reductions per batch, added up in fp64); ``scores()`` makes the scores."""

    def __init__(self, model: torch.nn.Module, device: torch.device):
        cfg = model.config
        L, D = cfg.num_hidden_layers, cfg.hidden_size
        self.H, self.G = cfg.num_attention_heads, cfg.num_key_value_heads
        self.K = model.model.layers[0].self_attn.head_dim
        zeros = lambda *shape: torch.zeros(*shape, dtype=torch.float64, device=device)  # noqa: E731
        self.head_sq, self.group_sq = zeros(L, self.H), zeros(L, self.G)
        self.inter_sq = zeros(L, cfg.intermediate_size)
        self.stream_sq = zeros(L + 1, D)  # per stream position: sum over tokens of x_d^2
        self.turn = {name: zeros(L) for name in ("layer", "head_layer", "mlp")}  # sums of 1 - cos
        self.tokens = 0
        self._x: torch.Tensor | None = None  # the current layer's input
        self._attn: torch.Tensor | None = None  # its attention output

    @staticmethod
    def _flat(t: torch.Tensor) -> torch.Tensor:
        return t.detach().reshape(-1, t.shape[-1]).float()

    def layer_input(self, i: int, x: torch.Tensor) -> None:
        self._x = self._flat(x)
        if i == 0:
            self.tokens += self._x.shape[0]
            self.stream_sq[0] += self._x.pow(2).sum(0).double()

    def attention_output(self, attn: torch.Tensor) -> None:
        self._attn = self._flat(attn)

    def layer_output(self, i: int, y: torch.Tensor) -> None:
        y = self._flat(y)
        x, mid = self._x, self._x + self._attn
        self.stream_sq[i + 1] += y.pow(2).sum(0).double()
        for name, (a, b) in {"layer": (x, y), "head_layer": (x, mid), "mlp": (mid, y)}.items():
            self.turn[name][i] += (1.0 - F.cosine_similarity(a, b, dim=-1, eps=1e-12)).sum().double()
        self._x = self._attn = None

    def head_outputs(self, i: int, ctx: torch.Tensor, o_weight: torch.Tensor) -> None:
        """Squared norms of every head's and every group's contribution ``W_o[:, head] · ctx_head``."""
        g, K = self.H // self.G, self.K
        ctx = self._flat(ctx).view(-1, self.G, g, K)  # N G g K
        w = o_weight.detach().float().view(-1, self.G, g, K)  # D G g K
        rows = max(1, _CHUNK_ELEMENTS // (g * w.shape[0]))
        for j in range(self.G):
            for start in range(0, ctx.shape[0], rows):
                out = torch.einsum("ngk,dgk->ngd", ctx[start : start + rows, j], w[:, j])  # n g D
                self.head_sq[i, j * g : (j + 1) * g] += out.pow(2).sum((0, 2)).double()
                self.group_sq[i, j] += out.sum(1).pow(2).sum().double()

    def mlp_activations(self, i: int, h: torch.Tensor) -> None:
        self.inter_sq[i] += self._flat(h).pow(2).sum(0).double()

    def scores(self, model: torch.nn.Module) -> dict[str, torch.Tensor]:
        if self.tokens == 0:
            raise ValueError("activation_importance got no calibration batches")
        n = float(self.tokens)
        down_norms = torch.stack(
            [layer.mlp.down_proj.weight.detach().float().norm(dim=0) for layer in model.model.layers]
        ).double()
        stream = self.stream_sq / self.stream_sq.mean(-1, keepdim=True).clamp_min(1e-30)
        out = {
            "hidden": stream.mean(0).sqrt(),
            "head": (self.head_sq / n).sqrt(),
            "kv_group": (self.group_sq / n).sqrt(),
            "intermediate": (self.inter_sq / n).sqrt() * down_norms,
            **{name: total / n for name, total in self.turn.items()},
        }
        return {name: value.float().cpu() for name, value in out.items()}


def _first_arg(args: tuple, kwargs: dict) -> torch.Tensor:
    return args[0] if args else next(iter(kwargs.values()))


def _install_hooks(model: torch.nn.Module, acc: _Accumulator) -> list:
    handles = []

    def add_pre(module, fn):
        handles.append(module.register_forward_pre_hook(fn, with_kwargs=True))

    def add_post(module, fn):
        handles.append(module.register_forward_hook(fn))

    for i, layer in enumerate(model.model.layers):
        attn, o_proj = layer.self_attn, layer.self_attn.o_proj
        add_pre(layer, lambda m, a, k, i=i: acc.layer_input(i, _first_arg(a, k)))
        add_post(attn, lambda m, a, out: acc.attention_output(out[0] if isinstance(out, tuple) else out))
        add_post(layer, lambda m, a, out, i=i: acc.layer_output(i, out[0] if isinstance(out, tuple) else out))
        add_pre(o_proj, lambda m, a, k, i=i, o=o_proj: acc.head_outputs(i, _first_arg(a, k), o.weight))
        add_pre(layer.mlp.down_proj, lambda m, a, k, i=i: acc.mlp_activations(i, _first_arg(a, k)))

    def stop(module, args, kwargs):
        raise _StopForward

    add_pre(model.lm_head, stop)
    return handles


@torch.no_grad()
def activation_importance(
    model: torch.nn.Module, batches: Iterable[torch.Tensor], autocast: bool | None = None
) -> dict[str, torch.Tensor]:
    """Scores of every mask family (``SCORE_NAMES``; module docstring) from unmasked forwards over ``batches``.

    ``model`` is a ``MaskedLlamaForCausalLM`` on any device; each batch is a LongTensor [B, T] moved to
    it. ``autocast`` (default: on CUDA) runs the forward under bf16 autocast; the sums stay fp32/fp64.
    Returns fp32 CPU tensors.
    """
    device = next(model.parameters()).device
    autocast = device.type == "cuda" if autocast is None else autocast
    acc = _Accumulator(model, device)
    handles = _install_hooks(model, acc)
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            if batch.ndim != 2:
                raise ValueError(
                    f"calibration batches must be [B, T] token ids, got shape {tuple(batch.shape)}"
                )
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                try:
                    model(batch.to(device=device, dtype=torch.long))
                except _StopForward:
                    pass
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return acc.scores(model)


# ---------------------------------------------------------------------------------------------------
# Mask logits from scores


def rank_in_rows(scores: torch.Tensor, group: int = 0) -> torch.Tensor:
    """Each unit's rank in its row (0 = least important) as a fraction in [0, 1]; ``group`` > 0: within
    consecutive blocks of ``group`` units. Ties in score go to the lower index (ranked lower)."""
    rows = scores.reshape(*scores.shape[:-1], -1, group) if group else scores
    n = rows.shape[-1]
    order = torch.argsort(rows, dim=-1, stable=True)
    rank = torch.empty_like(order)
    rank.scatter_(-1, order, torch.arange(n).expand_as(order).contiguous())
    fraction = rank.float() / (n - 1) if n > 1 else torch.ones_like(rank, dtype=torch.float32)
    return fraction.reshape(scores.shape)


def importance_log_alphas(
    scores: Mapping[str, torch.Tensor],
    specs: Iterable,
    bands: Mapping[str, tuple[float, float]] | None = None,
) -> dict[str, torch.Tensor]:
    """Mask logits (family name -> tensor of the family's shape) ordered by importance, each family's
    rows spread linearly in rank over its band (``IMPORTANCE_BANDS``; ``bands`` overrides entries).

    ``specs``: the run's ``FamilySpec`` values (``L0Module.specs.values()``). A grouped ``head`` family is
    ranked within each KV group, ``kv_group`` across the groups of a layer (module docstring).
    """
    bands = {**IMPORTANCE_BANDS, **(bands or {})}
    out = {}
    for spec in specs:
        low, high = bands[spec.name]
        if not hc.LOG_ALPHA_MIN < low <= high < hc.LOG_ALPHA_MAX:
            raise ValueError(
                f"importance logits of {spec.name!r} must lie strictly inside the clamp "
                f"({hc.LOG_ALPHA_MIN:.3f}, {hc.LOG_ALPHA_MAX:.3f}) with low <= high, got [{low}, {high}]"
            )
        if spec.name not in scores:
            raise ValueError(f"no importance scores for mask family {spec.name!r} (have {sorted(scores)})")
        score = torch.as_tensor(scores[spec.name]).detach().float().cpu()
        if tuple(score.shape) != tuple(spec.shape):
            raise ValueError(
                f"importance scores of {spec.name!r} have shape {tuple(score.shape)}, the mask family "
                f"{tuple(spec.shape)}: the scores come from another model"
            )
        if not bool(torch.isfinite(score).all()):
            raise ValueError(
                f"importance scores of {spec.name!r} are not finite: the calibration forward diverged"
            )
        out[spec.name] = low + (high - low) * rank_in_rows(score, spec.group)
    return out


# ---------------------------------------------------------------------------------------------------
# The run's init (``pruning.init: importance``)


def init_l0_from_importance(l0, model: torch.nn.Module, cfg) -> dict[str, torch.Tensor]:
    """Set ``l0``'s mask logits from the activation importance of ``model`` (the source, before training).

    Calibration: ``cfg.pruning.calibration_sequences`` sequences of ``max_seq_len`` tokens from the
    train loader's ``dataset.local`` (its ``domains`` / ``proportions`` if given, else the manifest's),
    seeded by ``cfg.seed``, in batches of ``device_eval_batch_size``. On a CUDA machine the forward runs
    on the current GPU under bf16 autocast and the model goes back to where it was. Every rank computes
    the same logits (same weights, same sequences); a resumed run then loads its checkpoint over them.
    Returns the logits it set.
    """
    import logging
    import time

    dataset = (cfg.train_loader or {}).get("dataset") or {}
    start = time.time()
    batches = calibration_batches(
        dataset["local"],
        cfg.pruning.calibration_sequences,
        cfg.max_seq_len,
        cfg.device_eval_batch_size,
        seed=cfg.seed,
        domains=dataset.get("domains"),
        proportions=dataset.get("proportions"),
    )
    home = next(model.parameters()).device
    device = torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else home
    scores = activation_importance(model.to(device), batches)
    model.to(home)
    values = importance_log_alphas(scores, l0.specs.values())
    l0.init_log_alphas_(values)
    logging.getLogger(__name__).info(
        "pruning.init=importance: mask logits from %d calibration sequences in %.1f s",
        cfg.pruning.calibration_sequences,
        time.time() - start,
    )
    return values


__all__ = [
    "IMPORTANCE_BANDS",
    "SCORE_NAMES",
    "activation_importance",
    "calibration_batches",
    "importance_log_alphas",
    "init_l0_from_importance",
    "rank_in_rows",
]
