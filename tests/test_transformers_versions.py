"""Exports and HF folders across transformers versions: the project pins 4.51.3, users load exports with 5.x.

Run in the canonical venv (4.51) and in a venv with transformers 5 (README, "transformers versions"):
the tiny pruned model's export must load with the installed stock ``AutoModelForCausalLM`` to the masked
model's logits, its tokenizer files must be the source's, byte for byte (a tokenizer saved by 5.x only
renamed to the class 4.x loads), and its ``config.json`` must carry the RoPE settings in the form 4.x reads
(``rope_theta``), so that an export written under 5.x does not load in 4.x with theta 10000. A folder as
5.x writes it (``rope_parameters``, non-default theta, safetensors for ``safe_serialization=False``) reads
with the project's own loader to stock HF's logits. A tokenizer folder as 5.x saves it exports to one that
stock ``AutoTokenizer`` loads here. The pruned config inherits RoPE in the installed version's own form
(5.x: ``rope_parameters``, not its deprecated ``rope_scaling`` alias), sharing no dict with the source's.
"""

from __future__ import annotations

import json

import pytest
import torch
import transformers
from tiny import make_hf_llama, unit_masks
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

from shearing.data.compat import tokenizer_fingerprint
from shearing.data.tokenizer import PORTABLE_CLASS, V5_ONLY_CLASS
from shearing.evaluation.loading import dtype_kwargs
from shearing.export.hf import TOKENIZER_FILES, copy_tokenizer, write_config
from shearing.models.hf_io import config_from_dict, load_source_model, portable_config_dict
from shearing.pruning.surgery import _inherited_fields, prune_model

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5
# tokenizer_config.json as transformers 5.25 saves the tiny tokenizer (AutoTokenizer...save_pretrained); it
# writes no special_tokens_map.json
SAVED_BY_5 = {
    "backend": "tokenizers",
    "bos_token": "<s>",
    "clean_up_tokenization_spaces": False,
    "eos_token": "</s>",
    "is_local": True,
    "local_files_only": False,
    "model_max_length": 1000000000000000019884624838656,
    "tokenizer_class": V5_ONLY_CLASS,
    "unk_token": "<unk>",
}


@pytest.fixture(scope="module")
def exported(pruned_run, tmp_path_factory):
    from shearing.export.hf import main

    _, run_dir = pruned_run
    out = tmp_path_factory.mktemp("tfv") / "hf"
    assert main(["--checkpoint", str(run_dir), "--output", str(out), "--no-data"]) == 0
    return out


def test_export_loads_with_this_transformers(pruned_run, exported, tiny_gqa_dir):
    trainer, _ = pruned_run
    composer_model = trainer.state.model
    composer_model.eval()
    composer_model.l0.use_final_masks = True
    input_ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(1))
    hf = AutoModelForCausalLM.from_pretrained(exported, **dtype_kwargs(torch.float32)).eval()
    with torch.no_grad():
        masked = composer_model.model(input_ids, masks=composer_model.l0())
        torch.testing.assert_close(hf(input_ids).logits, masked)
    source_tokenizer = AutoTokenizer.from_pretrained(tiny_gqa_dir)
    assert tokenizer_fingerprint(AutoTokenizer.from_pretrained(exported)) == tokenizer_fingerprint(
        source_tokenizer
    )


def test_export_config_is_read_alike_by_4x_and_5x(exported, tmp_path):
    raw = json.loads((exported / "config.json").read_text())
    assert raw == portable_config_dict(raw)
    assert raw.get("rope_theta") is not None
    # a non-default theta and a scaling: 4.x's fields hold them whichever version wrote the file
    config = LlamaConfig(rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 4.0})
    write_config(config, tmp_path)
    raw = json.loads((tmp_path / "config.json").read_text())
    assert raw["rope_theta"] == 500000.0 and raw["rope_scaling"] == {"rope_type": "linear", "factor": 4.0}
    read = portable_config_dict(LlamaConfig.from_pretrained(tmp_path).to_dict())
    assert (read["rope_theta"], read["rope_scaling"]) == (500000.0, {"rope_type": "linear", "factor": 4.0})


def _assert_tokenizer_files_copied(source, export):
    """``export`` holds ``source``'s tokenizer files byte for byte; only a 5.x class name is made portable."""
    names = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    assert "tokenizer.json" in names and "tokenizer_config.json" in names
    for name in names:
        if name != "tokenizer_config.json":
            assert (export / name).read_bytes() == (source / name).read_bytes(), name
    expected = json.loads((source / "tokenizer_config.json").read_text())
    if expected.get("tokenizer_class") == V5_ONLY_CLASS:
        expected["tokenizer_class"] = PORTABLE_CLASS
    assert json.loads((export / "tokenizer_config.json").read_text()) == expected


def test_export_tokenizer_files_are_the_sources(exported, tiny_gqa_dir):
    """Not re-saved: a 5.x save names TokenizersBackend (4.x cannot load it) and, for a qwen2 folder, bakes
    in Qwen2Tokenizer's pad token and pre-tokenizer (tests/models/test_families.py's Qwen2 export)."""
    _assert_tokenizer_files_copied(tiny_gqa_dir, exported)


