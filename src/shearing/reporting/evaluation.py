"""Report section with the evaluation results found in the run folders (``*results*.json``).

Schema (written by ``shearing.evaluate``): ``{"model", "domains": {name: {"loss", "perplexity",
"tokens"}}, "average_loss", "tasks": {task: {metric: value}}, "speed": {...}}``; every key optional.
One column per results file, so several runs (or several checkpoints of one run) sit side by side.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from shearing.reporting.document import Section, Table, Text, fmt
from shearing.reporting.figures import FigureWriter
from shearing.reporting.runs import Run


def _label(run: Run, path: Path, result: dict[str, Any], clash: bool) -> str:
    model = result.get("model")
    label = f"{run.name}: {Path(str(model)).name}" if model else run.name
    if not clash:
        return label
    try:
        shown = path.relative_to(run.path).as_posix()
    except ValueError:  # a results file attached from outside the run folder
        shown = path.name
    return f"{label} ({shown})"


def _flatten(values: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(values, dict):
        return {prefix: values}
    flat: dict[str, Any] = {}
    for key, value in values.items():
        flat.update(_flatten(value, f"{prefix}.{key}" if prefix else str(key)))
    return flat


def evaluation_tables(runs: list[Run], out: FigureWriter) -> Section:
    section = Section("Evaluation tables")
    found = [(run, path, result) for run in runs for path, result in run.results]
    if not found:
        section.blocks.append(
            Text("No evaluation results (results.json / *results*.json) in any run folder.")
        )
        return section
    labels = [_label(run, path, result, False) for run, path, result in found]
    labels = [
        _label(run, path, result, labels.count(label) > 1)
        for (run, path, result), label in zip(found, labels)
    ]
    results = [result for _, _, result in found]

    domains = list(dict.fromkeys(d for r in results for d in (r.get("domains") or {})))
    if domains:
        rows = []
        for d in domains:
            row = [d]
            for r in results:
                entry = (r.get("domains") or {}).get(d) or {}
                loss, ppl = entry.get("loss"), entry.get("perplexity")
                row.append("–" if loss is None else f"{fmt(loss)} (ppl {fmt(ppl, 2)})")
            rows.append(row)
        rows.append(["average loss", *[fmt(r.get("average_loss")) for r in results]])
        tokens = [
            sum((e or {}).get("tokens") or 0 for e in (r.get("domains") or {}).values()) for r in results
        ]
        rows.append(["tokens evaluated", *[fmt(int(t)) if t else "–" for t in tokens]])
        section.blocks.append(
            Table(["domain: loss (perplexity)", *labels], rows, caption="Held-out loss per domain")
        )

    tasks = list(
        dict.fromkeys(
            (t, m)
            for r in results
            for t, metrics in (r.get("tasks") or {}).items()
            for m in _flatten(metrics)
        )
    )
    if tasks:
        rows = []
        for task, metric in tasks:
            row = [f"{task} / {metric}" if metric else task]
            for r in results:
                row.append(fmt(_flatten(((r.get("tasks") or {}).get(task)) or {}).get(metric)))
            rows.append(row)
        section.blocks.append(Table(["task / metric", *labels], rows, caption="Downstream tasks"))

    speed_keys = list(dict.fromkeys(k for r in results for k in _flatten(r.get("speed") or {})))
    if speed_keys:
        rows = [[k, *[fmt(_flatten(r.get("speed") or {}).get(k)) for r in results]] for k in speed_keys]
        section.blocks.append(Table(["speed", *labels], rows, caption="Speed"))
    if not (domains or tasks or speed_keys):
        section.blocks.append(Text("Results files were found but hold no domains, tasks or speed entries."))
    return section
