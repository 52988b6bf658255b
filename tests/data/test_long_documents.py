"""Long documents: tokenized in bounded pieces (``shearing.data.pieces``) with the tokens of the whole.

Issue: one 50 MB JSON line went to the tokenizer in one call, > 4 GB RSS (killed; 9 GB reported), an
out-of-memory kill with ``--workers 16``. Now no tokenizer call sees more than ``MAX_PIECE_CHARS``
characters, and every cut is verified to give the whole document's tokens.
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from tokenizers import Tokenizer
from transformers import AutoTokenizer

import shearing.data.prep as prep
from shearing.data.pieces import MAX_PIECE_CHARS, CutStats, document_pieces
from shearing.data.prep import document_order, prepare, tokenize_file
from shearing.data.raw import RawFile

from .conftest import Corpus, prep_config, streaming_samples
from .smol_like import make_smol_like
from .sp_like import make_sp_like
from .test_prep import _documents_in_stream


def _ordinary_text(corpus: Corpus, chars: int) -> str:
    """Real text (stdlib sources, docstrings, licenses) joined by blank lines, repeated to ``chars``."""
    texts = [text for documents in corpus.documents.values() for _, text in documents]
    joined = "\n\n".join(texts)
    return (joined * (chars // len(joined) + 1))[:chars]


def _backend(path: Path) -> Tokenizer:
    tokenizer = Tokenizer.from_file(str(path / "tokenizer.json"))
    tokenizer.encode_special_tokens = True
    return tokenizer


@pytest.fixture(scope="module")
def tokenizers(corpus: Corpus, tokenizer_dir: Path, smollm2_dir: Path, tmp_path_factory) -> dict:
    """Byte-level (ours, SmolLM2-like, the real SmolLM2) and SentencePiece-style (LLaMA-2 legacy, Metaspace)."""
    texts = [text for documents in corpus.documents.values() for _, text in documents]
    smol_like = make_smol_like(tmp_path_factory.mktemp("smol_like"))
    return {
        "byte-level BPE (tests)": _backend(tokenizer_dir),
        "SmolLM2-like": _backend(smol_like),
        "SmolLM2-135M": _backend(smollm2_dir),
        "LLaMA-2 legacy (Prepend + Replace)": make_sp_like(texts, "legacy"),
        "Metaspace prepend first": make_sp_like(texts, "metaspace"),
    }


def _ids(tokenizer, texts: list[str]) -> list[int]:
    return [i for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False) for i in e.ids]


@pytest.mark.parametrize(
    "kind",
    ["ordinary", "chinese"],
)
def test_pieces_give_the_tokens_of_the_whole_document(tokenizers, corpus: Corpus, kind: str) -> None:
    """~150 cuts in 300k characters of real text (and Chinese with punctuation, no spaces): every cut is
    verified and the pieces' tokens equal the whole text's, for each kind of tokenizer."""
    if kind == "ordinary":
        text = _ordinary_text(corpus, 300_000)
    else:
        text = "数据准备把每个领域的原始文本切分成固定长度的序列，评估集取整篇文档。" * 3_000
    for name, tokenizer in tokenizers.items():
        if kind == "chinese" and "SmolLM2-135M" not in name and "tests" not in name:
            continue  # the small trained vocabularies have no Chinese; the byte-level ones do (bytes)
        stats = CutStats()
        pieces = list(document_pieces(text, tokenizer, stats, max_chars=2_000))
        assert max(map(len, pieces)) <= 2_000
        assert stats.documents == 1 and stats.cuts == len(pieces) - 1 >= 50, name
        assert stats.unverified == 0, f"{name}: {stats.unverified} cuts could not be verified"
        assert _ids(tokenizer, pieces) == _ids(tokenizer, [text]), name


class _WordTokenizer:
    """One id per space-separated word: a text without spaces is one giant pre-token, never cut exactly."""

    class _Encoding:
        def __init__(self, ids: list[int]) -> None:
            self.ids = ids

    def encode_batch_fast(self, texts, add_special_tokens=True):
        return [self._Encoding([len(w) for w in t.split(" ") if w]) for t in texts]


def test_text_without_any_boundary_is_still_cut_and_counted() -> None:
    """No candidate verifies: the text is cut at the limit anyway (memory stays bounded) and counted."""
    stats = CutStats()
    pieces = list(document_pieces("abcdefgh" * 1_000, _WordTokenizer(), stats, max_chars=2_000))
    assert [len(p) for p in pieces] == [2_000] * 4
    assert stats.unverified == stats.cuts == 3
    stats = CutStats()
    pieces = list(document_pieces("abcdefgh " * 1_000, _WordTokenizer(), stats, max_chars=2_000))
    assert "".join(pieces) == "abcdefgh " * 1_000 and stats.unverified == 0, "spaces give exact cuts"


class _SpyTokenizer:
    """Delegates to a tokenizer and records the longest text and the largest batch (characters) it saw."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest, self.largest_batch = tokenizer, 0, 0

    def encode_batch_fast(self, texts, add_special_tokens=True):
        self.longest = max(self.longest, *map(len, texts))
        self.largest_batch = max(self.largest_batch, sum(map(len, texts)))
        return self.tokenizer.encode_batch_fast(texts, add_special_tokens=add_special_tokens)


