"""Parity (a): with no masks, or every gate fixed at 1, our model's logits equal stock HF LLaMA's."""

import pytest
import torch
from tiny import make_hf_llama, unit_masks
from transformers import LlamaForCausalLM

from shearing.models.hf_io import load_source_model

CONFIGS = {
    "mha": dict(num_attention_heads=4, num_key_value_heads=4),
    "gqa": dict(num_attention_heads=8, num_key_value_heads=2),
    "tied": dict(num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True),
    "llama3_rope": dict(
        num_attention_heads=8,
        num_key_value_heads=4,
        rope_theta=500000.0,
        rope_scaling={
            "rope_type": "llama3",
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 32,
        },
    ),
}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_matches_hf_without_and_with_unit_masks(tmp_path, name):
    path = make_hf_llama(tmp_path, seed=1, **CONFIGS[name])
    hf = LlamaForCausalLM.from_pretrained(path).eval()
    ours, config = load_source_model(path)
    ours.eval()
    ones = unit_masks(config)
    input_ids = torch.randint(0, config.vocab_size, (2, 40))
    with torch.no_grad():
        expected = hf(input_ids).logits
        torch.testing.assert_close(ours(input_ids), expected)
        torch.testing.assert_close(ours(input_ids, masks=ones), expected)


def test_strict_load_rejects_mismatched_checkpoint(tmp_path):
    path = make_hf_llama(tmp_path, num_hidden_layers=2)
    config = (path / "config.json").read_text().replace('"num_hidden_layers": 2', '"num_hidden_layers": 3')
    (path / "config.json").write_text(config)
    with pytest.raises(ValueError, match="missing keys"):
        load_source_model(path)


def test_rejects_non_llama_directory(tmp_path):
    (tmp_path / "config.json").write_text('{"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}')
    with pytest.raises(ValueError, match="not a LLaMA-family checkpoint"):
        load_source_model(tmp_path)


def test_flash_path_gets_half_precision_inputs_under_autocast(monkeypatch):
    """flash-attn accepts only fp16/bf16: RoPE's fp32 q/k must be cast back under autocast."""
    import sys
    import types

    import torch.nn.functional as F

    from shearing.models import llama
    from shearing.models.hf_io import config_from_shape
    from shearing.models.shapes import named_shape

    seen = []

    def fake_flash(q, k, v, causal):  # B T H K, like flash_attn_func
        seen.append((q.dtype, k.dtype, v.dtype))
        assert {q.dtype, k.dtype, v.dtype} <= {torch.bfloat16, torch.float16}, (q.dtype, k.dtype, v.dtype)
        group = q.shape[2] // k.shape[2]
        k, v = k.repeat_interleave(group, dim=2), v.repeat_interleave(group, dim=2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal
        )
        return out.transpose(1, 2)

    monkeypatch.setitem(sys.modules, "flash_attn", types.SimpleNamespace(flash_attn_func=fake_flash))
    monkeypatch.setattr(llama, "flash_attn_available", lambda: True)
    torch.manual_seed(0)
    config = config_from_shape(named_shape("tiny_gqa"))
    flash = llama.MaskedLlamaForCausalLM(config, attn_impl="flash").eval()
    sdpa = llama.MaskedLlamaForCausalLM(config, attn_impl="sdpa").eval()
    sdpa.load_state_dict(flash.state_dict())
    ids = torch.randint(0, config.vocab_size, (2, 16))
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        out_flash, out_sdpa = flash(ids), sdpa(ids)
    assert len(seen) == config.num_hidden_layers
    torch.testing.assert_close(out_flash.float(), out_sdpa.float(), atol=2e-2, rtol=2e-2)
