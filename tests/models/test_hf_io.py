"""Loading a source checkpoint reads exactly the files ``transformers.from_pretrained`` reads.

Mistral-style folders ship a ``consolidated.safetensors`` (the same weights under the original names)
next to the HF files; the loader must ignore it, as HF does, whether the HF weights are one file or
shards named by ``model.safetensors.index.json``. Damaged files are errors naming the file.
"""

import inspect
import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import make_hf_llama
from transformers import LlamaConfig, LlamaForCausalLM

from shearing.models.hf_io import load_source_model

MISTRAL_NAMES = {
    "model.embed_tokens.": "tok_embeddings.",
    "model.norm.": "norm.",
    "lm_head.": "output.",
    "self_attn.q_proj": "attention.wq",
    "self_attn.k_proj": "attention.wk",
    "self_attn.v_proj": "attention.wv",
    "self_attn.o_proj": "attention.wo",
    "mlp.gate_proj": "feed_forward.w1",
    "mlp.down_proj": "feed_forward.w2",
    "mlp.up_proj": "feed_forward.w3",
    "input_layernorm": "attention_norm",
    "post_attention_layernorm": "ffn_norm",
    "model.layers.": "layers.",
}


def mistral_consolidated(hf: LlamaForCausalLM) -> dict[str, torch.Tensor]:
    """The model's weights under Mistral's original (``consolidated.safetensors``) names."""
    out = {}
    for key, tensor in hf.state_dict().items():
        for old, new in MISTRAL_NAMES.items():
            key = key.replace(old, new)
        out[key] = tensor.clone().contiguous()
    return out


def assert_same_logits(path):
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    ours, config = load_source_model(path)
    ours.eval()
    input_ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids), hf(input_ids).logits)


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_stray_consolidated_safetensors_is_ignored(tmp_path, sharded):
    path = make_hf_llama(tmp_path / "src", seed=3)
    hf = LlamaForCausalLM.from_pretrained(path)
    if sharded:
        (path / "model.safetensors").unlink()
        hf.save_pretrained(path, max_shard_size="200KB")
        assert (path / "model.safetensors.index.json").is_file()
        assert len(list(path.glob("model-*-of-*.safetensors"))) > 1
    save_file(mistral_consolidated(hf), str(path / "consolidated.safetensors"))
    assert_same_logits(path)

    from shearing.models.hf_io import hf_weight_files

    names = [f.name for f in hf_weight_files(path)]
    assert "consolidated.safetensors" not in names and (len(names) > 1) == sharded


@pytest.mark.parametrize("sharded", [True, False], ids=["sharded", "single"])
def test_pytorch_bin(tmp_path, sharded):
    """The .bin layouts transformers 4.x writes (5.x reads them but no longer writes them: written here with
    huggingface_hub, as 4.51's save_pretrained(safe_serialization=False) does)."""
    from huggingface_hub import save_torch_state_dict

    path = make_hf_llama(tmp_path / "src", seed=4)
    hf = LlamaForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    save_torch_state_dict(
        hf.state_dict(), path, safe_serialization=False, max_shard_size="200KB" if sharded else "5GB"
    )
    assert (path / "pytorch_model.bin.index.json").is_file() == sharded
    assert (path / "pytorch_model.bin").is_file() != sharded
    assert_same_logits(path)


def test_what_this_transformers_save_pretrained_writes(tmp_path):
    """Whatever layout the installed ``save_pretrained(safe_serialization=False)`` writes is read: 4.51 a
    ``pytorch_model.bin`` (+ index when sharded), 5.x safetensors (it ignores the flag)."""
    path = make_hf_llama(tmp_path / "src", seed=4)
    hf = LlamaForCausalLM.from_pretrained(path)
    for kwargs in (dict(), dict(max_shard_size="200KB")):
        out = tmp_path / f"saved{len(kwargs)}"
        hf.save_pretrained(out, safe_serialization=False, **kwargs)
        assert_same_logits(out)


def sharded_safetensors(path):
    """A tiny HF folder whose weights are safetensors shards named by model.safetensors.index.json."""
    path = make_hf_llama(path, seed=5)
    hf = LlamaForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    hf.save_pretrained(path, max_shard_size="200KB")
    return path


