"""The export gate: never write a model that is broken, or cut by masks that have not converged.

Two kinds of checks run before an export writes anything.

Hard checks (no override): every floating tensor of the saved state, model weights and mask logits
alike, is finite. A diverged run (NaN/inf losses) leaves NaN logits, and NaN sorts so that the final
top-k keeps every unit: the "pruned" export would be the unpruned source shape full of NaN. The
export's shape must also equal the run's target exactly and its parameter count ``count_params`` of it
(checked by ``shearing.export`` after the surgery), and every weight must survive the cast to the export
dtype: float16 turns |w| > 65504 into inf, so ``check_dtype_range`` runs on the cast state and names each
tensor that overflowed with its largest |value| (bfloat16 has float32's range).

The convergence gate (``--force`` / ``export.force: true`` overrides it, and the record says so). The
final masks cut exactly the target shape whatever the mask logits are; they only cut a *good* model
when training has driven the masks there. Early in a run (2-4 steps on a real model) the expected
sparsity is still ~0: the eval under expected masks is the nearly unpruned model and looks fine, while
the final top-k removes units the run never learnt to do without, and the export is worse than a
uniform cut. So the gate compares, per mask family, the expected sparsity (mean over rows of
1 - sum(p) / row size) with the target, and the eval loss under the final (exact-target) masks with
the eval loss under the expected masks; it refuses when either gap exceeds its threshold:

- ``max_sparsity_gap`` (absolute, default 0.02): converged runs end far closer (the 300-step tiny run
  within 0.005), a few-step run is off by about the whole target sparsity (0.25-0.5);
- ``max_loss_gap`` (nats, default 0.1): final minus expected loss; a final loss *below* the expected one
  always passes. Converged masks give nearly the same deterministic masks either way (the same soft
  values, and a number of zeros that differs by a unit or two).

The loss half needs eval data; without it the loss is recorded as not measured (or as skipped, with
the reason, in ``eval_source``) and only the other halves decide. Both exports measure it with
``mask_eval_losses``, the one definition: the mean token cross-entropy (``shearing.metrics.token_losses``)
over every predicted token of the batches, under the expected and then under the final masks. The CLI feeds
it the first ``--max-seqs`` sequences of each domain of ``DATA_DIR/eval``; the fit-end callback the first
``export.gate_eval_batches`` batches of the run's eval loader on every rank, summed across ranks.

Decidedness. Sparsity and loss can both pass while the masks have not decided anything: every keep
probability p = P(z > 0) sits near the target keep fraction 1 - t, so the expected sparsity equals the
target exactly, and both deterministic evaluations fold the same small soft values v (0.13-0.35 for p of
0.5-0.75) into the weights, so their losses agree too. The export of such masks is a model scaled down by
v everywhere, which the run never trained as such. So per family the gate records, over the units the
final (exact-target) masks keep and over those they drop, the mean keep probability, and the mean soft
value v the export folds into the kept units' weights (``kept_mask_value``); it refuses when

- the kept units' mean keep probability is below ``min_kept_probability`` (default 0.8), or
- the dropped units' mean keep probability is above ``max_dropped_probability`` (default 0.2).

A decided unit sits near a clamp bound of log alpha: p = 0.998 at ln 100, 0.047 at ln 0.01. Each
threshold is 0.2 from certain. Undecided masks (kept ≈ dropped ≈ 1 - t) fail at least one of the two for
any target, since no p is both ≥ 0.8 and ≤ 0.2. Measured on the 300-step ``prune_tiny`` run (converged):
kept units 0.91-0.99 per family (intermediate lowest), dropped units 0.05-0.11, kept mask values 0.82-0.96;
every family passes both from step 180 on (at 140-160 the hidden family's dropped units are at 0.21-0.22);
after 20 steps, kept 0.92-0.96 and dropped 0.89 in every family. ``make demo``'s pruning (200 steps from a
trained source) ends at kept 0.96-0.99, dropped 0.05-0.09, mask values 0.88-0.99.

Everything here is a plain function of tensors and numbers; the callers supply the model's forward and
the batches to measure on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

from shearing.metrics import token_losses

FORCE_HINT = (
    "export anyway with `python -m shearing.export --checkpoint ... --output ... --force`, "
    "or `export.force=true` in the run yaml"
)


class ExportRefused(ValueError):
    """The export would write a broken or unconverged model; the message says why and what to do."""


@dataclass(frozen=True)
class GateThresholds:
    max_sparsity_gap: float = 0.02  # |expected - target| sparsity per family, absolute
    max_loss_gap: float = 0.1  # eval loss under final masks minus under expected masks, nats
    min_kept_probability: float = 0.8  # mean keep probability of the units the final masks keep, per family
    max_dropped_probability: float = 0.2  # mean keep probability of the units they drop, per family

    def __post_init__(self) -> None:
        for name in ("max_sparsity_gap", "max_loss_gap", "min_kept_probability", "max_dropped_probability"):
            value = getattr(self, name)
            probability = name.endswith("probability")
            ok = value >= 0 and (value <= 1 or not probability) if isinstance(value, int | float) else False
            if isinstance(value, bool) or not ok:
                what = "a probability in [0, 1]" if probability else "a non-negative number"
                default = getattr(GateThresholds, name)
                raise ValueError(
                    f"export.{name} (--{name.replace('_', '-')}) must be {what}, got {value!r}: "
                    f"e.g. export.{name}={default}"
                )

    def to_dict(self) -> dict[str, float]:
        return {k: float(v) for k, v in asdict(self).items()}


def non_finite_tensors(state: Mapping[str, Any]) -> list[str]:
    """``"name (k of n values non-finite)"`` for every floating tensor of ``state`` holding NaN or inf."""
    bad = []
    for name, value in state.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            finite = torch.isfinite(value)
            if not bool(finite.all()):
                bad.append(f"{name} ({int((~finite).sum()):,} of {value.numel():,} values non-finite)")
    return bad


def check_finite(state: Mapping[str, Any], step: int | None) -> None:
    """Raise ``ExportRefused`` naming every tensor with NaN/inf (weights and mask logits alike)."""
    bad = non_finite_tensors(state)
    if not bad:
        return
    at = f"batch {step}" if step is not None else "an unknown batch"
    shown = "; ".join(bad[:12]) + (f"; and {len(bad) - 12} more" if len(bad) > 12 else "")
    raise ExportRefused(
        f"export refused: the checkpoint (trained to {at}) holds non-finite values in {len(bad)} tensor(s): "
        f"{shown}. The run diverged (check the loss and the learning rates); export an earlier checkpoint "
        "file instead (--checkpoint RUN/ep0-baN-rank0.pt). --force does not override this."
    )


def check_dtype_range(
    state: Mapping[str, torch.Tensor], cast: Mapping[str, torch.Tensor], dtype: str
) -> None:
    """Raise ``ExportRefused`` naming every tensor that the cast to ``dtype`` turned non-finite.

    ``state`` is finite (``check_finite`` ran on the checkpoint), so a non-finite value in ``cast`` is a
    weight beyond the dtype's range (float16: |w| > 65504)."""
    bad = []
    for name, value in cast.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            original = state[name]
            bad.append((name, float(original.abs().max()), int((~torch.isfinite(value)).sum())))
    if not bad:
        return
    limit = torch.finfo(cast[bad[0][0]].dtype).max
    shown = "; ".join(f"{n} (max |value| {m:.6g}, {k:,} values overflow)" for n, m, k in bad[:12])
    more = f"; and {len(bad) - 12} more" if len(bad) > 12 else ""
    raise ExportRefused(
        f"export refused: {dtype} cannot hold the model's weights: {len(bad)} tensor(s) exceed its largest "
        f"value {limit:.6g} and would be written as inf: {shown}{more}. Export with --dtype bfloat16 "
        "(float32's range, same size as float16; yaml: export.dtype=bfloat16) or float32. "
        "--force does not override this."
    )


