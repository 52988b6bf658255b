"""One-shot pruning into an exact target shape: the structured baseline without any training.

``oneshot_masks(model, target_shape, scores=None)`` returns 0/1 masks in the format ``prune_model``
takes. Without ``scores`` they come from the weights alone (``magnitude_scores``: no data, no
gradients); with ``scores`` (``shearing.pruning.importance.activation_importance``: one forward pass
over calibration data) from activations. The same top-k rules either way:

- ``layer_z`` [L]: magnitude: the first L_t layers (depth is kept from the bottom: the usual
  layer-drop baseline); activation scores: the L_t layers with the largest ``layer`` score (the ones
  that turn the residual stream most), in their original order;
- ``kv_group_z`` [L, G] and ``head_z`` [L, H]: per layer, the G_t KV groups with the largest score,
  then inside every kept group the H_t / G_t query heads with the largest score. Keeping whole groups
  and the same number of heads in each is what makes the result a valid GQA model; with MHA (group
  size 1) this is simply the top H_t heads;
- ``intermediate_z`` [L, F]: per layer, the F_t channels with the largest score;
- ``hidden_z`` [D]: the D_t residual channels with the largest score.

Magnitude scores are the L2 norm of all the weights a unit owns (squared norms summed, then rooted):
a head's q rows and ``o_proj`` columns; a KV group's k/v rows plus its heads' weights; an MLP
channel's gate row, up row and ``down_proj`` column; a hidden channel's every weight that reads or
writes it (embedding and LM-head columns, q/k/v/gate/up input columns, ``o_proj``/``down_proj`` output
rows, norm weights) across all layers. Ties go to the lower index (a stable sort). Rows of dropped
layers get top-k masks too, so every row has exactly the target count; ``prune_model`` ignores them.
The kept units are gated by 1.0: nothing is rescaled, which is the plain one-shot baseline the paper
compares against (LLM-Pruner-style importance without the gradient term).

Shape legend: D hidden, L layers, H query heads, G KV groups, K head_dim, F MLP width.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from shearing.models.shapes import PRUNABLE_FIELDS, LlamaShape, shape_from_hf_config


def _top_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """0/1 mask over the last axis keeping the k largest scores of each row (stable: lower index wins ties)."""
    order = torch.sort(scores, dim=-1, descending=True, stable=True).indices[..., :k]
    return torch.zeros_like(scores).scatter_(-1, order, 1.0)


def _target_fields(target_shape: LlamaShape | Mapping[str, int]) -> dict[str, int]:
    if isinstance(target_shape, LlamaShape):
        return target_shape.prunable()
    missing = [name for name in PRUNABLE_FIELDS if name not in target_shape]
    if missing:
        raise ValueError(f"target shape lacks {missing}; give all of {list(PRUNABLE_FIELDS)}")
    return {name: int(target_shape[name]) for name in PRUNABLE_FIELDS}


def _check_target(source: LlamaShape, target: dict[str, int]) -> None:
    for name, value in target.items():
        if not 0 < value <= getattr(source, name):
            raise ValueError(
                f"target {name}={value} must be between 1 and the source's {getattr(source, name)}"
            )
    heads, groups = target["num_attention_heads"], target["num_key_value_heads"]
    if heads % groups:
        raise ValueError(
            f"target num_attention_heads ({heads}) must be divisible by num_key_value_heads ({groups})"
        )
    if heads // groups > source.group_size:
        raise ValueError(
            f"target keeps {heads // groups} query heads per KV group but the source groups hold only "
            f"{source.group_size}: keep more KV groups"
        )


ONESHOT_SCORES = ("hidden", "head", "kv_group", "intermediate")


@torch.no_grad()
def magnitude_scores(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Weight-norm scores (module docstring) as squared norms (the same order, no rounding from a root):
    ``hidden`` [D], ``head`` [L, H], ``kv_group`` [L, G], ``intermediate`` [L, F], on the CPU in fp32."""
    source = shape_from_hf_config(model.config)
    L, H, G, K = (
        source.num_hidden_layers,
        source.num_attention_heads,
        source.num_key_value_heads,
        source.head_dim,
    )
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}

    def sq(name: str) -> torch.Tensor:
        return state[name] ** 2

    hidden_sq = sq("model.embed_tokens.weight").sum(0) + sq("model.norm.weight")
    if "lm_head.weight" in state and not source.tie_word_embeddings:
        hidden_sq = hidden_sq + sq("lm_head.weight").sum(0)
    head_sq = torch.zeros(L, H)
    group_sq = torch.zeros(L, G)
    intermediate_sq = torch.zeros(L, source.intermediate_size)
    for i in range(L):
        p = f"model.layers.{i}."
        q, k, v = (sq(p + f"self_attn.{n}_proj.weight") for n in "qkv")
        o = sq(p + "self_attn.o_proj.weight")
        gate, up, down = (sq(p + f"mlp.{n}_proj.weight") for n in ("gate", "up", "down"))
        # [H·K, D] rows per head and [D, H·K] columns per head -> [H]
        head_sq[i] = q.sum(1).view(H, K).sum(1) + o.sum(0).view(H, K).sum(1)
        group_sq[i] = (k.sum(1) + v.sum(1)).view(G, K).sum(1) + head_sq[i].view(G, H // G).sum(1)
        intermediate_sq[i] = gate.sum(1) + up.sum(1) + down.sum(0)
        hidden_sq += (q.sum(0) + k.sum(0) + v.sum(0) + gate.sum(0) + up.sum(0)) + o.sum(1) + down.sum(1)
        hidden_sq += sq(p + "input_layernorm.weight") + sq(p + "post_attention_layernorm.weight")
    return {"hidden": hidden_sq, "head": head_sq, "kv_group": group_sq, "intermediate": intermediate_sq}


def _check_scores(source: LlamaShape, scores: Mapping[str, torch.Tensor]) -> None:
    L, F = source.num_hidden_layers, source.intermediate_size
    shapes = {
        "hidden": (source.hidden_size,),
        "head": (L, source.num_attention_heads),
        "kv_group": (L, source.num_key_value_heads),
        "intermediate": (L, F),
        "layer": (L,),
    }
    missing = [name for name in shapes if name not in scores]
    if missing:
        raise ValueError(
            f"one-shot scores lack {missing}: pass the dict activation_importance returns (it has all of "
            f"{list(shapes)}), or scores=None for magnitude pruning"
        )
    for name, shape in shapes.items():
        if tuple(scores[name].shape) != shape:
            raise ValueError(
                f"one-shot scores {name!r} have shape {tuple(scores[name].shape)}, the model needs {shape}: "
                "the scores come from another model"
            )
        if not bool(torch.isfinite(scores[name]).all()):
            raise ValueError(f"one-shot scores {name!r} are not finite: the calibration forward diverged")


@torch.no_grad()
def oneshot_masks(
    model: torch.nn.Module,
    target_shape: LlamaShape | Mapping[str, int],
    scores: Mapping[str, torch.Tensor] | None = None,
) -> dict[str, torch.Tensor]:
    """0/1 masks (``hidden_z``, ``head_z``, ``kv_group_z``, ``intermediate_z``, ``layer_z``) selecting the
    highest-scoring units of ``model`` (a LLaMA with HF parameter names) in exactly ``target_shape``.

    ``scores``: None for weight magnitudes (and the first L_t layers); else per-family activation scores
    (``hidden``, ``head``, ``kv_group``, ``intermediate``, ``layer``; ``activation_importance``'s dict),
    and the L_t layers with the largest ``layer`` score are kept."""
    source = shape_from_hf_config(model.config)
    target = _target_fields(target_shape)
    _check_target(source, target)
    L, H, G = source.num_hidden_layers, source.num_attention_heads, source.num_key_value_heads
    H_t, G_t = target["num_attention_heads"], target["num_key_value_heads"]
    if scores is None:
        scores = {**magnitude_scores(model), "layer": torch.arange(L, 0, -1, dtype=torch.float32)}
    _check_scores(source, scores)
    scores = {
        name: torch.as_tensor(scores[name]).detach().float().cpu() for name in (*ONESHOT_SCORES, "layer")
    }

    kv_group_z = _top_mask(scores["kv_group"], G_t)  # [L, G]
    # Inside each group the best H_t / G_t heads; the heads of dropped groups are then zeroed.
    per_group = scores["head"].reshape(L, G, H // G)
    head_z = _top_mask(per_group, H_t // G_t) * kv_group_z[..., None]
    layer_z = _top_mask(scores["layer"], target["num_hidden_layers"])
    return {
        "hidden_z": _top_mask(scores["hidden"], target["hidden_size"]),
        "head_z": head_z.reshape(L, H),
        "kv_group_z": kv_group_z,
        "intermediate_z": _top_mask(scores["intermediate"], target["intermediate_size"]),
        "layer_z": layer_z,
    }
