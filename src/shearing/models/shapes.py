"""Model shapes as data: the named LLaMA-family architectures, exact parameter counts, and targets.

A *shape* is everything about a decoder that decides its parameter count. Five fields can be pruned
(hidden size, layers, query heads, key/value heads, MLP width); the rest (vocabulary, ``head_dim``,
tied embeddings, q/k/v biases) are inherited from the source, because structured pruning never changes
them. Named shapes are LLaMA; a checkpoint's family (``shearing.models.family``) sets ``qkv_bias``.

Shape legend used across the package: D hidden, L layers, H query heads, G key/value heads (groups),
K head_dim, F MLP width (intermediate), V vocabulary.

Parameter count of a LLaMA decoder (no biases)::

    embeddings V·D  (+ LM head V·D when untied)  + final norm D
    + L · [ q D·H·K + k,v 2·D·G·K + o H·K·D + MLP 3·D·F + two norms 2·D ]

plus, for a family with q/k/v biases (Qwen2), L · (H·K + 2·G·K).

LLaMA2-7B gives 6,738,415,616; its 2.7B and 1.3B targets 2,701,560,320 and 1,345,423,360.

``propose_targets`` searches the other way, from a parameter count to uniform target shapes (every
layer the same, as every target here is). A candidate is valid for the method and for HF: every field at
most the source's, ``head_dim`` kept, KV groups a divisor of the source's (every field of an MHA source
keeps one KV head per query head), query heads a multiple of the KV groups with at most the source's
heads per group, hidden a multiple of ``hidden_multiple`` (default ``head_dim``; 64 when the source's
hidden is not a multiple of it) and MLP a multiple of ``mlp_multiple`` (default: the largest of 256, 64,
16, 8 that leaves the source's MLP at least 16 such steps). For each layer count, head layout and hidden
size, the MLP widths that land within ``tolerance`` are solved from the count (it is linear in the width)
and every count is ``count_params``'s, the number ``plan`` prints and the export checks. Among the shapes within ``tolerance`` of the count, each
layer count keeps the least *distorted* one, and the proposal ranks them by that (then by the count's
deviation). Distortion is the sum of absolute log ratios, target over source, of attention width / hidden
(H·K / D), MLP / hidden (F / D) and query heads per KV group (H / G), plus |log(L_t / L_s) - ½ log(D_t /
D_s)|: depth shrinks as the square root of the width, as from LLaMA2-7B to Sheared-LLaMA-1.3B (24 of 32
layers at half the width) and from Llama-3.1-8B to Llama-3.2-3B (28 of 32 at 3/4). Without that term,
dropping layers alone keeps every proportion and would always come first. The ranking is a heuristic for
a sensible shape, not a prediction of which trains best (loss at a fixed count depends little on the
depth/width split over a wide range, Kaplan et al. 2020); the table shows one candidate per depth to
choose from. For LLaMA2-7B at Sheared-LLaMA-1.3B's count it proposes first the paper's 24 layers, hidden
2048 and 16 heads, with MLP 5632 (the paper's 5504 is not a multiple of 256); at 2.7B the paper kept all
32 layers at hidden 2560, which ranks 10th here, behind shapes that also shrink the depth.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shearing.models.family import FAMILIES, check_family_config, config_getter, family_of, qkv_bias_params

PRUNABLE_FIELDS = (
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "intermediate_size",
)


@dataclass(frozen=True)
class LlamaShape:
    """The architecture of a LLaMA-family decoder, as far as its size is concerned."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    intermediate_size: int
    vocab_size: int
    head_dim: int
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # q/k/v projections carry biases (Qwen2): + H·K + 2·G·K per layer

    def __post_init__(self) -> None:
        for name in (*PRUNABLE_FIELDS, "vocab_size", "head_dim"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"shape field {name} must be a positive integer, got {value!r}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads ({self.num_attention_heads}) must be divisible by "
                f"num_key_value_heads ({self.num_key_value_heads}): every KV group needs the same number "
                "of query heads"
            )

    @property
    def group_size(self) -> int:
        """Query heads per key/value head (1 for multi-head attention)."""
        return self.num_attention_heads // self.num_key_value_heads

    def prunable(self) -> dict[str, int]:
        return {name: getattr(self, name) for name in PRUNABLE_FIELDS}

    def with_target(self, target: Mapping[str, int]) -> LlamaShape:
        """This shape with the five prunable fields replaced by ``target``'s."""
        return dataclasses.replace(self, **{name: int(target[name]) for name in PRUNABLE_FIELDS})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def layer_params(
    hidden_size: int, head_dim: int, heads: int, kv_heads: int, intermediate_size: int, qkv_bias: bool = False
) -> int:
    """Parameters of one decoder layer: q/o and k/v projections (plus q/k/v biases when the family has
    them), the MLP, its two norms."""
    d, k = hidden_size, head_dim
    bias = qkv_bias_params(heads, kv_heads, k) if qkv_bias else 0
    return d * heads * k * 2 + d * kv_heads * k * 2 + 3 * d * intermediate_size + 2 * d + bias


