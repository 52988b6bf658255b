"""The data/model tokenizer check wired into training, evaluation and reference losses (root fixtures:
the tiny model and the tiny data share one tokenizer; ``tests/data`` overrides ``tokenizer_dir``)."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from data.smol_like import make_smol_like
from transformers import AutoTokenizer

from shearing.data.manifest import load_manifest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def smol_dir(tmp_path_factory) -> Path:
    return make_smol_like(tmp_path_factory.mktemp("smol_t") / "tok")


def _other_tokenizer_model(tiny_gqa_dir, smol_dir, tmp_path) -> Path:
    model = Path(shutil.copytree(tiny_gqa_dir, tmp_path / "model"))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / f).unlink(missing_ok=True)
    AutoTokenizer.from_pretrained(smol_dir).save_pretrained(model)
    return model


def test_training_refuses_data_from_another_tokenizer(tiny_gqa_dir, tiny_data, smol_dir) -> None:
    from shearing.config import load_config
    from shearing.train import validate_run

    base = [f"variables.source_model={tiny_gqa_dir}", f"variables.data_local={tiny_data}"]
    validate_run(load_config(REPO / "yamls/testing/prune_tiny.yaml", base))  # the model's own tokenizer
    cfg = load_config(REPO / "yamls/testing/prune_tiny.yaml", [*base, f"variables.tokenizer={smol_dir}"])
    with pytest.raises(ValueError, match=r"train_loader.dataset.local=.* was tokenized with .* fingerprint"):
        validate_run(cfg)


def test_evaluate_and_reference_losses_refuse_it(tiny_gqa_dir, tiny_data, smol_dir, tmp_path, capsys) -> None:
    from shearing.evaluate import EvalOptions, check_options
    from shearing.reference_losses import main as reference_main

    model = _other_tokenizer_model(tiny_gqa_dir, smol_dir, tmp_path)
    check_options(EvalOptions(model=str(tiny_gqa_dir), data=str(tiny_data / "eval")))
    with pytest.raises(ValueError, match="--data=.* was tokenized with"):
        check_options(EvalOptions(model=str(model), data=str(tiny_data / "eval")))
    code = reference_main(
        ["--model", str(model), "--data", str(tiny_data / "eval"), "--output", str(tmp_path / "r.json")]
    )
    assert code == 2 and "was tokenized with" in capsys.readouterr().err
    assert not (tmp_path / "r.json").exists()
    assert np.isfinite(load_manifest(tiny_data).max_token_id)
