"""Physical pruning: fold the kept mask values into the weights, slice, drop dead layers, renumber.

Legend: D hidden, L layers, H query heads, G key/value heads, K head_dim, F MLP width.

``prune_model(model, masks)`` turns a mask-aware model plus its final deterministic masks (a ``Masks``
or an L0 family dict) into a plain model of the target shape that computes the same logits. Each gate
is folded into exactly one place:

- heads (head × its KV group's gate), and the attention-block gate (layer / head_layer):
  ``o_proj`` input columns of each kept head;
- MLP channels (intermediate) and the MLP-block gate (layer / mlp): ``down_proj`` columns;
- hidden channels (hidden): ``embed_tokens`` columns, the rows of ``o_proj`` and ``down_proj``
  (block outputs), the weights of each layer's two norms, and the LM head's columns — the final
  norm's gate lives in the LM head, so with tied embeddings the shared matrix carries it once for
  both uses (the reference code applied it twice: a known bug).

Each layer projection follows one row of ``PROJECTIONS``: which index slices its rows (output axis)
and its columns (input axis) — query-head rows (``head_dim`` blocks), KV-head rows, MLP channels, or
hidden channels — and which gates fold into it. A bias (Qwen2's q/k/v, per ``ModelFamily``) is sliced
with its rows. The unit axis is sliced first, the gates multiplied, then the hidden axis sliced.
Layers whose gate is zero are dropped and the rest renumbered. KV heads follow their group (GQA) or
their query head (MHA). The pruned config is the source family's config class with the shape and the
inherited fields (``INHERITED_FIELDS`` plus the family's own, e.g. ``sliding_window``), copied; RoPE as the
installed transformers holds it (4.x ``rope_theta``/``rope_scaling``, 5.x ``rope_parameters``).
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from shearing.models.family import family_of
from shearing.models.hf_io import config_from_shape
from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.models.masks import Masks
from shearing.models.shapes import LlamaShape, shape_from_hf_config


@dataclass
class PruneResult:
    model: MaskedLlamaForCausalLM
    shape: LlamaShape
    kept: dict = field(default_factory=dict)  # kept indices: layers, hidden, and per kept layer heads/kv/mlp


@dataclass(frozen=True)
class ProjectionRule:
    """How one layer projection is cut: ``rows``/``cols`` name the index that slices each axis (``q``
    query-head rows, ``kv`` KV-head rows, ``channels`` MLP channels, ``hidden`` hidden channels);
    ``col_gate`` the per-column gate folded in (``head``: head × attention-block gate, ``mlp``: channel ×
    MLP-block gate); ``hidden_rows``: hidden_z folded into the rows (a block output)."""

    name: str
    rows: str
    cols: str
    col_gate: str | None = None
    hidden_rows: bool = False


PROJECTIONS = (
    ProjectionRule("self_attn.q_proj", rows="q", cols="hidden"),
    ProjectionRule("self_attn.k_proj", rows="kv", cols="hidden"),
    ProjectionRule("self_attn.v_proj", rows="kv", cols="hidden"),
    ProjectionRule("self_attn.o_proj", rows="hidden", cols="q", col_gate="head", hidden_rows=True),
    ProjectionRule("mlp.gate_proj", rows="channels", cols="hidden"),
    ProjectionRule("mlp.up_proj", rows="channels", cols="hidden"),
    ProjectionRule("mlp.down_proj", rows="hidden", cols="channels", col_gate="mlp", hidden_rows=True),
)


def _nonzero(z: torch.Tensor) -> torch.Tensor:
    return torch.nonzero(z != 0, as_tuple=True)[0]


def _head_rows(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    return (heads[:, None] * head_dim + torch.arange(head_dim)).reshape(-1)


def _cut(
    rule: ProjectionRule,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    index: dict[str, torch.Tensor],
    gates: dict[str, torch.Tensor],
    hidden_z: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One projection's weight (and bias) cut by ``rule``: unit axis sliced, gates folded, hidden sliced."""
    assert bias is None or not rule.hidden_rows, f"{rule.name}: a gated block-output bias is not supported"
    if rule.rows != "hidden":
        weight = weight[index[rule.rows]]
        bias = None if bias is None else bias[index[rule.rows]]
    if rule.cols != "hidden":
        weight = weight[:, index[rule.cols]]
    if rule.col_gate is not None:
        weight = weight * gates[rule.col_gate][None, :]
    if rule.hidden_rows:
        weight = weight * hidden_z[:, None]
    if rule.rows == "hidden":
        weight = weight[index["hidden"]]
    if rule.cols == "hidden":
        weight = weight[:, index["hidden"]]
    return weight, bias


@torch.no_grad()
def prune_model(model: MaskedLlamaForCausalLM, masks: Masks | Mapping[str, torch.Tensor]) -> PruneResult:
    """A plain model of the shape the (final, deterministic) ``masks`` select (a ``Masks`` or an L0 family
    dict); see the module docstring."""
    config = model.config
    family = family_of(config)
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
        index = {
            "q": _head_rows(heads, K),
            "kv": _head_rows(kv_heads, K),
            "channels": channels,
            "hidden": hidden,
        }
        gates = {
            "head": (head_z[old][heads] * attn_z[old]).repeat_interleave(K),
            "mlp": intermediate_z[old][channels] * mlp_z[old],
        }

        for norm in ("input_layernorm", "post_attention_layernorm"):
            new[dst + f"{norm}.weight"] = (state[src + f"{norm}.weight"] * hidden_z)[hidden]
        for rule in PROJECTIONS:
            bias = state.get(src + rule.name + ".bias")
            weight, bias = _cut(rule, state[src + rule.name + ".weight"], bias, index, gates, hidden_z)
            new[dst + rule.name + ".weight"] = weight
            if bias is not None:
                new[dst + rule.name + ".bias"] = bias

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
        qkv_bias=source.qkv_bias,
    )
    new_config = config_from_shape(shape, family, **_inherited_fields(config))
    pruned = MaskedLlamaForCausalLM(new_config, attn_impl=model.model.layers[0].self_attn.attn_impl)
    missing, unexpected = pruned.load_state_dict(new, strict=False)
    expected_missing = ["lm_head.weight"] if config.tie_word_embeddings else []
    assert sorted(missing) == expected_missing and not unexpected, (missing, unexpected)
    kept = {"hidden": hidden.tolist(), "layers": kept_layers}
    return PruneResult(model=pruned, shape=shape, kept=kept)


# Config fields that are not part of the shape and carry over to the pruned model unchanged (plus each
# family's ``extra_fields``, e.g. Qwen2's sliding_window / use_sliding_window / max_window_layers). RoPE:
# transformers 4.x has rope_theta and rope_scaling; 5.x has rope_parameters (theta inside), no rope_theta
# attribute, and rope_scaling only as a deprecated alias of rope_parameters, which is not passed on.
INHERITED_FIELDS = (
    "rms_norm_eps",
    "rope_theta",
    "rope_scaling",
    "rope_parameters",
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
    """The pruned config's non-shape fields: copies of ``config``'s (a pruned config shares no dict with it)."""
    names = (*INHERITED_FIELDS, *family_of(config).extra_fields)
    if hasattr(config, "rope_parameters"):  # transformers 5: rope_scaling is an alias of rope_parameters
        names = tuple(name for name in names if name != "rope_scaling")
    return {name: copy.deepcopy(getattr(config, name)) for name in names if hasattr(config, name)}
