"""Train a byte-level BPE tokenizer on raw per-domain text (see shearing.data.tokenizer).

python data_prep/train_tokenizer.py --input RAW_DIR --vocab-size 32000 --output TOKENIZER_DIR
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shearing.data.tokenizer import train_bpe_tokenizer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, type=Path, help="RAW_DIR: one entry per domain")
    parser.add_argument("--vocab-size", type=int, default=32000, help="vocabulary size (default 32000)")
    parser.add_argument("--output", required=True, type=Path, help="TOKENIZER_DIR to save into")
    parser.add_argument(
        "--min-frequency", type=int, default=2, help="least count of a merged pair (default 2)"
    )
    parser.add_argument(
        "--max-docs-per-domain", type=int, default=None, help="train on a sample of each domain"
    )
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        path = train_bpe_tokenizer(
            args.input,
            args.vocab_size,
            args.output,
            min_frequency=args.min_frequency,
            max_docs_per_domain=args.max_docs_per_domain,
        )
    except (ValueError, ImportError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"saved tokenizer to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
