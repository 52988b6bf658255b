"""Turn run folders into one report: ``python -m shearing.report RUN_DIR [RUN_DIR ...] --output report/``.

Reads from each run folder whatever is there: ``metrics.jsonl`` (the ``metrics_file`` logger,
``shearing.loggers``), ``dynamic_loading.json``, the export summary ``hf/shearing_export.json`` (or any
``*/shearing_export.json``) and evaluation results (``results.json`` / ``*results*.json``, from
``shearing.evaluate``). Writes ``report.md``, a self-contained ``report.html`` (figures inlined) and
``figures/*.png``: loss curves, per-domain loss against the reference, the domain mixture over time,
expected sparsity and λ per mask family, the kept-structure heat map, parameter counts and evaluation
tables. Runs are overlaid in one colour each. The sections are built in ``shearing.reporting``.
"""

from __future__ import annotations

import argparse
import sys

from shearing.reporting import build_report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shearing.report", description=__doc__.split("\n\n")[0])
    parser.add_argument("runs", nargs="+", metavar="RUN_DIR", help="run folders (a training save_folder)")
    parser.add_argument(
        "--output", "-o", default="report", help="folder to write the report into (default: ./report)"
    )
    args = parser.parse_args(argv)
    try:
        paths = build_report(args.runs, args.output)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {paths['html']} and {paths['markdown']} (figures in {paths['figures']})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
