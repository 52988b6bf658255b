"""One-shot magnitude masks: exact target shape through ``prune_model``, and the largest units are kept."""

import pytest
import torch

from shearing.models.hf_io import load_source_model
from shearing.models.shapes import named_shape
from shearing.pruning.oneshot import oneshot_masks
from shearing.pruning.surgery import prune_model


def _small_weights(name: str) -> torch.nn.Module:
    model, _ = load_source_model(name)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(0.01)
    return model


@pytest.mark.parametrize("source,target", [("tiny_gqa", "tiny_gqa_pruned"), ("tiny_mha", "tiny_mha_pruned")])
def test_exact_target_shape(source, target):
    model, _ = load_source_model(source)
    masks = oneshot_masks(model, named_shape(target))
    result = prune_model(model, masks)
    assert result.shape.prunable() == named_shape(target).prunable()
    assert set(masks) == {"hidden_z", "head_z", "kv_group_z", "intermediate_z", "layer_z"}
    assert all(set(v.unique().tolist()) <= {0.0, 1.0} for v in masks.values())
    ids = torch.randint(0, 512, (2, 16))
    assert torch.isfinite(result.model(ids)).all()


def test_keeps_largest_units():
    # tiny_gqa: D 64, L 4, H 8 over G 4 (2 heads per group), K 16, F 176 -> D 48, L 3, H 2 over G 2, F 96.
    model = _small_weights("tiny_gqa")
    K = 16
    big_groups, big_heads = [1, 3], [3, 6]  # head 3 is in group 1, head 6 in group 3
    big_channels = [c for c in range(176) if c % 2 == 1][:80] + [
        0,
        2,
        4,
        6,
        8,
        10,
        12,
        14,
        16,
        18,
        20,
        22,
        24,
        26,
        28,
        30,
    ]
    big_hidden = list(range(16, 64))
    with torch.no_grad():
        for layer in model.model.layers:
            attn, mlp = layer.self_attn, layer.mlp
            for g in big_groups:
                attn.k_proj.weight[g * K : (g + 1) * K] = 1.0
            for h in big_heads:
                attn.q_proj.weight[h * K : (h + 1) * K] = 0.5
            mlp.up_proj.weight[big_channels] = 1.0
        model.model.embed_tokens.weight[:, big_hidden] = 1.0
    # one query head per kept group, so the choice inside a group is tested too
    target = {**named_shape("tiny_gqa_pruned").prunable(), "num_attention_heads": 2}
    masks = oneshot_masks(model, target)
    assert torch.equal(masks["layer_z"], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    for i in range(4):
        assert torch.nonzero(masks["kv_group_z"][i]).flatten().tolist() == big_groups
        assert torch.nonzero(masks["head_z"][i]).flatten().tolist() == big_heads
        assert torch.nonzero(masks["intermediate_z"][i]).flatten().tolist() == sorted(big_channels)
    assert torch.nonzero(masks["hidden_z"]).flatten().tolist() == big_hidden
    result = prune_model(model, masks)
    assert result.shape.prunable() == target
    assert result.kept["layers"][0]["heads"] == big_heads
    assert result.kept["layers"][0]["kv_heads"] == big_groups


def test_bad_target():
    model, _ = load_source_model("tiny_gqa")
    target = {**named_shape("tiny_gqa_pruned").prunable(), "num_attention_heads": 6, "num_key_value_heads": 2}
    with pytest.raises(ValueError, match="query heads per KV group"):
        oneshot_masks(model, target)
    with pytest.raises(ValueError, match="between 1 and"):
        oneshot_masks(model, {**named_shape("tiny_gqa_pruned").prunable(), "hidden_size": 65})


def _scores_favouring(big_groups, big_heads, big_channels, big_hidden, top_layers):
    """Activation-style scores (the dict activation_importance returns) that make the given units the best."""
    L, H, G, F, D = 4, 8, 4, 176, 64
    scores = {
        "hidden": torch.rand(D) * 0.1,
        "head": torch.rand(L, H) * 0.1,
        "kv_group": torch.rand(L, G) * 0.1,
        "intermediate": torch.rand(L, F) * 0.1,
        "layer": torch.rand(L) * 0.1,
        "head_layer": torch.rand(L),  # not used by one-shot
        "mlp": torch.rand(L),
    }
    scores["hidden"][big_hidden] += 1.0
    scores["head"][:, big_heads] += 1.0
    scores["kv_group"][:, big_groups] += 1.0
    scores["intermediate"][:, big_channels] += 1.0
    scores["layer"][top_layers] += 1.0
    return scores


def test_activation_scores_choose_the_units_and_the_layers():
    # The weights favour other units (magnitude would keep groups 1, 3 and the first 3 layers).
    model = _small_weights("tiny_gqa")
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.k_proj.weight[16:32] = 1.0
            layer.self_attn.k_proj.weight[48:64] = 1.0
    torch.manual_seed(0)
    big_groups, big_heads = [0, 2], [1, 4]  # head 1 is in group 0, head 4 in group 2
    big_channels = list(range(40, 136))
    big_hidden = list(range(0, 48))
    top_layers = [0, 2, 3]  # not "the first three": layer 1 is the least important
    scores = _scores_favouring(big_groups, big_heads, big_channels, big_hidden, top_layers)
    target = {**named_shape("tiny_gqa_pruned").prunable(), "num_attention_heads": 2}
    masks = oneshot_masks(model, target, scores=scores)
    assert torch.equal(masks["layer_z"], torch.tensor([1.0, 0.0, 1.0, 1.0]))
    for i in range(4):
        assert torch.nonzero(masks["kv_group_z"][i]).flatten().tolist() == big_groups
        assert torch.nonzero(masks["head_z"][i]).flatten().tolist() == big_heads
        assert torch.nonzero(masks["intermediate_z"][i]).flatten().tolist() == big_channels
    assert torch.nonzero(masks["hidden_z"]).flatten().tolist() == big_hidden
    result = prune_model(model, masks)
    assert result.shape.prunable() == target
    assert result.kept["layers"][0]["heads"] == big_heads
    magnitude = oneshot_masks(model, target)
    assert torch.equal(magnitude["layer_z"], torch.tensor([1.0, 1.0, 1.0, 0.0]))
    assert torch.nonzero(magnitude["kv_group_z"][0]).flatten().tolist() == [1, 3]


def test_activation_scores_from_a_real_forward_prune_to_the_target():
    from shearing.pruning.importance import activation_importance

    model, _ = load_source_model("tiny_gqa")
    scores = activation_importance(model, [torch.randint(0, 512, (4, 16))])
    masks = oneshot_masks(model, named_shape("tiny_gqa_pruned"), scores=scores)
    assert prune_model(model, masks).shape.prunable() == named_shape("tiny_gqa_pruned").prunable()
    keep = torch.topk(scores["layer"], 3).indices.sort().values
    assert torch.nonzero(masks["layer_z"]).flatten().tolist() == keep.tolist()


def test_bad_scores():
    model, _ = load_source_model("tiny_gqa")
    target = named_shape("tiny_gqa_pruned")
    scores = _scores_favouring([0, 1], [0, 2], [0], [0], [0])
    with pytest.raises(ValueError, match=r"lack \['layer'\]"):
        oneshot_masks(model, target, scores={k: v for k, v in scores.items() if k != "layer"})
    with pytest.raises(ValueError, match="'head' have shape"):
        oneshot_masks(model, target, scores={**scores, "head": torch.rand(4, 9)})
    with pytest.raises(ValueError, match="not finite"):
        oneshot_masks(model, target, scores={**scores, "hidden": torch.full((64,), float("nan"))})