def outside_layer_params(shape: LlamaShape) -> int:
    """Parameters outside the decoder layers: token embeddings, the LM head unless tied, the final norm."""
    return shape.vocab_size * shape.hidden_size * (1 if shape.tie_word_embeddings else 2) + shape.hidden_size


def count_params(shape: LlamaShape) -> int:
    """Exact number of parameters of a decoder of this shape (q/k/v biases included when it has them)."""
    per_layer = layer_params(
        shape.hidden_size,
        shape.head_dim,
        shape.num_attention_heads,
        shape.num_key_value_heads,
        shape.intermediate_size,
        shape.qkv_bias,
    )
    return outside_layer_params(shape) + shape.num_hidden_layers * per_layer


def _llama(d: int, layers: int, heads: int, kv: int, ffn: int, vocab: int, head_dim: int, tied: bool = False):
    return LlamaShape(d, layers, heads, kv, ffn, vocab, head_dim, tied)


# Named architectures. Real checkpoints' shapes (for `plan` and for targets) and tiny test shapes
# (for random-init sources on CPU).
NAMED_SHAPES: dict[str, LlamaShape] = {
    "llama2_7b": _llama(4096, 32, 32, 32, 11008, 32000, 128),
    "llama2_13b": _llama(5120, 40, 40, 40, 13824, 32000, 128),
    "llama2_2.7b": _llama(2560, 32, 20, 20, 6912, 32000, 128),
    "llama2_1.3b": _llama(2048, 24, 16, 16, 5504, 32000, 128),
    "llama2_370m": _llama(1024, 24, 8, 8, 2816, 32000, 128),
    "llama3_8b": _llama(4096, 32, 32, 8, 14336, 128256, 128),
    # Llama-3.2-3B widths (24 query heads over 8 KV groups), untied like its 8B source: 3,606,752,256
    # parameters (3.6B; Llama-3.2-3B itself ties embeddings and LM head, 3.2B).
    "llama3_3b": _llama(3072, 28, 24, 8, 8192, 128256, 128),
    # A GQA target that also prunes KV groups: 4 of 8 groups kept, 4 query heads each.
    "llama3_1.5b": _llama(2048, 24, 16, 4, 5632, 128256, 128),
    # SmolLM2-135M (9 query heads over 3 KV groups, tied embeddings, vocab 49,152): 134,515,008 parameters;
    # the CPU recipe's target (yamls/small/): hidden 384, 20 layers, 6 heads over 3 groups, MLP 1024, 51,330,432.
    "smollm2_135m": _llama(576, 30, 9, 3, 1536, 49152, 64, tied=True),
    "smollm2_51m": _llama(384, 20, 6, 3, 1024, 49152, 64, tied=True),
    # make demo: a small GQA source (4 query heads over 2 KV groups) and its pruned target.
    "demo_source": _llama(128, 4, 4, 2, 384, 2048, 32),
    "demo_pruned": _llama(96, 3, 2, 1, 256, 2048, 32),
    # Tiny shapes for CPU tests.
    "tiny_mha": _llama(64, 4, 4, 4, 176, 512, 16),
    "tiny_mha_pruned": _llama(48, 3, 2, 2, 96, 512, 16),
    "tiny_gqa": _llama(64, 4, 8, 4, 176, 512, 16),
    "tiny_gqa_pruned": _llama(48, 3, 4, 2, 96, 512, 16),
}