def test_tokenizer_saved_by_5x_exports_to_one_stock_autotokenizer_loads(tokenizer_dir, tmp_path):
    source = tmp_path / "saved_by_5"
    source.mkdir()
    (source / "tokenizer.json").write_bytes((tokenizer_dir / "tokenizer.json").read_bytes())
    (source / "tokenizer_config.json").write_text(json.dumps(SAVED_BY_5))
    dest = tmp_path / "export"
    dest.mkdir()
    assert copy_tokenizer(source, dest) == ["tokenizer.json", "tokenizer_config.json"]
    _assert_tokenizer_files_copied(source, dest)
    exported = AutoTokenizer.from_pretrained(
        dest
    )  # stock, not load_hf_tokenizer: 4.x has no TokenizersBackend
    original = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert tokenizer_fingerprint(exported) == tokenizer_fingerprint(original)
    assert (exported.bos_token, exported.eos_token, exported.unk_token) == ("<s>", "</s>", "<unk>")
    text = "def parse(self, text):\n    return 42"
    assert exported(text).input_ids == original(text).input_ids


def test_tokenizer_with_only_slow_files_gets_its_tokenizer_json(tokenizer_dir, tmp_path):
    """vocab.json + merges.txt only (GPT-2 style): copied, plus the tokenizer.json transformers builds from
    them (the GGUF writer reads it), and the export tokenizes like the source."""
    source = tmp_path / "slow"
    source.mkdir()
    AutoTokenizer.from_pretrained(tokenizer_dir).backend_tokenizer.model.save(str(source))
    (source / "tokenizer_config.json").write_text(json.dumps({"tokenizer_class": "GPT2Tokenizer"}))
    dest = tmp_path / "export"
    dest.mkdir()
    assert copy_tokenizer(source, dest) == ["merges.txt", "tokenizer_config.json", "vocab.json"]
    assert (dest / "tokenizer.json").is_file()
    text = "hello world, def f(x): return x"
    assert (
        AutoTokenizer.from_pretrained(dest)(text).input_ids
        == AutoTokenizer.from_pretrained(source)(text).input_ids
    )


def test_portable_config_dict_reads_alike_in_this_transformers(tmp_path):
    """A 5.x-form config, made portable, gives this transformers' stock model the same RoPE as the 5.x form
    gives ours (the other direction of the cross-version check, in one process)."""
    path = make_hf_llama(
        tmp_path / "src",
        seed=11,
        rope_theta=500000.0,
        rope_scaling=dict(rope_type="linear", factor=4.0),
    )
    input_ids = torch.randint(0, 512, (2, 40), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = LlamaForCausalLM.from_pretrained(path).eval()(input_ids).logits
    raw = json.loads((path / "config.json").read_text())
    five = dict(raw)
    if "rope_parameters" not in five:  # written by 4.x: rewrite it in the form 5.x writes
        five["rope_parameters"] = {**five.pop("rope_scaling"), "rope_theta": five.pop("rope_theta")}
    portable = portable_config_dict(five)
    assert portable["rope_theta"] == 500000.0 and portable["rope_scaling"]["rope_type"] == "linear"
    assert config_from_dict(portable).to_dict() == config_from_dict(five).to_dict()
    for form in (five, portable):
        (path / "config.json").write_text(json.dumps(form))
        ours, _ = load_source_model(path)
        stock = LlamaForCausalLM.from_pretrained(path).eval()
        with torch.no_grad():
            torch.testing.assert_close(ours.eval()(input_ids), expected)
            if form is portable or TRANSFORMERS_5:  # stock 4.x ignores rope_parameters alone
                torch.testing.assert_close(stock(input_ids).logits, expected)


def test_pruned_config_inherits_rope_in_this_transformers_form(tmp_path):
    """The cut keeps theta and scaling (5.x: as rope_parameters, not through its deprecated rope_scaling
    alias), and the pruned config's RoPE dict is a copy: changing it leaves the source's alone."""
    model, config = load_source_model(
        make_hf_llama(
            tmp_path / "src", rope_theta=500000.0, rope_scaling={"rope_type": "linear", "factor": 4.0}
        )
    )
    inherited = _inherited_fields(config)
    assert ("rope_parameters" in inherited, "rope_scaling" in inherited) == (
        TRANSFORMERS_5,
        not TRANSFORMERS_5,
    )
    pruned = prune_model(model, unit_masks(config)).model.config
    rope = {
        k: v for k, v in portable_config_dict(pruned.to_dict()).items() if k in ("rope_theta", "rope_scaling")
    }
    assert rope == {"rope_theta": 500000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}}
    before = portable_config_dict(config.to_dict())
    field = "rope_parameters" if TRANSFORMERS_5 else "rope_scaling"
    getattr(pruned, field)["factor"] = 8.0
    assert portable_config_dict(config.to_dict()) == before
