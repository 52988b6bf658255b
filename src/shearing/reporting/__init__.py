"""One report (Markdown + self-contained HTML, PNG figures) from run folders, exports and results files.

``build_report(run_dirs, output, exports, results)`` reads each input (``runs.load_inputs``), builds the
sections in order (``training``, ``pruning``, ``gate``: the export gate's verdict and numbers for every
export, ``evaluation``) and writes ``report.md``, ``report.html`` and ``figures/*.png`` into ``output``.
The runs table says for each entry whether its export passed the gate or was forced past it. A section
without data says so in one line; it never fails the report. An input folder that holds nothing the
report reads is an error (``runs.load_inputs``). ``python -m shearing.report`` is the command line.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from shearing.folders import METRICS_FILE
from shearing.reporting.document import Document, Section, Table, Text, fmt, to_html, to_markdown
from shearing.reporting.evaluation import evaluation_tables
from shearing.reporting.figures import FigureWriter
from shearing.reporting.gate import export_gate, gate_verdict
from shearing.reporting.pruning import kept_structure, parameter_counts, pruning_curves
from shearing.reporting.runs import Run, load_inputs, load_runs
from shearing.reporting.training import loss_curves, per_domain, proportions

SECTIONS = (
    loss_curves,
    per_domain,
    proportions,
    pruning_curves,
    kept_structure,
    parameter_counts,
    export_gate,
    evaluation_tables,
)
SECTION_TITLES = (
    "Loss curves",
    "Per-domain loss vs reference",
    "Domain proportions over time",
    "Pruning: expected sparsity and λ over time",
    "Kept structure heat map",
    "Parameter counts",
    "Export gate",
    "Evaluation tables",
)

__all__ = ["SECTION_TITLES", "build_report", "load_inputs", "load_runs"]


def runs_section(runs: list[Run]) -> Section:
    rows = []
    for run in runs:
        metrics_file = run.path / METRICS_FILE if run.kind == "run" else None
        rows.append(
            [
                run.name,
                run.kind,
                str(run.path),
                fmt(run.last_step()),
                fmt(len(run.metrics)) if metrics_file and metrics_file.exists() else "–",
                "yes" if run.dynamic_loading else "–",
                _shown(run.export_path, run.path) if run.export_path else "–",
                gate_verdict(run.export),
                ", ".join(_shown(path, run.path) for path, _ in run.results) or "–",
            ]
        )
    section = Section("Runs")
    section.blocks.append(
        Table(
            [
                "entry",
                "kind",
                "folder",
                "last step",
                "metrics",
                "dynamic loading",
                "export",
                "export gate",
                "results files",
            ],
            rows,
        )
    )
    for run in runs:
        for note in run.notes:
            section.blocks.append(Text(f"{run.name}: {note}"))
    return section


def _shown(path: Path, root: Path) -> str:
    """``path`` relative to ``root`` when inside it, else as given."""
    try:
        return path.relative_to(root).as_posix()
    except ValueError:
        return str(path)


def build_report(
    run_dirs: list[str | Path],
    output: str | Path = "report",
    exports: list[str | Path] = (),
    results: list[str | Path] = (),
) -> dict[str, Path]:
    """Write the report into ``output``; returns the paths of report.md/html. ``run_dirs`` may also hold
    export folders and results files (``runs.load_inputs``); ``exports``/``results`` name them explicitly."""
    if not (run_dirs or exports or results):
        raise ValueError("give at least one run folder, export folder (--export) or results file (--results)")
    runs = load_inputs(list(run_dirs), list(exports), list(results))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    figures = FigureWriter(output)
    for old in figures.folder.glob("*.png"):  # a re-run must not leave figures of an earlier report
        old.unlink()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = Document(title="Sheared LLaMA run report")
    summary = runs_section(runs)
    summary.blocks.insert(0, Text(f"Generated {stamp} from {len(runs)} input(s)."))
    doc.sections.append(summary)
    doc.sections += [build(runs, figures) for build in SECTIONS]
    md, html = output / "report.md", output / "report.html"
    _write_atomic(md, to_markdown(doc, output))
    _write_atomic(html, to_html(doc))
    return {"markdown": md, "html": html, "figures": figures.folder}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)
