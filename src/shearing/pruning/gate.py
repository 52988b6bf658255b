"""The export gate: never write a model that is broken, or cut by masks that have not converged.

Two kinds of checks run before an export writes anything.

Hard checks (no override): every floating tensor of the saved state, model weights and mask logits
alike, is finite. A diverged run (NaN/inf losses) leaves NaN logits, and NaN sorts so that the final
top-k keeps every unit: the "pruned" export would be the unpruned source shape full of NaN. The
export's shape must also equal the run's target exactly and its parameter count ``count_params`` of it
(checked by ``shearing.export`` after the surgery).

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

The loss half needs eval data; without it the loss is recorded as not measured and only the sparsity
half decides. Everything here is a plain function of tensors and numbers; the callers measure.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch

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

    def __post_init__(self) -> None:
        for name in ("max_sparsity_gap", "max_loss_gap"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(
                    f"export.{name} must be a non-negative number, got {value!r}: "
                    f"e.g. export.{name}={getattr(GateThresholds, name)}"
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


def family_sparsity(l0: Any) -> dict[str, dict[str, float]]:
    """Per mask family of an ``L0Module``: its expected sparsity (mean over rows) and its final target."""
    with torch.no_grad():
        expected = l0.expected_sparsity()
    return {
        name: {
            "expected_sparsity": float(expected[name].float().mean()),
            "target_sparsity": float(spec.target_sparsity),
        }
        for name, spec in l0.specs.items()
    }


def evaluate_gate(
    families: Mapping[str, Mapping[str, float]],
    eval_loss: Mapping[str, float] | None,
    thresholds: GateThresholds,
    force: bool = False,
) -> dict[str, Any]:
    """The gate record written to ``shearing_export.json``: the numbers, ``passed`` and the reasons."""
    failures = []
    for name, entry in families.items():
        gap = abs(entry["expected_sparsity"] - entry["target_sparsity"])
        if not gap <= thresholds.max_sparsity_gap:
            failures.append(
                f"{name}: expected sparsity {entry['expected_sparsity']:.4f} vs target {entry['target_sparsity']:.4f} "
                f"(gap {gap:.4f} > max_sparsity_gap {thresholds.max_sparsity_gap})"
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
        "thresholds": thresholds.to_dict(),
        "failures": failures,
    }


def describe_gate(gate: Mapping[str, Any]) -> list[str]:
    """Lines with every number of the gate, for messages and the export's markdown."""
    th = gate["thresholds"]
    lines = [
        f"{name}: expected sparsity {e['expected_sparsity']:.4f}, target {e['target_sparsity']:.4f}, "
        f"gap {abs(e['expected_sparsity'] - e['target_sparsity']):.4f} (max_sparsity_gap {th['max_sparsity_gap']})"
        for name, e in gate["families"].items()
    ]
    loss = gate["eval_loss"]
    if loss is None:
        lines.append(
            "eval loss: not measured (the loss half of the gate was skipped; "
            "the CLI measures it with --data DATA_DIR/eval)"
        )
    else:
        gap = loss["final_masks"] - loss["expected_masks"]
        lines.append(
            f"eval loss: {loss['expected_masks']:.4f} under expected masks, {loss['final_masks']:.4f} under "
            f"final masks, gap {gap:+.4f} (max_loss_gap {th['max_loss_gap']})"
        )
    return lines


def refusal_message(gate: Mapping[str, Any], step: int | None) -> str:
    at = f"batch {step}" if step is not None else "its last batch"
    body = "\n".join(f"  {line}" for line in describe_gate(gate))
    failed = "\n".join(f"  - {reason}" for reason in gate["failures"])
    return (
        f"export refused: the pruning masks of this checkpoint (trained to {at}) have not converged to the "
        f"target, so the final exact-target masks would cut a model the run never learnt to be.\n{body}\n"
        f"Failed:\n{failed}\n"
        f"Train longer (past the Lagrangian warmup, until expected sparsity meets the target), or {FORCE_HINT}."
    )


def check_gate(gate: Mapping[str, Any], step: int | None) -> None:
    """Raise ``ExportRefused`` when the gate failed and was not forced."""
    if not gate["passed"] and not gate["forced"]:
        raise ExportRefused(refusal_message(gate, step))


def combine_losses(totals: Mapping[str, Any]) -> float:
    """Token-weighted mean loss over domains from ``{domain: DomainLoss(loss, tokens)}``."""
    tokens = sum(t.tokens for t in totals.values())
    return sum(t.loss * t.tokens for t in totals.values()) / tokens if tokens else math.nan


__all__ = [
    "ExportRefused",
    "GateThresholds",
    "check_finite",
    "check_gate",
    "combine_losses",
    "describe_gate",
    "evaluate_gate",
    "family_sparsity",
    "non_finite_tensors",
    "refusal_message",
]
