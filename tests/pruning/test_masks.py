"""The Masks value: one place resolves the L0 families into gates; the model, surgery and counts agree."""

import pytest
import torch
from tiny import unit_masks

from shearing.models.hf_io import config_from_shape
from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.models.masks import Masks, count_masked_params
from shearing.models.shapes import count_params, named_shape
from shearing.pruning.l0 import count_masked_params as l0_count_masked_params


def test_kv_group_folds_into_heads_and_is_kept():
    head = torch.rand(2, 8)
    kv = torch.tensor([[1.0, 0.0, 0.5, 1.0], [0.0, 1.0, 1.0, 0.25]])
    masks = Masks.from_families({"head_z": head, "kv_group_z": kv}, group_size=2)
    expected = head * torch.tensor([[1, 1, 0, 0, 0.5, 0.5, 1, 1], [0, 0, 1, 1, 1, 1, 0.25, 0.25]])
    torch.testing.assert_close(masks.head, expected, rtol=0, atol=0)
    assert masks.kv is kv
    # kv_group alone: the heads are the group gate repeated
    alone = Masks.from_families({"kv_group": kv}, group_size=2)
    torch.testing.assert_close(alone.head, kv.repeat_interleave(2, dim=-1), rtol=0, atol=0)
    assert Masks.from_families({"head": head}, group_size=2).kv is None


def test_layer_sets_both_block_gates_and_pair_sets_each():
    layer = torch.tensor([1.0, 0.0, 0.7])
    masks = Masks.from_families({"layer_z": layer, "hidden": torch.ones(4)}, group_size=1)
    assert masks.attn is layer and masks.mlp is layer
    attn, mlp = torch.tensor([1.0, 0.0, 0.3]), torch.tensor([0.5, 0.0, 1.0])
    pair = Masks.from_families({"head_layer_z": attn, "mlp_z": mlp}, group_size=1)
    assert pair.attn is attn and pair.mlp is mlp
    assert pair.hidden is None and pair.head is None and pair.intermediate is None


def test_bad_family_dicts_are_refused():
    with pytest.raises(ValueError, match="unknown mask family 'heads_z'"):
        Masks.from_families({"heads_z": torch.ones(2)}, group_size=1)
    with pytest.raises(ValueError, match="given twice"):
        Masks.from_families({"hidden": torch.ones(2), "hidden_z": torch.ones(2)}, group_size=1)
    with pytest.raises(ValueError, match="not both"):
        Masks.from_families({"layer": torch.ones(2), "mlp_z": torch.ones(2)}, group_size=1)
    with pytest.raises(TypeError, match="Masks or a mapping"):
        Masks.coerce([torch.ones(2)], group_size=1)


def test_layer_gates_and_map():
    masks = Masks.from_families(
        {"head": torch.rand(3, 4), "intermediate": torch.rand(3, 5), "layer": torch.rand(3)}, group_size=1
    )
    head, intermediate, attn, mlp = masks.layer(1)
    assert torch.equal(head, masks.head[1]) and torch.equal(intermediate, masks.intermediate[1])
    assert torch.equal(attn, masks.attn[1]) and torch.equal(mlp, masks.mlp[1])
    doubled = masks.map(lambda z: z * 2)
    assert torch.equal(doubled.head, masks.head * 2) and doubled.hidden is None


def test_forward_takes_masks_or_family_dict_identically():
    config = config_from_shape(named_shape("tiny_gqa"))
    torch.manual_seed(0)
    model = MaskedLlamaForCausalLM(config).eval()
    raw = {k: torch.rand_like(v) for k, v in unit_masks(config).items()}
    ids = torch.randint(0, config.vocab_size, (2, 12))
    with torch.no_grad():
        from_dict = model(ids, masks=raw)
        from_value = model(ids, masks=Masks.from_families(raw, group_size=2))
        hidden = model.hidden_states(ids, masks=raw)
    assert torch.equal(from_dict, from_value)
    assert hidden.shape == (2, 12, config.hidden_size)
    assert torch.equal(model.lm_head(hidden), from_dict)


def test_count_masked_params_exact_with_indicators():
    source = named_shape("tiny_gqa")  # 8 heads over 4 groups
    target = named_shape("tiny_gqa_pruned")  # 48 hidden, 3 layers, 4 heads over 2 groups, 96 MLP
    L = source.num_hidden_layers
    hidden = torch.zeros(64)
    hidden[:48] = 1
    kv = torch.zeros(L, 4)
    kv[:, [0, 3]] = 1
    head = torch.zeros(L, 8)
    head[:, [0, 1, 6, 7]] = 1  # both heads of groups 0 and 3
    intermediate = torch.zeros(L, 176)
    intermediate[:, :96] = 1
    layer = torch.tensor([1.0, 1.0, 0.0, 1.0])
    keep = {"hidden": hidden, "head": head, "kv_group": kv, "intermediate": intermediate, "layer": layer}
    assert float(count_masked_params(source, keep)) == count_params(target)
    assert float(count_masked_params(source, Masks.from_families(keep, 2))) == count_params(target)
    assert l0_count_masked_params is count_masked_params
    # with q/k/v biases the count follows the same masks
    biased_source = source.__class__(**{**source.to_dict(), "qkv_bias": True})
    biased_target = target.__class__(**{**target.to_dict(), "qkv_bias": True})
    assert float(count_masked_params(biased_source, keep)) == count_params(biased_target)
    assert count_params(biased_target) - count_params(target) == 3 * (4 + 2 * 2) * 16