# Extra HF config fields for named shapes that need them when built from scratch. The LLaMA-2 family
# was trained on 4096-token contexts (LlamaConfig's default is 2048).
NAMED_CONFIG_EXTRAS: dict[str, dict[str, Any]] = {
    **{name: {"max_position_embeddings": 4096} for name in NAMED_SHAPES if name.startswith("llama2_")},
    **{
        name: {"rope_theta": 100000.0, "max_position_embeddings": 8192}
        for name in ("smollm2_135m", "smollm2_51m")
    },
    "llama3_8b": {
        "rope_theta": 500000.0,
        "max_position_embeddings": 8192,
        "bos_token_id": 128000,
        "eos_token_id": 128001,
    },
}


def source_max_positions(spec: Any, config: Mapping[str, Any] | None = None) -> int:
    """``max_position_embeddings`` of a source: its config.json (``config`` when the caller has read it), a
    shape mapping's field, a named shape's extras, else its family config class's default (``LlamaConfig``'s
    for named shapes and mappings, what ``load_source_model`` builds)."""
    family = FAMILIES["llama"]
    if is_checkpoint_dir(spec):
        raw = config if config is not None else read_config_json(spec)
        family = family_of(raw)
    elif isinstance(spec, Mapping):
        raw = dict(spec)
    else:
        raw = NAMED_CONFIG_EXTRAS.get(str(spec), {})
    if "max_position_embeddings" in raw:
        return int(raw["max_position_embeddings"])
    return int(family.config_class().max_position_embeddings)


def named_shape(name: str) -> LlamaShape:
    try:
        return NAMED_SHAPES[name]
    except KeyError:
        raise ValueError(
            f"unknown named shape {name!r}; known shapes: {', '.join(sorted(NAMED_SHAPES))} "
            "(or give a Hugging Face checkpoint directory, or a mapping of the five shape fields)"
        ) from None


def shape_from_hf_config(config: Any) -> LlamaShape:
    """The shape of a ``transformers`` config of a known family (``LlamaConfig``, ``Qwen2Config``, ... or a
    dict of its fields); ``qkv_bias`` comes from the family."""
    get = config_getter(config)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim") or hidden // heads
    return LlamaShape(
        hidden_size=hidden,
        num_hidden_layers=get("num_hidden_layers"),
        num_attention_heads=heads,
        num_key_value_heads=get("num_key_value_heads") or heads,
        intermediate_size=get("intermediate_size"),
        vocab_size=get("vocab_size"),
        head_dim=head_dim,
        tie_word_embeddings=bool(get("tie_word_embeddings", False)),
        qkv_bias=family_of(config).qkv_bias,
    )


SHAPE_FIELDS = (*PRUNABLE_FIELDS, "vocab_size", "head_dim", "tie_word_embeddings")


