"""Parity (b): the masked model under final masks equals the physically pruned one, for every family."""

import pytest
import torch

from shearing.models.hf_io import load_source_model
from shearing.models.shapes import count_params, named_shape, resolve_target_shape
from shearing.pruning.l0 import L0Module
from shearing.pruning.surgery import prune_model

FULL = {
    "hidden_size": 64,
    "num_hidden_layers": 4,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "intermediate_size": 176,
}
CASES = {
    "hidden": {"hidden_size": 40},
    "head": {"num_attention_heads": 4},  # one query head per KV group
    "kv_group": {"num_attention_heads": 4, "num_key_value_heads": 2},
    "intermediate": {"intermediate_size": 100},
    "layer": {"num_hidden_layers": 2},
    "all": {
        "hidden_size": 48,
        "num_hidden_layers": 3,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 96,
    },
}


def pruned_pair(source_name: str, target: dict, families, tied: bool = False, seed: int = 0):
    model, config = load_source_model(source_name, seed=seed)
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
        config.tie_word_embeddings = True
    model.eval()
    source = named_shape(source_name)
    if tied:
        from dataclasses import replace

        source = replace(source, tie_word_embeddings=True)
    target_shape = resolve_target_shape(source, target)
    l0 = L0Module(source, target_shape, families)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for log_alpha in l0.log_alphas.values():
            log_alpha.copy_(torch.rand(log_alpha.shape, generator=gen) * 6 - 2)
    l0.eval()
    l0.use_final_masks = True
    return model, l0(), target_shape


def assert_pruned_matches(model, masks, target_shape):
    result = prune_model(model, masks)
    assert result.shape == target_shape
    assert sum(p.numel() for p in result.model.parameters()) == count_params(target_shape)
    input_ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(input_ids), model(input_ids, masks=masks))


@pytest.mark.parametrize("case", sorted(CASES))
def test_masked_equals_pruned_gqa(case):
    target = {**FULL, **CASES[case]}
    model, masks, target_shape = pruned_pair("tiny_gqa", target, ["hidden", "head", "intermediate", "layer"])
    assert_pruned_matches(model, masks, target_shape)


@pytest.mark.parametrize("tied", [False, True])
def test_masked_equals_pruned_mha_with_block_masks(tied):
    target = {
        "hidden_size": 40,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "intermediate_size": 64,
    }
    model, masks, target_shape = pruned_pair(
        "tiny_mha", target, ["hidden", "head", "intermediate", "head_layer", "mlp"], tied=tied
    )
    assert_pruned_matches(model, masks, target_shape)


def test_uneven_masks_are_rejected():
    model, masks, _ = pruned_pair("tiny_gqa", {**FULL, "intermediate_size": 100}, ["intermediate"])
    masks["intermediate_z"][0, :5] = 0  # layer 0 now keeps fewer channels than the others
    with pytest.raises(ValueError, match="different number"):
        prune_model(model, masks)


@pytest.mark.parametrize("case", sorted(CASES))
def test_export_has_the_planned_shape_and_size(case, tmp_path):
    """Each family alone and all together: the exported HF config and size are what `plan` predicts."""
    import json

    from transformers import AutoModelForCausalLM

    from shearing.composer.model import ComposerShearedLlama
    from shearing.export.hf import export_model_state

    target = {**FULL, **CASES[case]}
    model, masks, target_shape = pruned_pair("tiny_gqa", target, ["hidden", "head", "intermediate", "layer"])
    l0 = L0Module(named_shape("tiny_gqa"), target_shape)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for log_alpha in l0.log_alphas.values():
            log_alpha.copy_(torch.rand(log_alpha.shape, generator=gen) * 6 - 2)
    meta = {
        "hf_config": model.config.to_dict(),
        "target": target_shape.prunable(),
        "families": ["hidden", "head", "intermediate", "layer"],
        "tokenizer": None,
    }
    composer_model = ComposerShearedLlama(model, l0=l0, metadata=meta)
    # Random mask logits are not a converged run: the gate would refuse them, so this checks the cut with force.
    summary = export_model_state(composer_model.state_dict(), tmp_path / "hf", force=True)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert {k: config[k] for k in target} == target
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    assert (
        sum(p.numel() for p in hf.parameters())
        == count_params(target_shape)
        == summary["target"]["num_params"]
    )
    l0.eval()
    l0.use_final_masks = True
    input_ids = torch.randint(0, 512, (2, 24))
    with torch.no_grad():
        torch.testing.assert_close(hf(input_ids).logits, model(input_ids, masks=l0()))
