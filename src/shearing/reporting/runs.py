"""Read what a run folder holds: ``metrics.jsonl``, ``dynamic_loading.json``, the export summary, results.

Besides run folders, the report takes export folders (``shearing_export.json`` at the top, e.g.
``out/sheared-2.7b-pruned``) and results files (any ``.json`` from ``shearing.evaluate``, recognised by
its keys) from anywhere, because the documented pipeline writes them outside the run folder
(``load_inputs``). An export is an entry of its own, ``NAME (export)``: its summary does not say which
run it came from, so guessing would be wrong as often as right. Results files inside an export folder
(``shearing.evaluate --output EXPORT/results.json``) are found as a run folder's are. A results file given
on the command line is attached to the entry whose folder holds the model it evaluated (its ``model``
field), else it is its own entry. A folder given as a run that holds nothing the report reads (no run
logs, record, checkpoint, export or results) is an error naming it, not an empty report.

Every piece is optional; a missing or unreadable one is recorded in ``Run.notes`` and left empty, so
a report of a half-finished run still renders. A metric logged twice at one step (a resumed run that
re-ran its end-of-fit hooks) keeps its last value.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from shearing.folders import DYNAMIC_LOADING_STEM, EXPORT_SUMMARY, LATEST_CHECKPOINT, METRICS_FILE, RUN_RECORD

log = logging.getLogger(__name__)

DYNAMIC_LOADING_FILE = f"{DYNAMIC_LOADING_STEM}.json"
# What a training save_folder holds, besides an export and results: its logs, its run record, checkpoints.
RUN_MARKERS = (METRICS_FILE, DYNAMIC_LOADING_FILE, RUN_RECORD, LATEST_CHECKPOINT)


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
    kind: str = "run"  # "run" (a training save_folder), "export" (an export folder), "results" (files only)

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
    _add_results_below(run, root)
    return run


def _add_results_below(run: Run, root: Path) -> None:
    """Attach every results file under ``root`` (``find_results``) to ``run``."""
    for results_path in find_results(root):
        data = _read_json(results_path, run)
        if is_results(data):
            run.results.append((results_path, data))


def holds_report_input(root: Path) -> bool:
    """Whether a folder holds anything the report reads: run logs or record, checkpoints, an export
    summary or results files (at any depth for the last two)."""
    if any((root / name).exists() for name in RUN_MARKERS) or any(root.glob("*.pt")):
        return True
    return find_export_summary(root) is not None or bool(find_results(root))


def check_holds_report_input(root: Path) -> None:
    """``ValueError`` naming ``root`` and what the report expects when it holds none of it."""
    if holds_report_input(root):
        return
    entries = sorted(p.name for p in root.iterdir())
    held = (
        "it is empty"
        if not entries
        else "it holds "
        + ", ".join(entries[:10])
        + (f", ... ({len(entries)} entries)" if len(entries) > 10 else "")
    )
    raise ValueError(
        f"{root} holds no run, export or results ({held}). The report reads a training save_folder "
        f"({', '.join(RUN_MARKERS)} or *.pt checkpoints), an export folder ({EXPORT_SUMMARY}, from python -m "
        "shearing.export) or results files (*results*.json, from python -m shearing.evaluate): give one of those"
    )


RESULTS_KEYS = ("domains", "tasks", "speed", "average_loss")


def is_results(data: Any) -> bool:
    """Whether a parsed JSON file is a ``shearing.evaluate`` results file (by its keys)."""
    return isinstance(data, dict) and any(k in data for k in RESULTS_KEYS)


def is_export_dir(path: Path) -> bool:
    """An export folder holds ``shearing_export.json`` at its top (``shearing.export``)."""
    return path.is_dir() and (path / EXPORT_SUMMARY).is_file()


def read_results_file(path: str | Path, option: str = "results file") -> dict[str, Any]:
    """A results file's mapping; ``ValueError`` naming the file when it is not one."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{option} {path} does not exist (or is not a file)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ValueError(
            f"{option} {path} is not readable JSON ({e}): give a file written by shearing.evaluate"
        ) from None
    if not is_results(data):
        keys = sorted(data) if isinstance(data, dict) else type(data).__name__
        raise ValueError(
            f"{option} {path} is not a shearing.evaluate results file: it has {keys}, none of "
            f"{', '.join(RESULTS_KEYS)}; give the --output of python -m shearing.evaluate"
        )
    return data