def shape_from_mapping(spec: Mapping[str, Any]) -> LlamaShape:
    """A random-init source given as a mapping: the shape fields (``head_dim`` defaults to D / H,
    ``num_key_value_heads`` to H) plus optional extra HF config fields (``rope_theta``, ...)."""
    missing = [
        name
        for name in (
            "hidden_size",
            "num_hidden_layers",
            "num_attention_heads",
            "intermediate_size",
            "vocab_size",
        )
        if name not in spec
    ]
    if missing:
        raise ValueError(f"model.source as a shape mapping is missing {missing}")
    fields = {name: spec[name] for name in SHAPE_FIELDS if name in spec}
    fields.setdefault("num_key_value_heads", fields["num_attention_heads"])
    fields.setdefault("head_dim", fields["hidden_size"] // fields["num_attention_heads"])
    return LlamaShape(**fields)


def is_checkpoint_dir(spec: Any) -> bool:
    return isinstance(spec, str | os.PathLike) and Path(spec).is_dir()


def resolve_source_shape(
    spec: str | os.PathLike,
    expected: str | None = None,
    need_checkpoint: bool = False,
    config: Mapping[str, Any] | None = None,
) -> LlamaShape:
    """The shape of a source model given as an HF checkpoint directory or a named shape.

    Reads only ``config.json`` (not even that when the caller passes it as ``config``): no weights are loaded. ``expected`` names the shape a recipe was written
    for (``model.source_shape``): a checkpoint of another shape is an error, and when the directory is
    not there (planning on a laptop) the named shape stands in for it, unless ``need_checkpoint``.
    """
    if isinstance(spec, Mapping):
        return shape_from_mapping(spec)
    if is_checkpoint_dir(spec):
        shape = shape_from_hf_config(config if config is not None else read_config_json(spec))
        if expected is not None and shape != named_shape(expected):
            raise ValueError(
                f"source model {spec} has shape {shape} but model.source_shape says {expected!r} "
                f"({named_shape(expected)}): point variables.source_model at the right checkpoint, or, to run "
                "this recipe on a model of another shape on purpose, add the override model.source_shape=null"
            )
        return shape
    looks_like_path = isinstance(spec, os.PathLike) or "/" in str(spec) or str(spec).startswith(".")
    if looks_like_path:
        if expected is not None and not need_checkpoint:
            return named_shape(expected)
        raise ValueError(
            f"source model {str(spec)!r} is not an existing directory: set variables.source_model to a Hugging Face "
            f"checkpoint directory (or a named shape: {', '.join(sorted(NAMED_SHAPES))})"
        )
    return named_shape(str(spec))


def read_config_json(checkpoint_dir: str | os.PathLike) -> dict[str, Any]:
    """The ``config.json`` of an HF checkpoint directory, checked to be a LLaMA-layout model we can prune
    (a row of ``shearing.models.family.FAMILIES``; ``check_family_config`` says why not)."""
    path = Path(checkpoint_dir) / "config.json"
    if not path.is_file():
        raise ValueError(
            f"{checkpoint_dir} has no config.json: the source model must be a Hugging Face checkpoint directory"
        )
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(
            f"{path} is not valid JSON ({e}): the source checkpoint is damaged; download it again "
            "(or re-save it with save_pretrained)"
        ) from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object of config fields, got {type(raw).__name__}")
    check_family_config(raw, where=str(path))
    return raw


def resolve_target_shape(source: LlamaShape, target: str | Mapping[str, Any]) -> LlamaShape:
    """The target shape: a named shape (its five prunable fields) or a mapping of those five fields.

    Vocabulary, ``head_dim`` and embedding tying always come from the source.
    """
    if isinstance(target, str):
        fields = named_shape(target).prunable()
        named = named_shape(target)
        if named.head_dim != source.head_dim:
            raise ValueError(
                f"target shape {target!r} has head_dim {named.head_dim} but the source has {source.head_dim}: "
                "head_dim is never pruned; choose a target whose heads have the source's head_dim"
            )
    elif isinstance(target, Mapping):
        unknown = set(target) - set(PRUNABLE_FIELDS) - {"head_dim"}
        missing = set(PRUNABLE_FIELDS) - set(target)
        if unknown:
            raise ValueError(
                f"target_model has unknown field(s) {sorted(unknown)}; allowed: {list(PRUNABLE_FIELDS)}"
            )
        if "num_key_value_heads" in missing and source.group_size == 1 and "num_attention_heads" in target:
            target = {**target, "num_key_value_heads": target["num_attention_heads"]}
            missing.discard("num_key_value_heads")
        if missing:
            raise ValueError(
                f"target_model is missing field(s) {sorted(missing)}; give all of {list(PRUNABLE_FIELDS)}"
            )
        if "head_dim" in target and int(target["head_dim"]) != source.head_dim:
            raise ValueError(
                f"target_model.head_dim={target['head_dim']} differs from the source's {source.head_dim}: "
                "head_dim is never pruned"
            )
        fields = {name: target[name] for name in PRUNABLE_FIELDS}
        for name, value in fields.items():
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"target_model.{name} must be an integer, got {value!r}")
    else:
        raise ValueError(
            f"target_model must be a named shape or a mapping of {list(PRUNABLE_FIELDS)}, got {target!r}"
        )
    validate_target(source, fields)
    return source.with_target(fields)


