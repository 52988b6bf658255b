"""Lay out a RedPajama download as RAW_DIR with the 7 domains, by symlinks (see shearing.data.raw).

    python data_prep/redpajama.py --source REDPAJAMA_DIR --output RAW_DIR [--allow-missing]

Both layouts work: RedPajama-Data-1T (common_crawl/, c4/, github/, book/, wikipedia/, arxiv/, stackexchange/)
and RedPajama-Data-1T-Sample (cc_*.jsonl, c4_*.jsonl, ..., wikipedia_*.jsonl). Nothing is copied.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shearing.data.raw import link_redpajama


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--source", required=True, type=Path, help="the RedPajama download folder")
    parser.add_argument("--output", required=True, type=Path, help="RAW_DIR to create: one folder per domain")
    parser.add_argument(
        "--allow-missing", action="store_true", help="lay out the domains found, warn on the rest"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        counts = link_redpajama(args.source, args.output, allow_missing=args.allow_missing)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    for domain, count in counts.items():
        print(f"{domain:<14} {count:>6} files")
    print(f"laid out {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
