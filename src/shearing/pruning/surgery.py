"""Physical pruning: fold the kept mask values into the weights, slice, drop dead layers, renumber.

``prune_model(model, masks)`` turns a mask-aware model plus its final deterministic masks into a plain
model of the target shape that computes the same logits. Each gate is folded into exactly one place:

- heads (head_z × kv_group_z), and the attention-block gate (layer_z / head_layer_z):
  ``o_proj`` input columns of each kept head;
- MLP channels (intermediate_z) and the MLP-block gate (layer_z / mlp_z): ``down_proj`` columns;
- hidden channels (hidden_z): ``embed_tokens`` columns, the rows of ``o_proj`` and ``down_proj``
  (block outputs), the weights of each layer's two norms, and the LM head's columns — the final
  norm's gate lives in the LM head, so with tied embeddings the shared matrix carries it once for
  both uses (the reference code applied it twice: a known bug).

Pruned units are then sliced out: q/k/v rows and ``o_proj`` columns by head (``head_dim`` blocks),
gate/up rows and ``down_proj`` columns by channel, every hidden-sized axis by the kept channels.
Layers whose gate is zero are dropped and the rest renumbered. KV heads follow their group (GQA) or
their query head (MHA).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from shearing.models.hf_io import config_from_shape
from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.models.shapes import LlamaShape, shape_from_hf_config
from shearing.pruning.masks import Masks


@dataclass
class PruneResult:
    model: MaskedLlamaForCausalLM
    shape: LlamaShape
    kept: dict = field(default_factory=dict)  # kept indices: layers, hidden, and per kept layer heads/kv/mlp


def _nonzero(z: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(z != 0, as_tuple=True)[0]


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


@torch.no_grad()
def prune_model(model: MaskedLlamaForCausalLM, masks: Masks | Mapping[str, torch.Tensor]) -> PruneResult:
    """A plain model of the shape the (final, deterministic) ``masks`` select (a ``Masks`` or an L0 family
    dict); see the module docstring."""
    config = model.config
    source = shape_from_hf_config(config)
    L, H, G, K = (
        source.num_hidden_layers,
        source.num_attention_heads,
        source.num_key_value_heads,
        source.head_dim,
    )
    if isinstance(masks, Mapping):
        masks = {k: v.detach().float().cpu() for k, v in masks.items()}
    masks = Masks.coerce(masks, source.group_size).map(lambda z: z.detach().float().cpu())
    hidden_z = masks.hidden if masks.hidden is not None else torch.ones(source.hidden_size)
    head_z = masks.head if masks.head is not None else torch.ones(L, H)
    intermediate_z = (
        masks.intermediate if masks.intermediate is not None else torch.ones(L, source.intermediate_size)
    )
    attn_z = masks.attn if masks.attn is not None else torch.ones(L)
    mlp_z = masks.mlp if masks.mlp is not None else torch.ones(L)
    dead = (attn_z == 0) != (mlp_z == 0)
    if dead.any():
        raise ValueError(
            f"layers {_nonzero(dead).tolist()} lose only one of attention/MLP: a standard decoder cannot "
            "express that; use final masks, which drop both together"
        )

    hidden = _nonzero(hidden_z)
    layers = _nonzero(attn_z)
    state = {k: v.detach().float().cpu() for k, v in model.state_dict().items()}
    new: dict[str, torch.Tensor] = {}
    kept_layers = []
    head_counts, kv_counts, ffn_counts = set(), set(), set()
    for new_index, old in enumerate(layers.tolist()):
        src, dst = f"model.layers.{old}.", f"model.layers.{new_index}."
        heads = _nonzero(head_z[old])
        if source.group_size == 1:
            kv_heads = heads
        else:
            groups = heads // source.group_size
            kv_heads = torch.unique(groups)
            per_group = torch.bincount(groups, minlength=G)[kv_heads]
            if not bool((per_group == per_group[0]).all()):
                raise ValueError(
                    f"layer {old}: kept query heads are uneven across KV groups ({per_group.tolist()})"
                )
        channels = _nonzero(intermediate_z[old])
        q_rows, kv_rows = _head_rows(heads, K), _head_rows(kv_heads, K)
        head_gate = (head_z[old][heads] * attn_z[old]).repeat_interleave(K)

        new[dst + "input_layernorm.weight"] = (state[src + "input_layernorm.weight"] * hidden_z)[hidden]
        new[dst + "post_attention_layernorm.weight"] = (
            state[src + "post_attention_layernorm.weight"] * hidden_z
        )[hidden]
        new[dst + "self_attn.q_proj.weight"] = state[src + "self_attn.q_proj.weight"][q_rows][:, hidden]
        new[dst + "self_attn.k_proj.weight"] = state[src + "self_attn.k_proj.weight"][kv_rows][:, hidden]
        new[dst + "self_attn.v_proj.weight"] = state[src + "self_attn.v_proj.weight"][kv_rows][:, hidden]
        o = state[src + "self_attn.o_proj.weight"][:, q_rows] * head_gate[None, :] * hidden_z[:, None]
        new[dst + "self_attn.o_proj.weight"] = o[hidden]
        new[dst + "mlp.gate_proj.weight"] = state[src + "mlp.gate_proj.weight"][channels][:, hidden]
        new[dst + "mlp.up_proj.weight"] = state[src + "mlp.up_proj.weight"][channels][:, hidden]
        down = state[src + "mlp.down_proj.weight"][:, channels]
        down = down * (intermediate_z[old][channels] * mlp_z[old])[None, :] * hidden_z[:, None]
        new[dst + "mlp.down_proj.weight"] = down[hidden]

        head_counts.add(len(heads))
        kv_counts.add(len(kv_heads))
        ffn_counts.add(len(channels))
        kept_layers.append(
            {
                "source_layer": old,
                "heads": heads.tolist(),
                "kv_heads": kv_heads.tolist(),
                "intermediate": channels.tolist(),
            }
        )
    if len(head_counts) > 1 or len(kv_counts) > 1 or len(ffn_counts) > 1:
        raise ValueError(
            "the masks keep a different number of heads/KV heads/MLP channels in different layers "
            f"({sorted(head_counts)}, {sorted(kv_counts)}, {sorted(ffn_counts)}): use the final (exact-target) masks"
        )
    if not kept_layers:
        raise ValueError("the masks drop every layer")

    new["model.embed_tokens.weight"] = (state["model.embed_tokens.weight"] * hidden_z)[:, hidden]
    new["model.norm.weight"] = state["model.norm.weight"][hidden]
    if not config.tie_word_embeddings:
        new["lm_head.weight"] = (state["lm_head.weight"] * hidden_z)[:, hidden]

    shape = LlamaShape(
        hidden_size=len(hidden),
        num_hidden_layers=len(kept_layers),
        num_attention_heads=head_counts.pop(),
        num_key_value_heads=kv_counts.pop(),
        intermediate_size=ffn_counts.pop(),
        vocab_size=source.vocab_size,
        head_dim=K,
        tie_word_embeddings=source.tie_word_embeddings,
    )
    new_config = config_from_shape(shape, **_inherited_fields(config))
    pruned = MaskedLlamaForCausalLM(new_config, attn_impl=model.model.layers[0].self_attn.attn_impl)
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    expected_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
    assert sorted(missing) == expected_missing and not unexpected, (missing, unexpected)
    kept = {"hidden": hidden.tolist(), "layers": kept_layers}
    return PruneResult(model=pruned, shape=shape, kept=kept)


# Config fields that are not part of the shape and carry over to the pruned model unchanged.
INHERITED_FIELDS = (
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "max_position_embeddings",
    "bos_token_id",
    "eos_token_id",
    "pad_token_id",
    "initializer_range",
    "hidden_act",
    "attention_dropout",
    "pretraining_tp",
)


def _inherited_fields(config) -> dict:
    return {name: getattr(config, name) for name in INHERITED_FIELDS if hasattr(config, name)}