def validate_target(source: LlamaShape, target: Mapping[str, int]) -> None:
    """Check that ``target`` is reachable from ``source`` by structured pruning."""
    for name in PRUNABLE_FIELDS:
        if target[name] <= 0:
            raise ValueError(f"target_model.{name} must be positive, got {target[name]}")
        if target[name] > getattr(source, name):
            raise ValueError(
                f"target_model.{name}={target[name]} is larger than the source's {getattr(source, name)}: "
                "pruning can only remove units"
            )
    heads, kv = target["num_attention_heads"], target["num_key_value_heads"]
    if heads % kv:
        raise ValueError(
            f"target_model.num_attention_heads ({heads}) must be divisible by num_key_value_heads ({kv})"
        )
    if source.group_size == 1:
        if kv != heads:
            raise ValueError(
                f"the source uses multi-head attention (one KV head per query head), so the target must keep "
                f"num_key_value_heads == num_attention_heads; got {kv} KV heads for {heads} heads"
            )
    elif heads // kv > source.group_size:
        raise ValueError(
            f"target_model needs {heads // kv} query heads per KV group but the source groups have only "
            f"{source.group_size}: lower num_attention_heads or raise num_key_value_heads"
        )


@dataclass(frozen=True)
class TargetCandidate:
    """A proposed target shape, its exact parameter count and how it compares with the request."""

    shape: LlamaShape
    params: int
    deviation: float  # params / wanted - 1
    distortion: float  # 0: the source's proportions, depth shrunk as the square root of the width (docstring)


def default_multiples(source: LlamaShape) -> tuple[int, int]:
    """(hidden, MLP) granularity of proposed targets; see the module docstring."""
    hidden = source.head_dim if source.hidden_size % source.head_dim == 0 else 64
    mlp = next((unit for unit in (256, 64, 16, 8) if source.intermediate_size >= 16 * unit), 1)
    return hidden, mlp


def _head_layouts(source: LlamaShape) -> list[tuple[int, int]]:
    """(query heads, KV heads) a target may have: KV heads dividing the source's, at most its heads per group."""
    if source.group_size == 1:
        return [(h, h) for h in range(1, source.num_attention_heads + 1)]
    groups = [g for g in range(1, source.num_key_value_heads + 1) if source.num_key_value_heads % g == 0]
    return [(g * per, g) for g in groups for per in range(1, source.group_size + 1)]


