"""The ``Masks`` value: what each structured gate multiplies, resolved once from the L0 families.

Legend: D hidden, L layers, H query heads, G key/value groups, K head_dim, F MLP width.

The L0 module speaks in *families* (``hidden``, ``head``, ``kv_group``, ``intermediate``, ``layer``,
``head_layer``, ``mlp``; SPEC §1). The model forward, surgery, the parameter count and one-shot pruning
only need to know what gates which unit, so ``Masks.from_families`` is the one place that resolves a
family dict into gates:

=============  =======  =====================================================================
field          shape    gates
=============  =======  =====================================================================
hidden         [D]      one residual channel everywhere
head           [L, H]   one query head's context before ``o_proj``, already × its KV group's gate
kv             [L, G]   the KV-group gate itself (kept for parameter counting; None without a
                        ``kv_group`` family)
intermediate   [L, F]   one MLP channel before ``down_proj``
attn           [L]      the attention block of a layer (``layer`` or ``head_layer``)
mlp            [L]      the MLP block of a layer (``layer`` or ``mlp``)
=============  =======  =====================================================================

A field left None gates nothing (all ones). ``kv_group`` → heads (repeat_interleave by the group size,
then × ``head``) and ``layer`` → (attn, mlp) happen only in ``from_families``, with the same operations
in the same order as the code they replaced, so masked numerics are unchanged bit for bit.

``count_masked_params`` lives here too: the parameter count of a source shape under a ``Masks`` of keep
probabilities (expected count) or 0/1 indicators (exact count of the pruned model).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields

import torch

from shearing.models.family import qkv_bias_params
from shearing.models.shapes import LlamaShape

FAMILY_NAMES = ("hidden", "head", "kv_group", "intermediate", "layer", "head_layer", "mlp")


@dataclass(frozen=True)
class Masks:
    """Structured gates of a LLaMA-layout decoder (see the module docstring); None means all ones."""

    hidden: torch.Tensor | None = None
    head: torch.Tensor | None = None
    kv: torch.Tensor | None = None
    intermediate: torch.Tensor | None = None
    attn: torch.Tensor | None = None
    mlp: torch.Tensor | None = None

    @classmethod
    def from_families(cls, raw: Mapping[str, torch.Tensor], group_size: int) -> Masks:
        """Resolve an L0 family dict (keys with or without ``_z``) into gates; ``group_size`` is the
        number of query heads per KV group (H / G)."""
        families: dict[str, torch.Tensor] = {}
        for key, value in raw.items():
            name = key[: -len("_z")] if key.endswith("_z") else key
            if name not in FAMILY_NAMES:
                raise ValueError(
                    f"unknown mask family {key!r}; known: {', '.join(FAMILY_NAMES)} (optionally with '_z')"
                )
            if name in families:
                raise ValueError(f"mask family {name!r} given twice ({name!r} and {name + '_z'!r})")
            families[name] = value
        if "layer" in families and {"head_layer", "mlp"} & set(families):
            raise ValueError("masks: give either 'layer' or the 'head_layer'/'mlp' pair, not both")
        head = families.get("head")
        kv = families.get("kv_group")
        if kv is not None:
            group = kv.repeat_interleave(group_size, dim=-1)
            head = group if head is None else head * group
        return cls(
            hidden=families.get("hidden"),
            head=head,
            kv=kv,
            intermediate=families.get("intermediate"),
            attn=families.get("layer", families.get("head_layer")),
            mlp=families.get("layer", families.get("mlp")),
        )

    @classmethod
    def coerce(cls, masks: Masks | Mapping[str, torch.Tensor] | None, group_size: int) -> Masks:
        """``masks`` as a ``Masks``: None is no masks, a mapping is a family dict (``from_families``)."""
        if masks is None:
            return cls()
        if isinstance(masks, Masks):
            return masks
        if isinstance(masks, Mapping):
            return cls.from_families(masks, group_size)
        raise TypeError(f"masks must be a Masks or a mapping of mask families, got {type(masks).__name__}")

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Masks:
        """The same masks with ``fn`` applied to every tensor that is set (e.g. ``.to(device)``)."""
        return Masks(**{f.name: _apply(fn, getattr(self, f.name)) for f in fields(self)})

    def layer(self, i: int) -> tuple[torch.Tensor | None, ...]:
        """Layer ``i``'s gates: (head [H], intermediate [F], attn [], mlp [])."""
        return tuple(None if z is None else z[i] for z in (self.head, self.intermediate, self.attn, self.mlp))


def _apply(fn: Callable[[torch.Tensor], torch.Tensor], z: torch.Tensor | None) -> torch.Tensor | None:
    return None if z is None else fn(z)


def count_masked_params(source: LlamaShape, keep: Masks | Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Parameter count of ``source`` when each unit survives with the given probability.

    ``keep`` is a ``Masks`` (or a family dict, e.g. ``{"hidden": p, "head": p, ...}``) of keep
    probabilities or 0/1 indicators. With indicators this is the exact count of the pruned model; with
    probabilities the expected count (units treated as independent). GQA-aware: a KV head survives
    with its group. Families with q/k/v biases (``source.qkv_bias``) add K per kept q/k/v head.
    """
    keep = Masks.coerce(keep, source.group_size)
    L, H, G, K = (
        source.num_hidden_layers,
        source.num_attention_heads,
        source.num_key_value_heads,
        source.head_dim,
    )
    set_masks = (keep.hidden, keep.head, keep.kv, keep.intermediate, keep.attn, keep.mlp)
    ref = next((z for z in set_masks if z is not None), None)
    device = ref.device if ref is not None else None
    ones = torch.ones((), dtype=torch.float32, device=device)
    d = keep.hidden.sum() if keep.hidden is not None else ones * source.hidden_size
    head = keep.head if keep.head is not None else torch.ones(L, H, device=device)
    if keep.kv is not None:
        kv_heads = keep.kv.sum(-1)
    elif source.group_size == 1:
        kv_heads = head.sum(-1)
    else:
        kv_heads = ones * G
    q_heads = head.sum(-1)
    ffn = keep.intermediate.sum(-1) if keep.intermediate is not None else ones * source.intermediate_size
    attention = d * K * (2 * q_heads + 2 * kv_heads) + d  # + input_layernorm
    if source.qkv_bias:
        attention = attention + qkv_bias_params(q_heads, kv_heads, K)
    mlp = 3 * d * ffn + d  # + post_attention_layernorm
    attn_gate = keep.attn if keep.attn is not None else torch.ones(L, device=device)
    mlp_gate = keep.mlp if keep.mlp is not None else torch.ones(L, device=device)
    layers = (attn_gate * attention + mlp_gate * mlp).sum()
    embeddings = source.vocab_size * d * (1 if source.tie_word_embeddings else 2)
    return embeddings + layers + d