def family_stats(l0: Any) -> dict[str, dict[str, float | None]]:
    """Per mask family of an ``L0Module``: expected sparsity (mean over rows), the final target, and how
    decided the masks are: the mean keep probability of the units the final masks keep and of those they
    drop, and the mean soft value the export folds into the kept units (see the module docstring)."""
    with torch.no_grad():
        expected = l0.expected_sparsity()
        probabilities = l0.keep_probabilities()
        final = l0.deterministic_masks(exact=True)
    stats = {}
    for name, spec in l0.specs.items():
        p, mask = probabilities[name].float(), final[f"{name}_z"].float()
        kept = mask > 0
        stats[name] = {
            "expected_sparsity": float(expected[name].float().mean()),
            "target_sparsity": float(spec.target_sparsity),
            "kept_keep_probability": _mean(p[kept]),
            "dropped_keep_probability": _mean(p[~kept]),
            "kept_mask_value": _mean(mask[kept]),
        }
    return stats


def _mean(values: torch.Tensor) -> float | None:
    return float(values.mean()) if values.numel() else None


def evaluate_gate(
    families: Mapping[str, Mapping[str, float]],
    eval_loss: Mapping[str, float] | None,
    thresholds: GateThresholds,
    force: bool = False,
    eval_source: str | None = None,
) -> dict[str, Any]:
    """The gate record written to ``shearing_export.json``: the numbers, ``passed`` and the reasons.

    ``eval_source`` says where ``eval_loss`` was measured, or why it was not (e.g. ``skipped (--no-data)``)."""
    failures = []
    for name, entry in families.items():
        gap = abs(entry["expected_sparsity"] - entry["target_sparsity"])
        if not gap <= thresholds.max_sparsity_gap:
            failures.append(
                f"{name}: expected sparsity {entry['expected_sparsity']:.4f} vs target {entry['target_sparsity']:.4f} "
                f"(gap {gap:.4f} > max_sparsity_gap {thresholds.max_sparsity_gap})"
            )
    for name, entry in families.items():
        kept, dropped = entry.get("kept_keep_probability"), entry.get("dropped_keep_probability")
        if kept is not None and not kept >= thresholds.min_kept_probability:
            failures.append(
                f"{name}: undecided masks: the units the final masks keep have a mean keep probability of "
                f"{kept:.4f} < min_kept_probability {thresholds.min_kept_probability} (their soft values, "
                f"mean {entry['kept_mask_value']:.4f}, would be folded into the weights)"
            )
        if dropped is not None and not dropped <= thresholds.max_dropped_probability:
            failures.append(
                f"{name}: undecided masks: the units the final masks drop have a mean keep probability of "
                f"{dropped:.4f} > max_dropped_probability {thresholds.max_dropped_probability}"
            )
    if eval_loss is not None:
        gap = eval_loss["final_masks"] - eval_loss["expected_masks"]
        if not gap <= thresholds.max_loss_gap:  # NaN fails too
            failures.append(
                f"eval loss {eval_loss['final_masks']:.4f} under final masks vs {eval_loss['expected_masks']:.4f} "
                f"under expected masks (gap {gap:.4f} > max_loss_gap {thresholds.max_loss_gap})"
            )
    passed = not failures
    return {
        "passed": passed,
        "forced": bool(force) and not passed,
        "families": {name: dict(entry) for name, entry in families.items()},
        "eval_loss": None if eval_loss is None else {k: float(v) for k, v in eval_loss.items()},
        "eval_source": eval_source,
        "thresholds": thresholds.to_dict(),
        "failures": failures,
    }