def test_shards_without_their_index(tmp_path):
    path = sharded_safetensors(tmp_path / "src")
    (path / "model.safetensors.index.json").unlink()
    with pytest.raises(
        ValueError,
        match=r"has shard files \(model-00001-of-0000\d.safetensors, .*\) but not their "
        r"model.safetensors.index.json, which says which tensor is in which shard",
    ):
        load_source_model(path)


def _logits(model, vocab_size):
    input_ids = torch.randint(0, vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.eval()(input_ids)
    return getattr(out, "logits", out)


def test_transformers_weights_names_the_file(tmp_path):
    """transformers 5 reads the file config.json's ``transformers_weights`` names; so does the loader."""
    path = make_hf_llama(tmp_path / "src", seed=9)
    expected = _logits(LlamaForCausalLM.from_pretrained(path), 512)
    (path / "model.safetensors").rename(path / "custom.safetensors")
    config = json.loads((path / "config.json").read_text())
    for name, error in (
        ("../elsewhere.safetensors", "must name a .safetensors or .safetensors.index.json file inside"),
        ("custom.bin", "must name a .safetensors or .safetensors.index.json file inside"),
        ("gone.safetensors", r"transformers_weights='gone.safetensors' but .*gone.safetensors is not there"),
    ):
        (path / "config.json").write_text(json.dumps({**config, "transformers_weights": name}))
        with pytest.raises(ValueError, match=error):
            load_source_model(path)
    (path / "config.json").write_text(json.dumps({**config, "transformers_weights": "custom.safetensors"}))
    ours, _ = load_source_model(path)
    torch.testing.assert_close(_logits(ours, 512), expected)


LLAMA3_ROPE = dict(
    rope_type="llama3",
    factor=8.0,
    low_freq_factor=1.0,
    high_freq_factor=4.0,
    original_max_position_embeddings=128,
)


def as_transformers5_config(path, **extra):
    """Rewrite ``path``'s config.json in the form transformers 5 writes: ``rope_parameters`` (theta inside)
    instead of ``rope_theta``/``rope_scaling``, ``dtype`` instead of ``torch_dtype``."""
    raw = json.loads((path / "config.json").read_text())
    if "rope_parameters" not in raw:
        raw["rope_parameters"] = {**(raw.pop("rope_scaling") or {"rope_type": "default"})}
        raw["rope_parameters"]["rope_theta"] = raw.pop("rope_theta")
        raw["dtype"] = raw.pop("torch_dtype")
    (path / "config.json").write_text(json.dumps({**raw, **extra}))
    return raw


def test_transformers5_rope_parameters_are_read(tmp_path):
    """A source saved by transformers 5 keeps its RoPE (theta 500000, llama3 scaling) under 4.x, which
    ignores ``rope_parameters`` and would fall back to theta 10000: same logits as stock HF on the original."""
    path = make_hf_llama(tmp_path / "src", seed=10, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)
    expected = _logits(LlamaForCausalLM.from_pretrained(path), 512)
    raw = as_transformers5_config(path)
    assert raw["rope_parameters"]["rope_theta"] == 500000.0 and "rope_theta" not in raw
    ours, _ = load_source_model(path)
    torch.testing.assert_close(_logits(ours, 512), expected)


@pytest.mark.skipif(
    "rope_parameters" in inspect.signature(LlamaConfig.__init__).parameters,
    reason="transformers 5 reads rope_parameters itself",
)
def test_rope_parameters_that_disagree_with_rope_theta(tmp_path):
    path = make_hf_llama(tmp_path / "src", seed=10, rope_theta=500000.0)
    as_transformers5_config(path, rope_theta=10000.0)
    with pytest.raises(ValueError, match=r"rope_parameters .* and rope_theta=10000.0, which disagree"):
        load_source_model(path)


def test_index_naming_a_missing_shard(tmp_path):
    path = sharded_safetensors(tmp_path / "src")
    shard = sorted(json.loads((path / "model.safetensors.index.json").read_text())["weight_map"].values())[-1]
    (path / shard).unlink()
    with pytest.raises(
        ValueError, match=rf"model.safetensors.index.json names shard file\(s\) that are not there.*{shard}"
    ):
        load_source_model(path)


def test_truncated_shard_names_the_file(tmp_path):
    path = make_hf_llama(tmp_path / "src", seed=6)
    blob = (path / "model.safetensors").read_bytes()
    (path / "model.safetensors").write_bytes(blob[:-100])
    with pytest.raises(
        ValueError, match=r"model.safetensors is not a readable safetensors file \(it is truncated"
    ):
        load_source_model(path)


def test_folder_without_hf_weights(tmp_path):
    path = make_hf_llama(tmp_path / "src", seed=7)
    (path / "model.safetensors").rename(path / "consolidated.safetensors")
    with pytest.raises(ValueError, match=r"holds none of model.safetensors, model.safetensors.index.json"):
        load_source_model(path)


def _poison(path, key="model.layers.1.mlp.up_proj.weight"):
    """Rewrite the folder's model.safetensors with 2 NaN and 1 inf in tensor ``key``."""
    from safetensors.torch import load_file

    state = load_file(path / "model.safetensors")
    flat = state[key].view(-1)
    flat[3], flat[7], flat[11] = float("nan"), float("nan"), float("inf")
    save_file(state, str(path / "model.safetensors"), metadata={"format": "pt"})
    return key


NONFINITE = (
    r"weight file .*model.safetensors holds non-finite weights: model.layers.1.mlp.up_proj.weight "
    r"\(2 NaN and 1 inf of 11,264 values\)\. The checkpoint is damaged, or was saved in a dtype its values "
    r"overflowed .*Download it again, or re-convert it"
)


def test_nonfinite_weight_names_file_tensor_and_counts(tmp_path):
    path = make_hf_llama(tmp_path / "src", seed=8)
    _poison(path)
    with pytest.raises(ValueError, match=NONFINITE):
        load_source_model(path)
    from shearing.distill import build_teacher

    with pytest.raises(ValueError, match=NONFINITE):  # the distillation teacher loads the same way
        build_teacher(path)


def test_nonfinite_weight_after_from_pretrained(tmp_path):
    """``check_model_finite``: the same check for a model stock ``from_pretrained`` loaded (evaluation)."""
    from shearing.models.hf_io import check_model_finite

    path = make_hf_llama(tmp_path / "src", seed=8)
    check_model_finite(LlamaForCausalLM.from_pretrained(path), path)
    _poison(path)
    with pytest.raises(
        ValueError, match=r"model.safetensors \(loaded as torch.float32\) holds non-finite weights"
    ):
        check_model_finite(LlamaForCausalLM.from_pretrained(path), path)
    with pytest.raises(ValueError, match=r"loaded as torch.float16.*the cast to float16 overflowed"):
        check_model_finite(LlamaForCausalLM.from_pretrained(path, torch_dtype=torch.float16), path)


def test_evaluate_names_a_nonfinite_model_before_evaluating(tmp_path, tokenizer_dir, tiny_data, capsys):
    """``shearing.evaluate`` loads with stock ``from_pretrained``: the tensor is named, exit 2, no results."""
    from shearing.evaluate import main

    path = make_hf_llama(tmp_path / "src", tokenizer_dir, seed=8)
    _poison(path)
    out = tmp_path / "results.json"
    with pytest.raises(SystemExit) as exited:  # a refusal: one message, exit 2 (shearing.refusals)
        main(["--model", str(path), "--data", str(tiny_data / "eval"), "--output", str(out)])
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "model.layers.1.mlp.up_proj.weight (2 NaN and 1 inf of 11,264 values)" in err
    assert not out.exists()


def test_prune_run_from_a_nonfinite_source_stops_before_reference_losses(
    tmp_path, tokenizer_dir, tiny_data, monkeypatch
):
    """prune_tiny computes the source's reference losses before training; a poisoned source must be named
    at load, not surface as a non-finite reference loss or a diverged step."""
    from tiny import run_overrides

    import shearing.reference_losses
    from shearing.train import train_from_yaml

    path = make_hf_llama(tmp_path / "src", tokenizer_dir, seed=8)
    _poison(path)
    calls = []
    monkeypatch.setattr(shearing.reference_losses, "domain_eval_losses", lambda *a, **k: calls.append(a))
    run = tmp_path / "run"
    with pytest.raises(ValueError, match=NONFINITE):
        train_from_yaml("yamls/testing/prune_tiny.yaml", run_overrides(path, tiny_data, run))
    assert calls == []  # reference losses never computed
    assert not list(run.glob("**/*.pt"))  # no training step, no checkpoint
