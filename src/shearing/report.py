"""Turn run folders into one report: ``python -m shearing.report RUN_DIR [RUN_DIR ...] --output report/``.

    python -m shearing.report runs/prune_2.7b runs/cpt_2.7b out/sheared-2.7b-pruned tasks.json -o report/
    python -m shearing.report runs/prune_2.7b --export out/sheared-2.7b-pruned --results tasks.json

Positional inputs may be run folders, export folders (holding ``shearing_export.json``, from
``shearing.export``) or results files (``.json`` from ``shearing.evaluate``); ``--export`` and
``--results`` name them explicitly (and refuse anything else). An export is its own entry,
``NAME (export)``; a results file goes to the entry whose folder holds the model it evaluated
(``"model": "runs/cpt_2.7b/hf"`` -> run ``cpt_2.7b``), else it is its own entry ``FILE (results)``.

Reads from each run folder whatever is there: ``metrics.jsonl`` (the ``metrics_file`` logger,
``shearing.composer.loggers``), ``dynamic_loading.json``, the export summary ``hf/shearing_export.json`` (or any
``*/shearing_export.json``) and evaluation results (``results.json`` / ``*results*.json``, from
``shearing.evaluate``); from an export folder, its summary and the results files inside it. Writes
``report.md``, a self-contained ``report.html`` (figures inlined) and ``figures/*.png``: loss curves,
per-domain loss against the reference, the domain mixture over time, expected sparsity and λ per mask
family, the kept-structure heat map, parameter counts, the export gate of every export (passed or
forced, per-family sparsity and decidedness, loss gap, failed checks) and evaluation tables. Runs are
overlaid in one colour each. The sections are built in ``shearing.reporting``.

Exit status 2, with one message and nothing written, for an input that is missing or holds nothing the
report reads (e.g. an empty folder, or a wrong path that happens to exist), or an ``--output`` that is a
file (``shearing.refusals``): every input is read and checked (``load_inputs``) before anything is drawn or
written. An error while drawing or writing keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from shearing.refusals import exit_on_refusal, refusing
from shearing.reporting import build_report, load_inputs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shearing.report", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "runs",
        nargs="*",
        metavar="PATH",
        help="run folders (a training save_folder), export folders or results .json files",
    )
    parser.add_argument(
        "--export",
        action="append",
        default=[],
        metavar="DIR",
        help="an export folder (holds shearing_export.json); repeatable",
    )
    parser.add_argument(
        "--results",
        action="append",
        default=[],
        metavar="FILE",
        help="a results .json written by shearing.evaluate; repeatable",
    )
    parser.add_argument(
        "--output", "-o", default="report", help="folder to write the report into (default: ./report)"
    )
    args = parser.parse_args(argv)
    if not (args.runs or args.export or args.results):
        parser.error(
            "give at least one run folder, export folder (--export DIR) or results file (--results FILE)"
        )
    with exit_on_refusal("the report"):
        with refusing():  # the inputs (build_report reads them again) and --output, before anything is drawn
            load_inputs(args.runs, args.export, args.results)
            if Path(args.output).exists() and not Path(args.output).is_dir():
                raise ValueError(
                    f"--output {args.output} is a file: give the folder to write the report into"
                )
        paths = build_report(args.runs, args.output, exports=args.export, results=args.results)
    print(f"wrote {paths['html']} and {paths['markdown']} (figures in {paths['figures']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