def describe_gate(gate: Mapping[str, Any]) -> list[str]:
    """Lines with every number of the gate, for messages, the export's markdown and the model card
    (records written before decidedness was measured lack its numbers; they are left out)."""
    th = gate["thresholds"]
    lines = []
    for name, e in gate["families"].items():
        lines.append(
            f"{name}: expected sparsity {e['expected_sparsity']:.4f}, target {e['target_sparsity']:.4f}, "
            f"gap {abs(e['expected_sparsity'] - e['target_sparsity']):.4f} (max_sparsity_gap {th['max_sparsity_gap']})"
        )
        if e.get("kept_keep_probability") is not None:
            lines.append(
                f"{name}: decidedness: mean keep probability {e['kept_keep_probability']:.4f} over kept units "
                f"(min_kept_probability {th.get('min_kept_probability')}), "
                f"{_fmt(e.get('dropped_keep_probability'))} over dropped units "
                f"(max_dropped_probability {th.get('max_dropped_probability')}); "
                f"mean mask value folded into the kept units {_fmt(e.get('kept_mask_value'))}"
            )
    loss, source = gate["eval_loss"], gate.get("eval_source")
    if loss is None:
        why = source or (
            "the loss half of the gate was skipped; the CLI measures it on the run's eval split, "
            "or with --data DATA_DIR/eval"
        )
        lines.append(f"eval loss: not measured ({why})")
    else:
        gap = loss["final_masks"] - loss["expected_masks"]
        where = f" on {source}" if source else ""
        lines.append(
            f"eval loss{where}: {loss['expected_masks']:.4f} under expected masks, {loss['final_masks']:.4f} "
            f"under final masks, gap {gap:+.4f} (max_loss_gap {th['max_loss_gap']})"
        )
    return lines


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def refusal_message(gate: Mapping[str, Any], step: int | None) -> str:
    at = f"batch {step}" if step is not None else "its last batch"
    body = "\n".join(f"  {line}" for line in describe_gate(gate))
    failed = "\n".join(f"  - {reason}" for reason in gate["failures"])
    return (
        f"export refused: the pruning masks of this checkpoint (trained to {at}) have not converged to the "
        f"target, so the final exact-target masks would cut a model the run never learnt to be.\n{body}\n"
        f"Failed:\n{failed}\n"
        "Train longer (past the Lagrangian warmup, until expected sparsity meets the target and the masks "
        f"decide: kept units' keep probabilities near 1, dropped units' near 0), or {FORCE_HINT}."
    )


