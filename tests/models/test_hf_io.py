"""Loading a source checkpoint reads exactly the files ``transformers.from_pretrained`` reads.

Mistral-style folders ship a ``consolidated.safetensors`` (the same weights under the original names)
next to the HF files; the loader must ignore it, as HF does, whether the HF weights are one file or
shards named by ``model.safetensors.index.json``. Damaged files are errors naming the file.
"""

import json

import pytest
import torch
from safetensors.torch import save_file
from tiny import make_hf_llama
from transformers import LlamaForCausalLM

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


def test_sharded_pytorch_bin(tmp_path):
    path = make_hf_llama(tmp_path / "src", seed=4)
    hf = LlamaForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    hf.save_pretrained(path, max_shard_size="200KB", safe_serialization=False)
    assert (path / "pytorch_model.bin.index.json").is_file()
    assert_same_logits(path)


def test_index_naming_a_missing_shard(tmp_path):
    path = make_hf_llama(tmp_path / "src", seed=5)
    hf = LlamaForCausalLM.from_pretrained(path)
    (path / "model.safetensors").unlink()
    hf.save_pretrained(path, max_shard_size="200KB")
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
