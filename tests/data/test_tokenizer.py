"""The byte-level BPE trained from raw domains: loadable by transformers, LLaMA-like specials, lossless."""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import numpy as np
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
    # no special token trails the vocabulary: the core is all of it
    assert (info.core_vocab_size, info.core_fingerprint) == (info.vocab_size, info.fingerprint)
    assert info.to_manifest()["core_vocab_size"] == info.vocab_size
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


def test_smollm2_refusal_says_the_whole_fix_and_the_fix_frames_text_im_end(
    smollm2_dir: Path, corpus: Corpus, tmp_path: Path, capsys
) -> None:
    """SmolLM2's tokenizer files say bos = eos = <|im_start|>; its generation_config.json says eos 2
    (<|im_end|>). The refusal names the exact flags, and those flags give `text <|im_end|>` documents."""
    from shearing.data.manifest import load_manifest

    from .conftest import streaming_samples

    with pytest.raises(ValueError) as refused:
        load_tokenizer_info(smollm2_dir)
    message = str(refused.value)
    assert "uses '<|im_start|>' as both bos_token and eos_token" in message
    assert "generation_config.json says eos_token_id 2 ('<|im_end|>')" in message
    flags = "--no-bos --eos-token '<|im_end|>'"
    assert f"use {flags} (the eos of this model's generation_config.json)" in message, message
    assert "`text <|im_end|>`" in message

    sys.path.insert(0, str(Path(__file__).parents[2] / "data_prep"))
    try:
        import shlex

        import tokenize_domains
    finally:
        sys.path.pop(0)
    out = tmp_path / "data"
    argv = ["--input", str(corpus.root), "--tokenizer", str(smollm2_dir), "--output", str(out)]
    argv += ["--seq-len", "64", "--eval-seqs", "4", "--no-progress", *shlex.split(flags)]
    assert tokenize_domains.main(argv) == 0, capsys.readouterr().err
    assert "framing: text + EOS; no BOS (--no-bos); EOS: --eos-token" in capsys.readouterr().out
    record = load_manifest(out).tokenizer
    assert (record["bos_token"], record["bos_token_id"], record["eos_token"], record["eos_token_id"]) == (
        None,
        None,
        "<|im_end|>",
        2,
    )
    stream = streaming_samples(out / "train" / "docs").reshape(-1)
    assert 1 not in stream  # <|im_start|> nowhere
    ends = np.flatnonzero(stream == 2)
    tokenizer = AutoTokenizer.from_pretrained(smollm2_dir)
    document = tokenizer.decode(stream[ends[0] + 1 : ends[1] + 1], clean_up_tokenization_spaces=False)
    text = document.removesuffix("<|im_end|>")
    assert document.endswith("<|im_end|>") and text in {t for _, t in corpus.documents["docs"]}, document


def test_bos_eq_eos_refusal_reads_the_model_folder_eos(tmp_path: Path) -> None:
    """The suggestion comes from generation_config.json, else config.json (an id or a list of ids); a
    folder naming the tokenizer's own eos, or nothing, gets the plain --no-bos / --bos-token advice."""
    import json

    from .smol_like import make_smol_like

    folder = make_smol_like(tmp_path / "gpt2", same_token=True)  # bos = eos = <|endoftext|> (id 0)
    plain = "pass --no-bos (documents separated by '<|endoftext|>' only, the GPT-2 convention)"
    with pytest.raises(ValueError, match=re.escape(plain)):
        load_tokenizer_info(folder)
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [0, 2]}))
    with pytest.raises(
        ValueError, match=re.escape("config.json says eos_token_id 2 ('<|im_end|>'): use --no-bos")
    ):
        load_tokenizer_info(folder)
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 0}))  # read first: its own eos
    with pytest.raises(ValueError, match=re.escape(plain)):
        load_tokenizer_info(folder)


def test_saved_tokenizer_names_a_class_every_transformers_loads(tokenizer_dir: Path) -> None:
    """transformers 5 saves tokenizer_class TokenizersBackend, which 4.x cannot load; ours names
    PreTrainedTokenizerFast (4.51 writes it without "Fast")."""
    saved = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())["tokenizer_class"]
    assert saved in ("PreTrainedTokenizer", "PreTrainedTokenizerFast")
