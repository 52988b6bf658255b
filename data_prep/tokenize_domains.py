r"""Tokenize raw per-domain text into MDS train/eval shards and a manifest (see shearing.data.prep).

    python data_prep/tokenize_domains.py --input RAW_DIR --tokenizer TOKENIZER_DIR --output DATA_DIR \
        --seq-len 4096 --eval-seqs 500 [--train-tokens 0.4B] [--max-docs-per-domain N] [--workers N] \
        [--seed 17] [--bos-token TOKEN | --no-bos] [--eos-token TOKEN]

Documents are framed with the tokenizer's own convention: EOS always (its eos_token), BOS only if the
tokenizer adds it itself. A tokenizer with no eos_token, or with bos_token == eos_token, is refused until
a flag says what to do. The choice is printed and recorded in manifest.json (shearing.data.tokenizer).
An interrupted run (or one stopped by a full disk) resumes when rerun with the same arguments.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

from shearing.data.prep import DiskFullError, PrepConfig, format_summary, parse_token_count, prepare


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--input", required=True, type=Path, help="RAW_DIR: one entry per domain")
    parser.add_argument(
        "--tokenizer", required=True, help="a Hugging Face tokenizer folder (needs bos and eos)"
    )
    parser.add_argument("--output", required=True, type=Path, help="DATA_DIR: train/, eval/, manifest.json")
    parser.add_argument("--seq-len", type=int, default=4096, help="tokens per sequence (default 4096)")
    parser.add_argument(
        "--eval-seqs", type=int, default=500, help="held-out sequences per domain (default 500)"
    )
    parser.add_argument(
        "--train-tokens",
        type=parse_token_count,
        default=None,
        help="cap on train tokens over all domains, e.g. 0.4B",
    )
    parser.add_argument(
        "--max-docs-per-domain",
        type=int,
        default=None,
        metavar="N",
        help="read only each domain's first N documents (files in sorted order, then line order; later "
        "files are not read), then split and cap them as usual; default: every document",
    )
    parser.add_argument("--workers", type=int, default=1, help="tokenizer processes (default 1)")
    parser.add_argument("--seed", type=int, default=17, help="seed of the document order (default 17)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    bos = parser.add_mutually_exclusive_group()
    bos.add_argument(
        "--bos-token",
        help="start every document with this token (default: only if the tokenizer adds its bos)",
    )
    bos.add_argument("--no-bos", action="store_true", help="no BOS token before documents")
    parser.add_argument("--eos-token", help="end every document with this token (default: its eos_token)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        config = PrepConfig(
            input=args.input,
            tokenizer=args.tokenizer,
            output=args.output,
            seq_len=args.seq_len,
            eval_seqs=args.eval_seqs,
            train_tokens=args.train_tokens,
            workers=args.workers,
            seed=args.seed,
            progress=not args.no_progress,
            bos_token=args.bos_token,
            eos_token=args.eos_token,
            no_bos=args.no_bos,
            max_docs_per_domain=args.max_docs_per_domain,
        )
        manifest = prepare(config)
    except (ValueError, ImportError, DiskFullError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(format_summary(manifest))
    print(f"framing: {manifest.tokenizer.get('framing', '?')}")
    print(f"wrote {args.output}/manifest.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
