"""The manifest's tokenizer fingerprint and max token id, checked against the model before any work."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from shearing.data.compat import check_data_tokenizer
from shearing.data.fingerprint import FINGERPRINT_METHOD, tokenizer_fingerprint
from shearing.data.manifest import SPLITS, load_manifest, save_manifest

from .conftest import streaming_samples
from .smol_like import make_smol_like


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    return make_smol_like(tmp_path_factory.mktemp("smol_c") / "tok")


def test_fingerprint_is_stable_across_save_and_load(tokenizer_dir, smol_dir, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(tmp_path / "a")
    again = AutoTokenizer.from_pretrained(tmp_path / "a")
    again.save_pretrained(tmp_path / "b")
    fingerprints = {
        tokenizer_fingerprint(AutoTokenizer.from_pretrained(p)) for p in (tmp_path / "a", tmp_path / "b")
    }
    assert fingerprints == {tokenizer_fingerprint(tokenizer)} and len(fingerprints.pop()) == 64
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(smol_dir)) != tokenizer_fingerprint(tokenizer)
    changed = AutoTokenizer.from_pretrained(tokenizer_dir)
    changed.add_special_tokens({"additional_special_tokens": ["<extra>"]})
    assert tokenizer_fingerprint(changed) != tokenizer_fingerprint(tokenizer)


def test_manifest_records_fingerprint_and_max_token_id(prepared, tokenizer_dir) -> None:
    config, manifest = prepared
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert manifest.tokenizer["fingerprint"] == tokenizer_fingerprint(tokenizer)
    assert manifest.tokenizer["fingerprint_method"] == FINGERPRINT_METHOD
    highest = max(
        int(streaming_samples(config.output / split / d).max()) for split in SPLITS for d in manifest.domains
    )
    assert manifest.max_token_id == highest and load_manifest(config.output).max_token_id == highest


def _copy(prepared, tmp_path) -> Path:
    return Path(shutil.copytree(prepared[0].output, tmp_path / "data"))


def test_mismatch_range_and_old_manifest(prepared, tokenizer_dir, smol_dir, tmp_path, caplog) -> None:
    data = _copy(prepared, tmp_path)
    own = AutoTokenizer.from_pretrained(tokenizer_dir)
    check_data_tokenizer(data, tokenizer=own, tokenizer_path=tokenizer_dir, vocab_size=len(own), where="x")
    other = AutoTokenizer.from_pretrained(smol_dir)
    with pytest.raises(ValueError) as err:
        check_data_tokenizer(
            data / "eval", tokenizer=other, tokenizer_path=smol_dir, vocab_size=2000, where="x"
        )
    text = str(err.value)
    assert str(tokenizer_dir.resolve()) in text and str(smol_dir) in text
    assert f"vocab size {len(own)}" in text and f"vocab size {len(other)}" in text
    assert "re-run data_prep/tokenize_domains.py" in text and "model.tokenizer" in text
    # ids beyond the model's vocabulary: an error before training, with or without a fingerprint
    highest = load_manifest(data).max_token_id
    with pytest.raises(ValueError, match=f"token id {highest} but the model's vocab_size is {highest}"):
        check_data_tokenizer(data, tokenizer=own, tokenizer_path=tokenizer_dir, vocab_size=highest, where="x")
    # a manifest from before fingerprints: a warning, not an error
    manifest = load_manifest(data)
    for key in ("fingerprint", "fingerprint_method"):
        manifest.tokenizer.pop(key)
    manifest.max_token_id = None
    save_manifest(manifest, data)
    with caplog.at_level(logging.WARNING, logger="shearing.data.compat"):
        check_data_tokenizer(data, tokenizer=other, tokenizer_path=smol_dir, vocab_size=2000, where="x")
    assert "has no tokenizer fingerprint" in caplog.text
