"""The byte-level BPE trained from raw domains: loadable by transformers, LLaMA-like specials, lossless."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from shearing.data.tokenizer import load_tokenizer_info, train_bpe_tokenizer

from .conftest import VOCAB_SIZE, Corpus


def test_trained_tokenizer_loads_with_llama_specials(tokenizer_dir: Path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert (tokenizer.unk_token, tokenizer.bos_token, tokenizer.eos_token) == ("<unk>", "<s>", "</s>")
    assert (tokenizer.unk_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id) == (0, 1, 2)
    assert tokenizer.pad_token is None
    assert 259 < len(tokenizer) <= VOCAB_SIZE
    assert tokenizer("def f(x):").input_ids[0] == tokenizer.bos_token_id


def test_round_trip_is_exact(tokenizer_dir: Path, corpus: Corpus) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    samples = [text for docs in corpus.documents.values() for _, text in docs[:5]]
    samples += ["  two  spaces , then  punctuation .\n\ttab", "caf\u00e9 \u4e2d\u6587 \U0001f600 \r\n"]
    for text in samples:
        ids = tokenizer(text, add_special_tokens=False).input_ids
        assert tokenizer.decode(ids) == text
    assert len(tokenizer(samples[0]).input_ids) < len(samples[0].encode()) / 2, "BPE learned no merges"


def test_tokenizer_info(tokenizer_dir: Path) -> None:
    info = load_tokenizer_info(tokenizer_dir)
    assert Path(info.path).is_absolute() and info.vocab_size == len(
        AutoTokenizer.from_pretrained(tokenizer_dir)
    )
    assert (info.bos_token_id, info.eos_token_id) == (1, 2)
    assert info.to_manifest()["fingerprint"] == info.fingerprint and len(info.fingerprint) == 64
    assert info.bos_token == "<s>" and "the tokenizer adds its bos_token" in info.framing


def test_cli_and_bad_vocab_size(corpus: Corpus, tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(Path(__file__).parents[2] / "data_prep"))
    try:
        import train_tokenizer
    finally:
        sys.path.pop(0)
    out = tmp_path / "tok"
    argv = [
        "--input",
        str(corpus.root),
        "--vocab-size",
        "300",
        "--output",
        str(out),
        "--max-docs-per-domain",
        "3",
    ]
    assert train_tokenizer.main(argv) == 0
    assert len(AutoTokenizer.from_pretrained(out)) <= 300
    assert train_tokenizer.main(argv[:3] + ["100", *argv[4:]]) == 2
    assert "--vocab-size 100 is too small" in capsys.readouterr().err
    with pytest.raises(ValueError, match="at least 259"):
        train_bpe_tokenizer(corpus.root, 258, tmp_path / "x")


def test_missing_tokenizer_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="could not be loaded with transformers.AutoTokenizer"):
        load_tokenizer_info(tmp_path / "nothing-here")