def test_a_large_document_never_reaches_the_tokenizer_whole(tokenizer_dir, corpus: Corpus, tmp_path) -> None:
    """A 2 MB document between two small ones: the tokenizer sees at most MAX_PIECE_CHARS characters a
    call (old code: the whole 2 MB), memory per batch is bounded, and the cache holds BOS + the whole
    document's tokens + EOS for each of the three documents."""
    big = _ordinary_text(corpus, 2_000_000)
    texts = ["a small document", big, "another small one"]
    raw = tmp_path / "big.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    backend = _backend(tokenizer_dir)
    spy = _SpyTokenizer(backend)
    tokenize_file(
        RawFile(raw, raw.name, raw.stat().st_size), tmp_path / "cache", spy, 1, 2, np.dtype("uint16")
    )

    assert spy.longest <= MAX_PIECE_CHARS, f"the tokenizer was given {spy.longest:,} characters at once"
    assert spy.largest_batch <= prep._BATCH_CHARS + MAX_PIECE_CHARS
    tokens = np.fromfile(tmp_path / "cache.bin", dtype=np.uint16)
    with np.load(tmp_path / "cache.npz") as index:
        offsets, doc_ids, cuts = index["offsets"], index["doc_ids"], index["cuts"]
    assert doc_ids.tolist() == [0, 1, 2]
    assert cuts[0] == 1 and cuts[1] >= len(big) // MAX_PIECE_CHARS, "only the large document is cut"
    assert cuts[2] == 0, "every cut of ordinary text is verified"
    for k, text in enumerate(texts):
        expected = [1, *backend.encode(text, add_special_tokens=False).ids, 2]
        assert tokens[offsets[k] : offsets[k + 1]].tolist() == expected, f"document {k}"


def test_prepare_keeps_a_cut_document_one_document(corpus: Corpus, tokenizer_dir, tmp_path, caplog) -> None:
    """A domain holding a 200k-character document (cut into pieces) among small ones: each document is
    still BOS text EOS in the stream, decodes exactly, and lies whole in eval or in train."""
    raw = tmp_path / "raw"
    raw.mkdir()
    small = [text for _, text in corpus.documents["docs"]]
    texts = [*small[:20], _ordinary_text(corpus, 200_000), *small[20:]]
    (raw / "mixed.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    config = replace(prep_config(corpus, tokenizer_dir, tmp_path / "out", eval_seqs=40), input=raw)
    with caplog.at_level(logging.INFO, logger="shearing.data.prep"):
        manifest = prepare(config)
    assert re.search(
        r"'mixed': 1 document\(s\) longer than 65536 characters tokenized in [4-6] pieces", caplog.text
    )
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    order = document_order(len(texts), config.seed, "mixed")
    num_eval = len(manifest.split["eval_documents"]["mixed"])
    decoded = {}
    for split, doc_order in (("eval", order[:num_eval]), ("train", order[num_eval:])):
        stream = streaming_samples(config.output / split / "mixed").reshape(-1)
        decoded[split] = _documents_in_stream(tokenizer, stream, [texts[i] for i in doc_order])
    assert set(decoded["eval"]).isdisjoint(decoded["train"])
    assert texts[20] in decoded["eval"] + decoded["train"], "the long document round-trips whole"