def check_gate(gate: Mapping[str, Any], step: int | None) -> None:
    """Raise ``ExportRefused`` when the gate failed and was not forced."""
    if not gate["passed"] and not gate["forced"]:
        raise ExportRefused(refusal_message(gate, step))


@torch.no_grad()
def mask_eval_losses(
    forward: Callable[[Mapping[str, torch.Tensor]], torch.Tensor],
    l0: Any,
    batches: Callable[[], Iterable[Mapping[str, torch.Tensor]]],
    device: torch.device | str = "cpu",
    reduce: Callable[[torch.Tensor], Any] | None = None,
) -> dict[str, float]:
    """The loss half of the gate: ``{"expected_masks": loss, "final_masks": loss}``, each the mean token
    cross-entropy over every predicted token of ``batches()`` (the summed loss over the token count, not a
    mean of per-domain, per-batch or per-rank means; NaN without tokens, which fails the gate).

    ``forward(batch)`` returns the logits [B,T,V] of the model (in eval mode) under ``l0``'s masks; an
    ``L0Module`` in eval mode gives ``deterministic_masks(exact=l0.use_final_masks)``, which is set here for
    each half and restored. The targets are ``batch["labels"]`` (else ``input_ids``), unshifted, -100 not
    counted. The cross-entropy runs one row at a time (the float32 log-softmax of one [1,T,V] row stays
    small), each row's float32 sum added to a float64 total on ``device``; ``reduce`` (an in-place sum across
    ranks) sees the ``[summed loss, tokens]`` of each half before the division.
    """
    was_final = l0.use_final_masks
    losses = {}
    try:
        for key, final in (("expected_masks", False), ("final_masks", True)):
            l0.use_final_masks = final
            totals = torch.zeros(2, dtype=torch.float64, device=device)
            for batch in batches():
                logits = forward(batch)
                labels = batch.get("labels", batch["input_ids"])
                for row in range(labels.shape[0]):
                    token = token_losses(logits[row : row + 1], labels[row : row + 1])
                    totals[0] += token.sum.double()
                    totals[1] += token.valid.sum()
            if reduce is not None:
                reduce(totals)
            losses[key] = float(totals[0] / totals[1]) if totals[1] > 0 else math.nan
    finally:
        l0.use_final_masks = was_final
    return losses


__all__ = [
    "ExportRefused",
    "GateThresholds",
    "check_dtype_range",
    "check_finite",
    "check_gate",
    "describe_gate",
    "evaluate_gate",
    "family_stats",
    "mask_eval_losses",
    "non_finite_tensors",
    "refusal_message",
]
