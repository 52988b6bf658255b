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


def _spread_cell(stats: dict[str, Any] | None, median: Any, ratio: bool = False) -> str:
    if median is None:
        return "–"
    text = f"{median:.2f}x" if ratio else f"{median:,.1f}"
    if stats and stats.get("trials", 1) > 1:
        lo, hi = (
            (f"{stats['min']:.2f}", f"{stats['max']:.2f}")
            if ratio
            else (
                f"{stats['min']:,.1f}",
                f"{stats['max']:,.1f}",
            )
        )
        text += f" ±{stats['spread']:.0%} [{lo}–{hi}]"
    return text


def speed_rows(speeds: list[dict[str, Any]]) -> list[list[str]]:
    """Rows of the speed table: rates and speedups with their spread (``compare_speed`` results), then
    every other scalar key as it is (older results files hold only medians)."""
    rows, covered = [], set()
    for who in ("model", "baseline"):
        for phase in ("prefill", "decode"):
            key = f"{phase}_tokens_per_s"
            if any(isinstance(s.get(who), dict) and key in s[who] for s in speeds):
                rows.append(
                    [f"{who} {phase} tok/s"]
                    + [
                        _spread_cell((s.get(who) or {}).get(phase), (s.get(who) or {}).get(key))
                        for s in speeds
                    ]
                )
        covered |= {f"{who}.{p}" for p in ("prefill", "decode")}
        covered |= {
            f"{who}.{k}" for k in ("prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s")
        }
    for phase in ("prefill", "decode"):
        key = f"{phase}_speedup"
        if any(key in s for s in speeds):
            rows.append(
                [f"{phase} speedup"]
                + [_spread_cell(s.get(f"{key}_stats"), s.get(key), ratio=True) for s in speeds]
            )
        covered |= {key, f"{key}_stats"}
    if any("trials" in s for s in speeds):
        rows.append(
            ["trials per model (stopped by)"]
            + [
                f"{s['trials']} ({s.get('stopped', '?')}, {s.get('elapsed_s', 0):.0f} s)"
                if "trials" in s
                else "–"
                for s in speeds
            ]
        )
        rows.append(
            ["spread within tolerance"]
            + [
                "–"
                if "spread_ok" not in s
                else f"{'yes' if s['spread_ok'] else 'NO, see warning'} (worst {s.get('max_spread', 0):.0%}, "
                f"tolerance {s.get('tolerance', 0):.0%})"
                for s in speeds
            ]
        )
        covered |= {"trials", "stopped", "spread_ok", "warning", "max_spread", "tolerance", "elapsed_s"}
        covered |= {"min_trials", "max_seconds", "model.decode_invalid", "baseline.decode_invalid"}
    flat = [_flatten(s) for s in speeds]
    rest = list(
        dict.fromkeys(k for f in flat for k in f if not any(k == c or k.startswith(c + ".") for c in covered))
    )
    rows += [[k, *[fmt(f.get(k)) for f in flat]] for k in rest]
    return rows


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

    speeds = [r.get("speed") or {} for r in results]
    speed_keys = [] if not any(speeds) else speed_rows(speeds)
    if speed_keys:
        section.blocks.append(
            Table(
                ["speed", *labels],
                speed_keys,
                caption="Inference speed: median ±IQR/median [min–max] over the interleaved trials "
                "(speedup: model / baseline, > 1 is faster)",
            )
        )
        for label, speed in zip(labels, speeds):
            if speed.get("warning"):
                section.blocks.append(Text(f"{label}: warning: {speed['warning']}"))
    if not (domains or tasks or speed_keys):
        section.blocks.append(Text("Results files were found but hold no domains, tasks or speed entries."))
    return section
