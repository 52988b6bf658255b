"""Read what a run folder holds: ``metrics.jsonl``, ``dynamic_loading.json``, the export summary, results.

Every piece is optional; a missing or unreadable one is recorded in ``Run.notes`` and left empty, so
a report of a half-finished run still renders. A metric logged twice at one step (a resumed run that
re-ran its end-of-fit hooks) keeps its last value.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"
DYNAMIC_LOADING_FILE = "dynamic_loading.json"
EXPORT_SUMMARY = "shearing_export.json"


@dataclass
class Series:
    """One metric over training: steps ascending, one value per step."""

    steps: list[int]
    values: list[float]

    def last(self) -> tuple[int, float]:
        return self.steps[-1], self.values[-1]


@dataclass
class Run:
    name: str
    path: Path
    metrics: dict[str, Series] = field(default_factory=dict)
    dynamic_loading: dict[str, Any] | None = None
    export: dict[str, Any] | None = None
    export_path: Path | None = None
    results: list[tuple[Path, dict[str, Any]]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def series(self, name: str) -> Series | None:
        return self.metrics.get(name)

    def names_with_prefix(self, prefix: str) -> list[str]:
        """The ``<x>`` of every metric named ``prefix<x>``, sorted."""
        return sorted(n[len(prefix) :] for n in self.metrics if n.startswith(prefix))

    def last_step(self) -> int | None:
        steps = [s.steps[-1] for s in self.metrics.values() if s.steps]
        return max(steps) if steps else None


def read_metrics(path: Path) -> tuple[dict[str, Series], int]:
    """``metrics.jsonl`` as one ``Series`` per numeric metric; returns (series, unreadable line count)."""
    by_name: dict[str, dict[int, float]] = {}
    bad = 0
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                step = int(record["step"])
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            for name, value in record.items():
                if name != "step" and isinstance(value, int | float) and not isinstance(value, bool):
                    by_name.setdefault(name, {})[step] = float(value)
    series = {}
    for name, points in by_name.items():
        steps = sorted(points)
        series[name] = Series(steps, [points[s] for s in steps])
    return series, bad


def _read_json(path: Path, run: Run) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        run.notes.append(f"could not read {path.name}: {e}")
        return None


def find_export_summary(root: Path) -> Path | None:
    """``root/hf/shearing_export.json``, else ``root/shearing_export.json``, else the first one below."""
    for candidate in (root / "hf" / EXPORT_SUMMARY, root / EXPORT_SUMMARY):
        if candidate.is_file():
            return candidate
    found = sorted(root.rglob(EXPORT_SUMMARY), key=lambda p: (len(p.parts), str(p)))
    return found[0] if found else None


def find_results(root: Path) -> list[Path]:
    """Every ``*results*.json`` in the run folder (any depth), shallowest first."""
    found = [p for p in root.rglob("*results*.json") if p.is_file()]
    return sorted(found, key=lambda p: (len(p.parts), str(p)))


def load_run(path: str | Path, name: str | None = None) -> Run:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"run folder {root} does not exist (or is not a folder)")
    run = Run(name=name or root.resolve().name, path=root)
    metrics_path = root / METRICS_FILE
    if metrics_path.is_file():
        run.metrics, bad = read_metrics(metrics_path)
        if bad:
            run.notes.append(f"{METRICS_FILE}: skipped {bad} unreadable lines")
    else:
        run.notes.append(f"no {METRICS_FILE} (log with the metrics_file logger)")
    dl_path = root / DYNAMIC_LOADING_FILE
    if dl_path.is_file():
        data = _read_json(dl_path, run)
        if isinstance(data, dict) and isinstance(data.get("history"), list):
            run.dynamic_loading = data
        elif data is not None:
            run.notes.append(f"{DYNAMIC_LOADING_FILE} has no history list; ignored")
    export_path = find_export_summary(root)
    if export_path is not None:
        data = _read_json(export_path, run)
        if isinstance(data, dict) and "source" in data and "target" in data:
            run.export, run.export_path = data, export_path
    for results_path in find_results(root):
        data = _read_json(results_path, run)
        if isinstance(data, dict) and any(k in data for k in ("domains", "tasks", "speed", "average_loss")):
            run.results.append((results_path, data))
    return run


def load_runs(paths: list[str | Path]) -> list[Run]:
    """Load every run; names are the folder names, made unique with the parent folder when they clash."""
    roots = [Path(p) for p in paths]
    names = [r.resolve().name for r in roots]
    unique = [n if names.count(n) == 1 else f"{r.resolve().parent.name}/{n}" for n, r in zip(names, roots)]
    seen: dict[str, int] = {}
    for i, n in enumerate(unique):
        seen[n] = seen.get(n, 0) + 1
        if unique.count(n) > 1:
            unique[i] = f"{n} ({seen[n]})"
    return [load_run(r, n) for r, n in zip(roots, unique)]
