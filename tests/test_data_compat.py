"""The data/model tokenizer check wired into training, evaluation and reference losses (root fixtures:
the tiny model and the tiny data share one tokenizer; ``tests/data`` overrides ``tokenizer_dir``)."""

from __future__ import annotations

import json
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


# Across transformers versions: the same tokenizer files may load with a special token appended (5.x's
# Qwen2Tokenizer adds its default pad <|endoftext|> as id 512); a folder saved by 5.x names a class 4.x lacks.


def _with_appended_pad(tokenizer_dir: Path, out: Path) -> Path:
    """The tokenizer as transformers 5 loads it under model_type qwen2: one special token appended."""
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer.add_special_tokens({"pad_token": "<|endoftext|>"}) == 1
    tokenizer.save_pretrained(out)
    return out


def _as_saved_by_transformers5(folder: Path) -> Path:
    """Rewrite a saved tokenizer's files as transformers 5 writes them (class TokenizersBackend, no
    special_tokens_map.json: the special tokens live in tokenizer_config.json)."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    special = folder / "special_tokens_map.json"
    if special.is_file():
        names = json.loads(special.read_text())
        config.update({k: v if isinstance(v, str) else v["content"] for k, v in names.items()})
        special.unlink()
    config["tokenizer_class"] = "TokenizersBackend"
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


def _model_with_tokenizer(tiny_gqa_dir: Path, tokenizer_dir: Path, out: Path) -> Path:
    model = Path(shutil.copytree(tiny_gqa_dir, out))
    for f in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (model / f).unlink(missing_ok=True)
        if (tokenizer_dir / f).is_file():
            shutil.copy(tokenizer_dir / f, model / f)
    return model


def _data_with_tokenizer(
    tiny_data: Path, tokenizer_dir: Path, out: Path, max_token_id: int | None = None
) -> Path:
    """A copy of tiny_data's manifest.json as if prepared with ``tokenizer_dir`` (the check reads only it)."""
    from shearing.data.tokenizer import load_tokenizer_info

    raw = json.loads((tiny_data / "manifest.json").read_text())
    raw["tokenizer"] = load_tokenizer_info(tokenizer_dir).to_manifest()
    if max_token_id is not None:
        raw["max_token_id"] = max_token_id
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(raw))
    return out


def test_a_special_token_appended_by_another_transformers_is_the_same_tokenizer(
    tiny_gqa_dir, tiny_data, tokenizer_dir, tmp_path
) -> None:
    from shearing.data.compat import check_model_dir_data, load_tokenizer_or_none, tokenizer_fingerprint

    appended = _with_appended_pad(tokenizer_dir, tmp_path / "tok513")
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(appended)) != tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(tokenizer_dir)
    )
    # data from the 512-token view, model seen with 513 tokens (4.51 data, model under 5.x) ...
    check_model_dir_data(tiny_data / "eval", _model_with_tokenizer(tiny_gqa_dir, appended, tmp_path / "m513"))
    # ... and the reverse: data from the 513-token view, the model's 512 (5.x data, training under 4.51)
    data513 = _data_with_tokenizer(tiny_data, appended, tmp_path / "data513")
    entry = json.loads((data513 / "manifest.json").read_text())["tokenizer"]
    assert (entry["vocab_size"], entry["core_vocab_size"]) == (513, 512)
    check_model_dir_data(data513, tiny_gqa_dir)
    # the model folder as written by transformers 5 reads under 4.x too, with the same fingerprint
    saved5 = _as_saved_by_transformers5(_model_with_tokenizer(tiny_gqa_dir, tokenizer_dir, tmp_path / "m5"))
    assert tokenizer_fingerprint(load_tokenizer_or_none(saved5)) == tokenizer_fingerprint(
        AutoTokenizer.from_pretrained(tokenizer_dir)
    )
    check_model_dir_data(tiny_data / "eval", saved5)


def test_a_changed_vocabulary_is_still_refused(
    tiny_gqa_dir, tiny_data, tokenizer_dir, smol_dir, tmp_path
) -> None:
    from shearing.data.compat import check_data_tokenizer, check_model_dir_data

    # two tokens trade ids: same size, same specials, ids 300/301 mean other tokens
    moved = Path(shutil.copytree(tokenizer_dir, tmp_path / "moved"))
    spec = json.loads((moved / "tokenizer.json").read_text())
    vocab = spec["model"]["vocab"]
    a, b = (t for t, i in vocab.items() if i in (300, 301))
    vocab[a], vocab[b] = vocab[b], vocab[a]
    (moved / "tokenizer.json").write_text(json.dumps(spec))
    with pytest.raises(
        ValueError, match="--data=.* was tokenized with .* token ids would mean different tokens"
    ):
        check_model_dir_data(tiny_data / "eval", _model_with_tokenizer(tiny_gqa_dir, moved, tmp_path / "mm"))
    # another tokenizer saved by transformers 5 (a class 4.x lacks) is loaded and refused, not skipped
    other5 = _as_saved_by_transformers5(_other_tokenizer_model(tiny_gqa_dir, smol_dir, tmp_path))
    with pytest.raises(ValueError, match="--data=.* was tokenized with"):
        check_model_dir_data(tiny_data / "eval", other5)
    # data that holds the appended token (id 512): the tokenizer without it cannot be the same one
    appended = _with_appended_pad(tokenizer_dir, tmp_path / "tok513")
    data = _data_with_tokenizer(tiny_data, appended, tmp_path / "holds512", max_token_id=512)
    with pytest.raises(ValueError, match="was tokenized with"):
        check_data_tokenizer(
            data,
            tokenizer=AutoTokenizer.from_pretrained(tokenizer_dir),
            tokenizer_path=str(tokenizer_dir),
            vocab_size=None,
            where="--data",
        )


def test_a_qwen2_model_folder_accepts_data_from_its_own_tokenizer(tiny_data, tokenizer_dir, tmp_path) -> None:
    """The case transformers 5 broke: a model_type qwen2 folder's tokenizer loads as Qwen2Tokenizer there,
    with a pad token appended (513 tokens); the data prepared with the same files (512) is still accepted."""
    from tiny import make_hf_family

    from shearing.data.compat import check_model_dir_data, load_tokenizer_or_none

    model = make_hf_family(tmp_path / "qwen2", "qwen2", tokenizer_dir, sliding_window=None)
    assert len(load_tokenizer_or_none(model)) in (512, 513)  # 513 under transformers 5
    check_model_dir_data(tiny_data / "eval", model)
