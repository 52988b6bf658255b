"""One report (Markdown + self-contained HTML, PNG figures) from one or more run folders.

``build_report(run_dirs, output)`` reads each folder (``runs``), builds the sections in order
(``training``, ``pruning``, ``evaluation``) and writes ``report.md``, ``report.html`` and
``figures/*.png`` into ``output``. A section without data says so in one line; it never fails the
report. ``python -m shearing.report`` is the command line.
"""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from shearing.reporting.document import Document, Section, Table, Text, fmt, to_html, to_markdown
from shearing.reporting.evaluation import evaluation_tables
from shearing.reporting.figures import FigureWriter
from shearing.reporting.pruning import kept_structure, parameter_counts, pruning_curves
from shearing.reporting.runs import Run, load_runs
from shearing.reporting.training import loss_curves, per_domain, proportions

SECTIONS = (
    loss_curves,
    per_domain,
    proportions,
    pruning_curves,
    kept_structure,
    parameter_counts,
    evaluation_tables,
)
SECTION_TITLES = (
    "Loss curves",
    "Per-domain loss vs reference",
    "Domain proportions over time",
    "Pruning: expected sparsity and λ over time",
    "Kept structure heat map",
    "Parameter counts",
    "Evaluation tables",
)

__all__ = ["SECTION_TITLES", "build_report", "load_runs"]


def runs_section(runs: list[Run]) -> Section:
    rows = []
    for run in runs:
        metrics_file = run.path / "metrics.jsonl"
        rows.append(
            [
                run.name,
                str(run.path),
                fmt(run.last_step()),
                fmt(len(run.metrics)) if metrics_file.exists() else "–",
                "yes" if run.dynamic_loading else "–",
                str(run.export_path.relative_to(run.path)) if run.export_path else "–",
                fmt(len(run.results)),
            ]
        )
    section = Section("Runs")
    section.blocks.append(
        Table(["run", "folder", "last step", "metrics", "dynamic loading", "export", "results files"], rows)
    )
    for run in runs:
        for note in run.notes:
            section.blocks.append(Text(f"{run.name}: {note}"))
    return section


def build_report(run_dirs: list[str | Path], output: str | Path = "report") -> dict[str, Path]:
    """Write the report for ``run_dirs`` into ``output``; returns the paths of report.md/html."""
    if not run_dirs:
        raise ValueError("give at least one run folder")
    runs = load_runs(list(run_dirs))
    output = Path(output)
    output.mkdir(parents=True, exist_ok=True)
    figures = FigureWriter(output)
    for old in figures.folder.glob("*.png"):  # a re-run must not leave figures of an earlier report
        old.unlink()
    stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    doc = Document(title="Sheared LLaMA run report")
    summary = runs_section(runs)
    summary.blocks.insert(0, Text(f"Generated {stamp} from {len(runs)} run folder(s)."))
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
