"""The L0 module: which families a target needs, expected sizes, final masks, the Lagrangian's direction."""

import math

import pytest
import torch
from composer.optim import DecoupledAdamW
from tiny import TINY_TARGET

from shearing.models.shapes import LlamaShape, count_params, named_shape, resolve_target_shape
from shearing.pruning.l0 import L0Module, count_masked_params, plan_families

GQA = named_shape("tiny_gqa")  # 8 query heads over 4 KV groups
TARGET = TINY_TARGET


def randomize(l0: L0Module, seed: int = 0) -> None:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for log_alpha in l0.log_alphas.values():
            log_alpha.copy_(torch.rand(log_alpha.shape, generator=gen) * 8 - 4)


def test_families_follow_the_target():
    target = resolve_target_shape(GQA, TARGET)
    assert [s.name for s in plan_families(GQA, target)] == ["hidden", "kv_group", "intermediate", "layer"]
    # Fewer query heads per group, same KV heads: a grouped head mask, no KV mask.
    target = resolve_target_shape(GQA, {**TARGET, "num_attention_heads": 4, "num_key_value_heads": 4})
    specs = {s.name: s for s in plan_families(GQA, target)}
    assert "kv_group" not in specs and specs["head"].group == 2 and specs["head"].keep == 1
    assert specs["head"].target_sparsity == 0.5
    # A family whose target equals the source needs no mask.
    same_width = resolve_target_shape(GQA, {**GQA.prunable(), "num_hidden_layers": 2})
    assert [s.name for s in plan_families(GQA, same_width)] == ["layer"]


def test_target_needing_an_excluded_family_is_an_error():
    target = resolve_target_shape(GQA, TARGET)
    with pytest.raises(ValueError, match="add 'hidden'"):
        plan_families(GQA, target, ["head", "intermediate", "layer"])
    with pytest.raises(ValueError, match="add 'layer'"):
        plan_families(GQA, target, ["hidden", "head", "intermediate"])


@pytest.mark.parametrize(
    "change, message",
    [
        ({"hidden_size": 128}, "larger than the source"),
        ({"num_attention_heads": 6, "num_key_value_heads": 4}, "divisible"),
        ({"num_attention_heads": 8, "num_key_value_heads": 2}, "query heads per KV group"),
        ({"head_dim": 8}, "head_dim"),
        ({"hidden_sise": 48}, "unknown field"),
    ],
)
def test_invalid_targets_are_rejected(change, message):
    with pytest.raises(ValueError, match=message):
        resolve_target_shape(GQA, {**TARGET, **change})


def test_mha_source_requires_matching_kv_heads():
    mha = named_shape("tiny_mha")
    with pytest.raises(ValueError, match="multi-head attention"):
        resolve_target_shape(mha, {**TARGET, "num_attention_heads": 2, "num_key_value_heads": 1})


@pytest.mark.parametrize("tied", [False, True])
def test_expected_params_of_fresh_masks_is_the_source_size(tied):
    source = LlamaShape(64, 4, 8, 4, 176, 512, 16, tied)
    l0 = L0Module(source, resolve_target_shape(source, TARGET))
    ones = {name: torch.ones(spec.shape) for name, spec in l0.specs.items()}
    assert float(count_masked_params(source, ones)) == count_params(source)
    # Fresh masks keep every unit with probability ~0.998.
    assert abs(float(l0.expected_num_params()) / count_params(source) - 1) < 0.01


@pytest.mark.parametrize(
    "source_name, target, families",
    [
        ("tiny_gqa", TARGET, ["hidden", "head", "intermediate", "layer"]),
        ("tiny_gqa", {**TARGET, "num_key_value_heads": 4}, ["hidden", "head", "intermediate", "layer"]),
        (
            "tiny_mha",
            {**TARGET, "num_attention_heads": 2, "num_key_value_heads": 2},
            ["hidden", "head", "intermediate", "head_layer", "mlp"],
        ),
    ],
)
def test_final_masks_hit_the_target_exactly(source_name, target, families):
    source = named_shape(source_name)
    target_shape = resolve_target_shape(source, target)
    l0 = L0Module(source, target_shape, families)
    randomize(l0)
    masks = l0.deterministic_masks(exact=True)
    for name, spec in l0.specs.items():
        kept = (masks[f"{name}_z"] > 0).sum(-1)
        assert torch.all(kept == spec.kept_per_row), name
        if spec.group:  # GQA: the same number of query heads in every group
            per_group = (masks[f"{name}_z"] > 0).reshape(*spec.shape[:-1], -1, spec.group).sum(-1)
            assert torch.all(per_group == spec.keep)
    if "head_layer" in masks:
        assert torch.equal(masks["head_layer_z"] > 0, masks["mlp_z"] > 0)
    assert l0.final_num_params() == count_params(target_shape)


def test_eval_masks_use_the_expected_number_of_zeros():
    l0 = L0Module(GQA, resolve_target_shape(GQA, TARGET))
    randomize(l0, seed=3)
    masks = l0.deterministic_masks(exact=False)
    for name, p in l0.keep_probabilities().items():
        zeros = (masks[f"{name}_z"] == 0).sum(-1)
        assert torch.equal(zeros, torch.round(p.shape[-1] - p.sum(-1)).long())


def test_lagrangian_ascent_moves_lambda_and_pushes_sparsity_toward_target():
    l0 = L0Module(GQA, resolve_target_shape(GQA, TARGET))
    opt = DecoupledAdamW(
        [
            {"params": list(l0.log_alphas.parameters()), "lr": 0.5},
            {"params": list(l0.lambdas.parameters()), "lr": -0.5},
        ],
        lr=0.5,
    )
    before = {k: float(v.mean()) for k, v in l0.expected_sparsity().items()}
    for _ in range(30):
        opt.zero_grad()
        term, _ = l0.lagrangian(progress=1.0)
        term.backward()
        opt.step()
    after = {k: float(v.mean()) for k, v in l0.expected_sparsity().items()}
    for name in l0.specs:
        # Constraint violated (too dense): s - t < 0, so ascent drives lambda_1 negative ...
        assert float(l0.lambdas[f"{name}_1"]) < -0.5, name
        # ... and descent on the masks raises the expected sparsity toward the target.
        assert after[name] > before[name] + 0.01, name


def test_fresh_masks_after_a_training_forward_are_in_range_distinct_and_not_ordered_by_index():
    # The reference's init N(5, 0.01) is clamped to ln 100 by the first forward: every unit ties and
    # a final top-k that breaks ties by index keeps the last units. Ours stays inside the range.
    source = named_shape("llama2_7b")
    l0 = L0Module(source, resolve_target_shape(source, "llama2_2.7b"))
    l0.train()
    l0()
    l0.clamp_stored_() if hasattr(l0, "clamp_stored_") else None
    masks = l0.deterministic_masks(exact=True)
    for name, log_alpha in l0.log_alphas.items():
        values = log_alpha.detach()
        assert float(values.max()) <= math.log(100.0) + 1e-6, name
        # Distinct per row up to float32 resolution (spacing 4.8e-7 against a spread of 0.01: a row of
        # 11008 draws has ~15% collisions between neighbours, never the one-value tie of the reference).
        for row in values.reshape(-1, values.shape[-1]):
            assert row.unique().numel() > 0.75 * row.numel(), name
    kept = masks["hidden_z"] > 0  # 4096 -> 2560: with index ties the first 1536 channels would all go
    assert 0.55 < float(kept[:1536].float().mean()) < 0.7
    kept = masks["intermediate_z"] > 0  # 11008 -> 6912 per layer
    assert 0.55 < float(kept[:, :4096].float().mean()) < 0.7