def _distortion(source: LlamaShape, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> float:
    """How far a target's proportions are from the source's (the module docstring); 0 for the same ones."""

    def ratios(d: int, h: int, g: int, f: int) -> tuple[float, float, float]:
        return h * source.head_dim / d, f / d, h / g

    target = ratios(hidden, heads, kv_heads, mlp)
    own = ratios(
        source.hidden_size, source.num_attention_heads, source.num_key_value_heads, source.intermediate_size
    )
    proportions = sum(abs(math.log(t / r)) for t, r in zip(target, own, strict=True))
    depth, width = layers / source.num_hidden_layers, hidden / source.hidden_size
    return proportions + abs(math.log(depth) - 0.5 * math.log(width))


def propose_targets(
    source: LlamaShape,
    wanted: int,
    count: int = 5,
    tolerance: float = 0.02,
    hidden_multiple: int | None = None,
    mlp_multiple: int | None = None,
) -> list[TargetCandidate]:
    """Up to ``count`` uniform target shapes within ``tolerance`` of ``wanted`` parameters, best first, at most
    one per layer count (see the module docstring for the rules and the ranking)."""
    source_params = count_params(source)
    default_hidden, default_mlp = default_multiples(source)
    hidden_multiple, mlp_multiple = hidden_multiple or default_hidden, mlp_multiple or default_mlp
    for name, value in (("hidden_multiple", hidden_multiple), ("mlp_multiple", mlp_multiple)):
        if value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value}")
    if not 0 < tolerance < 1:
        raise ValueError(f"tolerance must be a fraction in (0, 1), e.g. 0.02 for 2%, got {tolerance}")
    if not 0 < wanted < source_params:
        raise ValueError(
            f"target of {wanted:,} parameters: pruning needs fewer than the source's {source_params:,} and more than 0"
        )
    if hidden_multiple > source.hidden_size or mlp_multiple > source.intermediate_size:
        raise ValueError(
            f"hidden_multiple {hidden_multiple} / mlp_multiple {mlp_multiple} exceed the source's hidden "
            f"{source.hidden_size} / MLP {source.intermediate_size}: choose smaller multiples"
        )
    # The count is linear in the layer count and in the MLP width: count_params at three shapes per head
    # layout and hidden size gives every count exactly (checked again on the shapes returned).
    best: dict[int, tuple[tuple[float, float], tuple[int, ...], int]] = {}  # layers -> (rank, fields, count)
    nearest = 0  # the count closest to ``wanted`` of any valid shape, for the error message
    max_steps = source.intermediate_size // mlp_multiple
    own_fields = tuple(source.prunable().values())
    for heads, kv_heads in _head_layouts(source):
        for hidden in range(hidden_multiple, source.hidden_size + 1, hidden_multiple):
            one_layer = count_params(_uniform(source, hidden, 1, heads, kv_heads, mlp_multiple))
            per_layer = count_params(_uniform(source, hidden, 2, heads, kv_heads, mlp_multiple)) - one_layer
            per_step = (
                count_params(_uniform(source, hidden, 1, heads, kv_heads, 2 * mlp_multiple)) - one_layer
            )
            outside = one_layer - per_layer
            for layers in range(1, source.num_hidden_layers + 1):
                # MLP steps (width / mlp_multiple) at which the count is ``wanted`` and the tolerance's ends
                exact, low, high = (
                    1 + ((params - outside) / layers - per_layer) / per_step
                    for params in (wanted, wanted * (1 - tolerance), wanted * (1 + tolerance))
                )
                first, last = max(1, math.floor(low)), min(max_steps, math.ceil(high))
                exact = math.floor(exact)
                for step in sorted({*range(first, last + 1), exact, exact + 1}):
                    fields = (hidden, layers, heads, kv_heads, step * mlp_multiple)
                    if not 1 <= step <= max_steps or fields == own_fields:
                        continue
                    params = outside + layers * (per_layer + (step - 1) * per_step)
                    if not nearest or abs(params - wanted) < abs(nearest - wanted):
                        nearest = params
                    if abs(params / wanted - 1) > tolerance:
                        continue
                    rank = (round(_distortion(source, *fields), 9), abs(params / wanted - 1))
                    if layers not in best or rank < best[layers][0]:
                        best[layers] = (rank, fields, params)
    if not best:
        closest = f"; the closest is {nearest:,} ({nearest / wanted - 1:+.1%})" if nearest else ""
        raise ValueError(
            f"no uniform target shape within {tolerance:.1%} of {wanted:,} parameters with hidden a multiple of "
            f"{hidden_multiple} and MLP a multiple of {mlp_multiple}{closest}: raise the tolerance or lower the "
            "multiples"
        )
    candidates = []
    for rank, fields, params in sorted(best.values())[:count]:
        shape = _uniform(source, *fields)
        assert count_params(shape) == params, (fields, params)  # linearity: the same counting, exactly
        candidates.append(TargetCandidate(shape, params, params / wanted - 1, rank[0]))
    return candidates


def _uniform(source: LlamaShape, hidden: int, layers: int, heads: int, kv_heads: int, mlp: int) -> LlamaShape:
    fields = (hidden, layers, heads, kv_heads, mlp)
    return source.with_target(dict(zip(PRUNABLE_FIELDS, fields, strict=True)))