def load_export(path: str | Path, name: str | None = None) -> Run:
    """An export folder as a report entry of its own (kind ``export``): shapes, counts, kept structure."""
    root = Path(path)
    if not is_export_dir(root):
        raise ValueError(
            f"export folder {root} has no {EXPORT_SUMMARY}: give the --output folder of python -m "
            "shearing.export (or a run folder as a positional argument)"
        )
    run = Run(name=name or f"{root.resolve().name} (export)", path=root, kind="export")
    data = _read_json(root / EXPORT_SUMMARY, run)
    if isinstance(data, dict) and "source" in data and "target" in data:
        run.export, run.export_path = data, root / EXPORT_SUMMARY
    else:
        run.notes.append(f"{EXPORT_SUMMARY} has no source/target shapes; ignored")
    if data and data.get("checkpoint"):
        run.notes.append(f"exported from {data['checkpoint']}")
    _add_results_below(run, root)  # e.g. shearing.evaluate --output EXPORT/results.json
    return run


def _model_paths(result: dict[str, Any], results_path: Path) -> list[Path]:
    """Where a results file's ``model`` may be: as written (relative to the working folder) or relative
    to the results file; existing paths first."""
    model = result.get("model")
    if not model:
        return []
    raw = Path(str(model))
    candidates = [raw] if raw.is_absolute() else [Path.cwd() / raw, results_path.parent / raw]
    existing = [c.resolve() for c in candidates if c.exists()]
    return existing or [Path(os.path.normpath(c)) for c in candidates]


def attach_results(entries: list[Run], results_path: Path, result: dict[str, Any]) -> Run | None:
    """The entry whose folder holds the results' ``model`` (the deepest one: an export inside a run
    folder wins over the run); it gets the results appended. ``None`` when no entry holds it."""
    best, depth = None, -1
    for model in _model_paths(result, results_path):
        for entry in entries:
            root = entry.path.resolve()
            if (model == root or root in model.parents) and len(root.parts) > depth:
                best, depth = entry, len(root.parts)
    if best is not None:
        best.results.append((results_path, result))
    return best


def load_inputs(
    paths: list[str | Path], exports: list[str | Path] = (), results: list[str | Path] = ()
) -> list[Run]:
    """Report entries from command-line inputs. ``paths`` may mix run folders, export folders (holding
    ``shearing_export.json``) and results files (``.json`` from ``shearing.evaluate``); ``exports`` and
    ``results`` name them explicitly. Run folders and exports become entries (exports labelled
    ``NAME (export)``); each results file outside them is attached to the entry holding its ``model``
    (``runs/cpt/hf`` -> the run ``runs/cpt``; ``out/x`` -> the export ``out/x``), else it becomes an entry
    of its own, ``FILE (results)``; results files inside an export folder are its own without being named.
    Bad inputs raise before anything is read or written, a folder that holds nothing the report reads
    included (``check_holds_report_input``)."""
    run_dirs: list[Path] = []
    export_dirs = [Path(p) for p in exports]
    results_files = [Path(p) for p in results]
    for raw in paths:
        p = Path(raw)
        if p.is_file():
            results_files.append(p)
        elif is_export_dir(p):
            export_dirs.append(p)
        elif p.is_dir():
            check_holds_report_input(p)
            run_dirs.append(p)
        else:
            raise FileNotFoundError(f"run folder {p} does not exist (or is not a folder)")
    parsed = [
        (p, read_results_file(p, "--results" if p in map(Path, results) else "results file"))
        for p in results_files
    ]
    for p in export_dirs:
        if not is_export_dir(p):
            load_export(p)  # raises the message naming the fix
    runs = load_runs(run_dirs) if run_dirs else []
    known_exports = {r.export_path.resolve() for r in runs if r.export_path}
    entries = list(runs)
    for p in export_dirs:
        if (p / EXPORT_SUMMARY).resolve() not in known_exports:
            entries.append(load_export(p))
            known_exports.add((p / EXPORT_SUMMARY).resolve())
    known_results = {path.resolve() for entry in entries for path, _ in entry.results}
    for path, data in parsed:
        if path.resolve() in known_results:
            continue
        known_results.add(path.resolve())
        if attach_results(entries, path, data) is None:
            entries.append(
                Run(name=f"{path.name} (results)", path=path.parent, results=[(path, data)], kind="results")
            )
    _unique_names(entries)
    return entries


def _unique_names(entries: list[Run]) -> None:
    seen: dict[str, int] = {}
    names = [e.name for e in entries]
    for entry in entries:
        if names.count(entry.name) > 1:
            seen[entry.name] = seen.get(entry.name, 0) + 1
            entry.name = f"{entry.name} ({seen[entry.name]})"


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
