"""The benchmark corpus: four domains of real text that ship with this machine, no hub downloads.

    python bench/corpus.py OUTPUT_DIR [--chars 5000000]

- ``code``: the Python standard library's sources (tests and idlelib left out);
- ``docs``: Python's documentation topics and the docstrings (>200 characters) of the standard library
  and of every installed package (site-packages, sorted, test folders left out);
- ``prose``: the long descriptions of the installed packages (``*.dist-info/METADATA`` bodies) and the
  Markdown / reStructuredText files under site-packages and /usr/share/doc (license files left out);
- ``legal``: license texts under /usr/share and of the installed packages (as ``make demo``'s).

Each domain takes whole documents in sorted-path order, duplicates dropped, until it holds ``chars``
characters (the pinned package set makes this the same corpus on every machine with our install).
Writes ``OUTPUT_DIR/<domain>.jsonl`` atomically and returns documents and characters per domain.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path

from shearing import demo

DOMAINS = ("code", "docs", "prose", "legal")
DEFAULT_CHARS = 5_000_000
SKIP_PARTS = {"test", "tests", "testing", "idlelib", "__pycache__"}
LICENSE_PREFIXES = ("LICENSE", "LICENCE", "COPYING", "COPYRIGHT", "NOTICE", "AUTHORS")


def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _files(root: Path, pattern: str) -> list[Path]:
    if not root.is_dir():
        return []
    return [p for p in sorted(root.rglob(pattern)) if p.is_file() and not SKIP_PARTS & set(p.parts)]


def docs_texts() -> Iterator[str]:
    yield from demo._docs_texts()
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    yield from demo.docstrings(p for p in _files(stdlib, "*.py") if p.parent != stdlib)
    yield from demo.docstrings(_files(_site_packages(), "*.py"))


def _metadata_body(path: Path) -> str:
    """The description of a METADATA file: what follows its header block."""
    text = path.read_text(encoding="utf-8", errors="ignore")
    _, sep, body = text.partition("\n\n")
    return body.strip() if sep else ""


def prose_texts() -> Iterator[str]:
    site = _site_packages()
    for path in sorted(site.glob("*.dist-info/METADATA")):
        yield _metadata_body(path)
    for root in (site, Path("/usr/share/doc")):
        for pattern in ("*.md", "*.rst"):
            for path in _files(root, pattern):
                if not path.name.upper().startswith(LICENSE_PREFIXES):
                    yield path.read_text(encoding="utf-8", errors="ignore")


def build_corpus(raw: Path, chars: int = DEFAULT_CHARS) -> dict[str, dict[str, int]]:
    """Write ``raw/<domain>.jsonl`` for the four domains; returns documents and characters per domain."""
    sources = {
        "code": demo._code_texts(),
        "docs": docs_texts(),
        "prose": prose_texts(),
        "legal": demo._legal_texts(),
    }
    raw.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, texts in sources.items():
        docs = demo._take(texts, chars)
        found = sum(map(len, docs))
        if len(docs) < 2 or found < chars // 2:
            raise RuntimeError(
                f"bench corpus: domain {name!r} found only {len(docs)} documents, {found:,} characters on this "
                f"machine (asked for {chars:,}); lower --chars"
            )
        demo.write_jsonl(raw / f"{name}.jsonl", docs)
        counts[name] = {"documents": len(docs), "chars": found}
    return counts


def ensure_corpus(raw: Path, chars: int = DEFAULT_CHARS) -> Path:
    """``build_corpus`` into ``raw`` unless ``raw/corpus.json`` says it already holds ``chars`` per domain."""
    marker = raw / "corpus.json"
    if not marker.is_file() or json.loads(marker.read_text()).get("chars") != chars:
        counts = build_corpus(raw, chars)
        marker.write_text(json.dumps({"chars": chars, "domains": counts}))
    return raw


def prepare_corpus(raw: Path, tokenizer: Path, output: Path, seq_len: int, eval_seqs: int, **options) -> None:
    """Tokenize and pack ``raw`` into ``output`` (``shearing.data.prep``; two workers); ``options`` are
    further ``PrepConfig`` fields (``progress``, ``eos_token``, ``no_bos``)."""
    from shearing.data.prep import PrepConfig, prepare

    config = PrepConfig(
        input=raw, tokenizer=str(tokenizer), output=output, seq_len=seq_len, eval_seqs=eval_seqs, workers=2
    )
    prepare(dataclasses.replace(config, **options))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/corpus.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("output", type=Path)
    parser.add_argument("--chars", type=int, default=DEFAULT_CHARS, help="raw characters per domain")
    args = parser.parse_args(argv)
    for name, c in build_corpus(args.output, args.chars).items():
        print(f"{name:<8}{c['documents']:>8,} documents {c['chars']:>12,} characters")
    return 0


if __name__ == "__main__":
    sys.exit(main())
