"""Shared data fixtures: a small, real, multi-domain corpus built from text every Python install has.

Domains (about 250 KB in all), in three raw formats:
  - ``code``: standard-library ``*.py`` sources, one JSON line each, in ``code.jsonl.gz``; a blank line and an
    empty text are mixed in so line numbers and document order differ and one document is skipped;
  - ``docs``: the stdlib modules' docstrings (``ast.get_docstring``) in a folder of two ``.jsonl`` files
    (the second ``.jsonl.zst`` when ``zstandard`` is installed);
  - ``licenses``: license texts of the installed distributions, one ``.txt`` document a file, plus a latin-1
    file (not UTF-8: skipped and counted) and a ``NOTES.md`` (unknown type: ignored with a warning).

``Corpus.documents[domain]`` lists the readable documents as ``((file, doc_id), text)`` in the order data
preparation sees them (files sorted by name, then line order), which is what the tests check against.
"""

from __future__ import annotations

import ast
import gzip
import json
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from shearing.data.prep import PrepConfig, prepare
from shearing.data.tokenizer import train_bpe_tokenizer

SEQ_LEN = 64
EVAL_SEQS = 6
VOCAB_SIZE = 800
SEED = 17


@dataclass
class Corpus:
    root: Path
    documents: dict[str, list[tuple[tuple[str, int], str]]] = field(default_factory=dict)


def _stdlib_files() -> list[Path]:
    return sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py"))


def _take(texts: list[str], budget: int, low: int = 200, high: int = 12_000) -> list[str]:
    out, seen, used = [], set(), 0
    for text in texts:
        if low <= len(text) <= high and text not in seen and used < budget:
            out.append(text)
            seen.add(text)
            used += len(text)
    return out


def _code_texts() -> list[str]:
    return _take([p.read_text(encoding="utf-8", errors="replace") for p in _stdlib_files()[:60]], 100_000)


def _docstring_texts() -> list[str]:
    texts = []
    for path in _stdlib_files()[60:160]:
        try:
            doc = ast.get_docstring(ast.parse(path.read_text(encoding="utf-8")))
        except (SyntaxError, UnicodeDecodeError):
            continue
        if doc:
            texts.append(doc)
    return _take(texts, 60_000, low=50)


def _license_texts() -> list[str]:
    site = Path(sysconfig.get_paths()["purelib"])
    paths = sorted(site.glob("*.dist-info/LICENSE*")) + sorted(site.glob("*.dist-info/licenses/LICENSE*"))
    texts = []
    for path in paths:
        if path.is_file():
            try:
                texts.append(path.read_bytes().decode("utf-8"))
            except UnicodeDecodeError:
                continue
    return _take(texts, 70_000, low=300)


def _write_jsonl(path: Path, lines: list[str | None]) -> None:
    payload = "".join(
        "\n" if text is None else json.dumps({"text": text, "meta": {"n": i}}) + "\n"
        for i, text in enumerate(lines)
    )
    data = payload.encode("utf-8")
    if path.name.endswith(".gz"):
        data = gzip.compress(data, mtime=0)
    elif path.name.endswith(".zst"):
        import zstandard

        data = zstandard.ZstdCompressor().compress(data)
    path.write_bytes(data)


def build_corpus(root: Path) -> Corpus:
    """Write the corpus of the module docstring under ``root`` and return what it holds."""
    root.mkdir(parents=True)
    corpus = Corpus(root=root)

    code = _code_texts()
    lines: list[str | None] = [*code[:2], None, code[2], "", *code[3:]]  # blank line 2, empty text at line 4
    _write_jsonl(root / "code.jsonl.gz", lines)
    corpus.documents["code"] = [(("code.jsonl.gz", i), t) for i, t in enumerate(lines) if t]

    docs = _docstring_texts()
    half = len(docs) // 2
    try:
        import zstandard  # noqa: F401

        second = "part-1.jsonl.zst"
    except ImportError:
        second = "part-1.jsonl"
    (root / "docs").mkdir()
    _write_jsonl(root / "docs" / "part-0.jsonl", docs[:half])
    _write_jsonl(root / "docs" / second, docs[half:])
    corpus.documents["docs"] = [(("part-0.jsonl", i), t) for i, t in enumerate(docs[:half])] + [
        ((second, i), t) for i, t in enumerate(docs[half:])
    ]

    folder = root / "licenses"
    folder.mkdir()
    entries = []
    for i, text in enumerate(_license_texts()):
        name = f"license-{i:03d}.txt"
        (folder / name).write_text(text, encoding="utf-8")
        entries.append(((name, 0), text))
    (folder / "latin1.txt").write_bytes(
        "Copyright (c) Ren\u00e9 M\u00fcller, all rights reserved\n".encode("latin-1")
    )
    (folder / "NOTES.md").write_text("not a domain file\n")
    corpus.documents["licenses"] = sorted(entries)
    return corpus


@pytest.fixture(scope="session")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    return build_corpus(tmp_path_factory.mktemp("raw") / "raw")


@pytest.fixture(scope="session")
def tokenizer_dir(corpus: Corpus, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train_bpe_tokenizer(
        corpus.root, VOCAB_SIZE, tmp_path_factory.mktemp("tok") / "tokenizer", progress=False
    )


def prep_config(corpus: Corpus, tokenizer_dir: Path, output: Path, **overrides) -> PrepConfig:
    settings = dict(seq_len=SEQ_LEN, eval_seqs=EVAL_SEQS, seed=SEED, workers=1, progress=False)
    settings.update(overrides)
    return PrepConfig(input=corpus.root, tokenizer=str(tokenizer_dir), output=output, **settings)


@pytest.fixture(scope="session")
def prepared(corpus: Corpus, tokenizer_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    """The corpus prepared once with two worker processes: ``(config, manifest)``."""
    config = prep_config(corpus, tokenizer_dir, tmp_path_factory.mktemp("data") / "data", workers=2)
    return config, prepare(config)


_STREAMING_CACHE: dict[Path, np.ndarray] = {}


def streaming_samples(folder: Path) -> np.ndarray:
    """All samples of an MDS folder as seen by a plain ``StreamingDataset`` (read once per folder)."""
    from streaming import StreamingDataset

    folder = Path(folder).resolve()
    if folder not in _STREAMING_CACHE:
        dataset = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
        _STREAMING_CACHE[folder] = np.stack([dataset[i]["tokens"] for i in range(len(dataset))])
    return _STREAMING_CACHE[folder]
