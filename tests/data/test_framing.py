"""Document framing follows the tokenizer's own bos/eos convention; flags override; ambiguity is refused."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from shearing.data.manifest import load_manifest
from shearing.data.prep import prepare
from shearing.data.tokenizer import load_tokenizer_info

from .conftest import Corpus, prep_config, streaming_samples
from .smol_like import make_smol_like

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    return make_smol_like(tmp_path_factory.mktemp("smol") / "tok")


def _stream(root: Path, domain: str = "docs") -> np.ndarray:
    return streaming_samples(root / "train" / domain).reshape(-1)  # many short docstrings


def test_smollm2_like_tokenizer_gets_no_bos_and_its_own_eos(corpus: Corpus, smol_dir, tmp_path) -> None:
    """bos <|im_start|> is a chat marker the tokenizer never adds itself: documents are text + <|im_end|>."""
    manifest = prepare(prep_config(corpus, smol_dir, tmp_path / "data"))
    stream = _stream(tmp_path / "data")
    assert 1 not in stream  # <|im_start|> nowhere
    assert stream[0] not in (0, 1, 2)  # the first document starts with its text
    ends = np.flatnonzero(stream == 2)
    assert len(ends) >= 2 and all(stream[e + 1] not in (0, 1) for e in ends if e + 1 < len(stream))
    tok = load_manifest(tmp_path / "data").tokenizer
    assert tok == manifest.tokenizer
    assert (tok["bos_token"], tok["bos_token_id"], tok["eos_token"], tok["eos_token_id"]) == (
        None,
        None,
        "<|im_end|>",
        2,
    )
    assert "no BOS: the tokenizer does not add its bos_token '<|im_start|>' itself" in tok["framing"]


def test_bos_token_flag_through_the_cli(corpus: Corpus, smol_dir, tmp_path, capsys) -> None:
    sys.path.insert(0, str(REPO / "data_prep"))
    try:
        import tokenize_domains
    finally:
        sys.path.pop(0)
    out = tmp_path / "data"
    argv = ["--input", str(corpus.root), "--tokenizer", str(smol_dir), "--output", str(out)]
    argv += ["--seq-len", "64", "--eval-seqs", "6", "--no-progress", "--bos-token", "<|endoftext|>"]
    assert tokenize_domains.main(argv) == 0
    assert "framing: BOS + text + EOS; BOS from --bos-token" in capsys.readouterr().out
    stream = _stream(out)
    assert stream[0] == 0
    ends = np.flatnonzero(stream == 2)
    assert len(ends) >= 2 and all(stream[e + 1] == 0 for e in ends if e + 1 < len(stream))
    tok = load_manifest(out).tokenizer
    assert (tok["bos_token"], tok["bos_token_id"], tok["eos_token_id"]) == ("<|endoftext|>", 0, 2)
    with pytest.raises(SystemExit):  # argparse: --bos-token and --no-bos are exclusive
        tokenize_domains.parse_args(argv + ["--no-bos"])


def test_ambiguous_or_missing_tokens_are_refused_without_a_flag(tmp_path) -> None:
    gpt2 = make_smol_like(tmp_path / "gpt2", same_token=True)
    with pytest.raises(ValueError, match="both bos_token and eos_token.*--no-bos"):
        load_tokenizer_info(gpt2)
    info = load_tokenizer_info(gpt2, no_bos=True)
    assert (info.bos_token_id, info.eos_token_id) == (None, 0) and "no BOS (--no-bos)" in info.framing
    noeos = make_smol_like(tmp_path / "noeos", eos=False)
    with pytest.raises(ValueError, match="has no eos_token.*--eos-token"):
        load_tokenizer_info(noeos)
    assert load_tokenizer_info(noeos, eos_token="<|endoftext|>").eos_token_id == 0
    with pytest.raises(ValueError, match=r"--bos-token '<s>' is not a token"):
        load_tokenizer_info(noeos, bos_token="<s>", eos_token="<|endoftext|>")
    with pytest.raises(ValueError, match="contradict"):
        load_tokenizer_info(gpt2, bos_token="<|im_start|>", no_bos=True)


def test_llama_like_tokenizer_keeps_bos(tokenizer_dir) -> None:
    info = load_tokenizer_info(tokenizer_dir)  # adds <s> itself, like LLaMA
    assert (info.bos_token, info.bos_token_id, info.eos_token_id) == ("<s>", 1, 2)
    assert info.framing.startswith("BOS + text + EOS; BOS: the tokenizer adds its bos_token")
