"""Report section with the export gate's verdict and numbers for every export in the report.

The export's own ``shearing_export.md`` and model card say when an export failed the convergence gate
and was forced past it; a report over runs and exports must say it too, next to the numbers it shows
for that model. From the ``gate`` record of ``shearing_export.json`` (``shearing.pruning.gate``): the
verdict (passed / FAILED and forced), per mask family the expected sparsity against the target and how
decided the masks are (mean keep probability of the kept and of the dropped units, the mean mask value
folded into the kept units), the eval loss under expected and final masks (or why it was not measured),
the thresholds, and every failed check. A record written before a field existed shows "–" for it.
"""

from __future__ import annotations

from typing import Any

from shearing.reporting.document import Section, Table, Text, fmt
from shearing.reporting.figures import FigureWriter
from shearing.reporting.runs import Run

TITLE = "Export gate"


def gate_verdict(export: dict[str, Any] | None) -> str:
    """One cell for the runs table: ``passed``, ``FAILED, forced``, ``no gate (not pruned)`` or ``–``."""
    if not export:
        return "–"
    gate = export.get("gate")
    if gate is None:
        return "no gate (not pruned)" if not export.get("pruned") else "not recorded"
    if gate.get("passed"):
        return "passed"
    return "FAILED, forced" if gate.get("forced") else "FAILED"


def _family_rows(gate: dict[str, Any]) -> list[list[str]]:
    rows = []
    for name, entry in gate.get("families", {}).items():
        expected, target = entry.get("expected_sparsity"), entry.get("target_sparsity")
        gap = abs(expected - target) if expected is not None and target is not None else None
        rows.append(
            [
                name,
                fmt(expected),
                fmt(target),
                fmt(gap),
                fmt(entry.get("kept_keep_probability")),
                fmt(entry.get("dropped_keep_probability")),
                fmt(entry.get("kept_mask_value")),
            ]
        )
    return rows


def _loss_line(gate: dict[str, Any]) -> str:
    loss, source = gate.get("eval_loss"), gate.get("eval_source")
    limit = (gate.get("thresholds") or {}).get("max_loss_gap")
    if loss is None:
        return f"Eval loss under expected vs final masks: not measured ({source or 'no eval data given'})."
    gap = loss["final_masks"] - loss["expected_masks"]
    where = f" on {source}" if source else ""
    return (
        f"Eval loss{where}: {fmt(loss['expected_masks'])} under expected masks, {fmt(loss['final_masks'])} "
        f"under final masks, gap {gap:+.4f} (max_loss_gap {fmt(limit)})."
    )


def _thresholds_line(gate: dict[str, Any]) -> str:
    th = gate.get("thresholds") or {}
    return "Thresholds: " + ", ".join(f"{k} {fmt(v)}" for k, v in th.items()) + "."


def export_gate(runs: list[Run], out: FigureWriter) -> Section:
    section = Section(TITLE)
    data = [run for run in runs if run.export]
    if not data:
        section.blocks.append(Text("No export summary (shearing_export.json): no export gate to show."))
        return section
    for run in data:
        gate = run.export.get("gate")
        where = f"{run.name} ({run.export_path})"
        if gate is None:
            what = "not a pruning run" if not run.export.get("pruned") else "no gate recorded in the summary"
            section.blocks.append(Text(f"{where}: no convergence gate ({what})."))
            continue
        verdict = gate_verdict(run.export)
        if gate.get("forced"):
            verdict += " (exported anyway: --force / export.force)"
        batch = run.export.get("checkpoint_batch")
        at = f", checkpoint trained to batch {batch:,}" if isinstance(batch, int) else ""
        section.blocks.append(Text(f"{where}: gate {verdict}{at}."))
        section.blocks.append(
            Table(
                [
                    "family",
                    "expected sparsity",
                    "target sparsity",
                    "gap",
                    "keep prob. (kept units)",
                    "keep prob. (dropped units)",
                    "mask value (kept units)",
                ],
                _family_rows(gate),
                caption=f"{run.name}: sparsity and decidedness per mask family",
            )
        )
        section.blocks.append(Text(_loss_line(gate)))
        section.blocks.append(Text(_thresholds_line(gate)))
        failures = gate.get("failures") or []
        section.blocks.append(
            Text(f"{run.name}: {len(failures) or 'no'} failed check(s)" + (":" if failures else "."))
        )
        section.blocks += [Text(f"- {failure}") for failure in failures]
    return section
