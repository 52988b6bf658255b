"""Model families as data: the HF decoders with the LLaMA layout that shearing prunes.

Legend: D hidden, L layers, H query heads, G key/value heads, K head_dim, F MLP width.

Every family here computes exactly what ``transformers.LlamaForCausalLM`` computes (RMSNorm, RoPE from
``rope_theta``/``rope_scaling``, SwiGLU MLP, GQA attention, optionally tied embeddings), up to:

- **biases**: Qwen2's q/k/v projections carry biases (``o_proj`` and the MLP do not); each adds H·K
  (q) + 2·G·K (k, v) parameters per layer, and a bias is pruned with its projection's rows;
- **sliding-window attention** (Mistral's ``sliding_window``; Qwen2's ``sliding_window`` with
  ``use_sliding_window`` / ``max_window_layers``, and ``layer_types`` under transformers 5): the masked
  model has no window, so a run is refused where the window would take effect on its sequences
  (``check_sliding_window``, called with ``max_seq_len`` by the run validation; the model's own guard reads
  the same rule, ``window_in_effect``). A window layer attends to the keys less than ``sliding_window``
  positions back (the causal mask drops ``k <= q - sliding_window``), so a window changes nothing on
  sequences of at most ``sliding_window`` tokens and a run is accepted whenever ``max_seq_len <=
  sliding_window``, or no layer has a window. Which layers have one is what the installed transformers'
  default eager and sdpa attention compute (``window_layers``):

  - Mistral, 4.51 and 5.x: every layer, whenever ``sliding_window`` is set.
  - Qwen2 under 4.51: *every* layer too, whenever ``sliding_window`` is set: the causal mask is built from
    ``config.sliding_window`` alone, and only ``flash_attention_2`` reads ``use_sliding_window`` /
    ``max_window_layers`` (layers ``>= max_window_layers`` get the window). So ``Qwen2Config()``'s own
    defaults (window 4096, flag false) and distilled Qwen2 models are accepted up to 4096 tokens; past
    that, a model with ``use_sliding_window: false`` is told to set ``sliding_window`` to null (it never
    used a window; the stock HF model then agrees at every length), one that uses a window to lower
    ``max_seq_len``.
  - Qwen2 under 5.x: only the layers ``layer_types`` marks ``sliding_attention``, and only with
    ``use_sliding_window: true`` (``Qwen2Config`` sets ``sliding_window`` to None without it, so 5.x's
    ``Qwen2Config()`` has no window); ``layer_types`` is config.json's, else layers ``>=
    max_window_layers``. An unused window is therefore accepted at any length.

  A family config that omits a field gets its HF config class's ``__init__`` default (``sliding_window``
  4096 for both, ``use_sliding_window`` false), as ``from_pretrained`` does before the class's own rules.

Adding a family is one row of ``FAMILIES`` (plus its parity tests): its HF ``model_type``, config
class, causal-LM class name, whether q/k/v have biases, and the config fields that carry over to a
pruned model unchanged.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import transformers
from transformers import LlamaConfig, MistralConfig, PretrainedConfig, Qwen2Config

TRANSFORMERS_5 = int(transformers.__version__.split(".")[0]) >= 5


@dataclass(frozen=True)
class ModelFamily:
    """One HF decoder family with the LLaMA layout (see the module docstring)."""

    name: str
    model_type: str  # config.json's model_type
    config_class: type[PretrainedConfig]
    architecture: str  # the HF causal-LM class, written to config.architectures
    qkv_bias: bool = False  # q/k/v projections have biases (o_proj and the MLP never do here)
    sliding_window: bool = False  # configs may carry sliding_window (see check_sliding_window)
    extra_fields: tuple[str, ...] = ()  # family config fields a pruned model inherits unchanged

    def projection_bias(self, projection: str) -> bool:
        """Whether ``self_attn.<projection>`` / ``mlp.<projection>`` (e.g. ``q_proj``) has a bias."""
        return self.qkv_bias and projection in ("q_proj", "k_proj", "v_proj")


def qkv_bias_params(heads, kv_heads, head_dim):
    """Parameters of one layer's q/k/v biases: H·K + 2·G·K (ints or tensors of expected counts)."""
    return head_dim * (heads + 2 * kv_heads)


FAMILIES: dict[str, ModelFamily] = {
    "llama": ModelFamily("llama", "llama", LlamaConfig, "LlamaForCausalLM"),
    "mistral": ModelFamily(
        "mistral",
        "mistral",
        MistralConfig,
        "MistralForCausalLM",
        sliding_window=True,
        extra_fields=("sliding_window",),
    ),
    "qwen2": ModelFamily(
        "qwen2",
        "qwen2",
        Qwen2Config,
        "Qwen2ForCausalLM",
        qkv_bias=True,
        sliding_window=True,
        extra_fields=("sliding_window", "use_sliding_window", "max_window_layers"),
    ),
}


def config_getter(config: Any):
    """``get(key, default=None)`` over a ``PretrainedConfig`` or a raw config.json dict alike."""
    if isinstance(config, Mapping):
        return config.get
    return lambda key, default=None: getattr(config, key, default)


def family_of(config: Any) -> ModelFamily:
    """The family of an HF config (a ``PretrainedConfig`` or a raw config.json dict), by ``model_type``;
    a config without a known model_type is LLaMA when its architectures name ``LlamaForCausalLM``."""
    if isinstance(config, ModelFamily):
        return config
    if isinstance(config, str):
        config = {"model_type": config}
    get = config_getter(config)
    model_type = get("model_type")
    for family in FAMILIES.values():
        if family.model_type == model_type:
            return family
    if "LlamaForCausalLM" in (get("architectures") or []):
        return FAMILIES["llama"]
    known = ", ".join(sorted(f.model_type for f in FAMILIES.values()))
    raise ValueError(
        f"model_type {model_type!r} is not a LLaMA-family checkpoint; shearing prunes the LLaMA layout of "
        f"model_type {known} (LLaMA 1/2/3, Mistral, Qwen2)"
    )


def check_family_config(raw_config: Mapping[str, Any], where: str) -> ModelFamily:
    """The family of a raw config.json dict, after refusing what it cannot prune faithfully (with why)."""
    try:
        family = family_of(raw_config)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from None
    for flag in ("attention_bias", "mlp_bias"):
        if raw_config.get(flag):
            raise ValueError(
                f"{where}: {flag}=true is not supported for {family.name} (those bias terms are not pruned); "
                "only Qwen2-style q/k/v biases are (model_type qwen2)"
            )
    if raw_config.get("hidden_act", "silu") != "silu":
        raise ValueError(
            f"{where}: hidden_act {raw_config.get('hidden_act')!r} is not supported (expected silu)"
        )
    window = raw_config.get("sliding_window")
    if window is not None and not family.sliding_window:
        raise ValueError(
            f"{where}: sliding_window={window!r} in a {family.name} config ({family.architecture} has no "
            "sliding window): is model_type right? Set sliding_window to null if the model has no window"
        )
    window = _family_field(raw_config, family, "sliding_window")
    if window is not None and (not isinstance(window, int) or isinstance(window, bool) or window <= 0):
        raise ValueError(
            f"{where}: sliding_window={window!r} must be a positive integer (the attention window, in tokens) "
            "or null (no window)"
        )
    return family


def _family_field(config: Any, family: ModelFamily, key: str) -> Any:
    """``config``'s ``key`` (a raw config.json dict or a ``PretrainedConfig``), else the family config class's
    ``__init__`` default: what ``from_pretrained`` passes on before the class's own rules (transformers 5's
    ``Qwen2Config`` then drops an unused window, so an instance's value is not the default)."""
    missing = object()
    value = config_getter(config)(key, missing)
    if value is not missing:
        return value
    parameter = inspect.signature(family.config_class.__init__).parameters.get(key)
    return None if parameter is None or parameter.default is inspect.Parameter.empty else parameter.default


def window_layers(config: Any) -> tuple[int | None, list[int]]:
    """``(sliding_window, the layers that attend within it)`` as the installed transformers' eager and sdpa
    attention compute them for ``config`` (a raw config.json dict or a ``PretrainedConfig``; the module
    docstring gives the rules); ``(window, [])`` when no layer has one."""
    family = family_of(config)
    window = _family_field(config, family, "sliding_window") if family.sliding_window else None
    layers = int(_family_field(config, family, "num_hidden_layers"))
    if family.name == "qwen2" and TRANSFORMERS_5:
        if not _family_field(config, family, "use_sliding_window"):
            return None, []
        first = int(_family_field(config, family, "max_window_layers"))
        types = _family_field(config, family, "layer_types") or [
            "sliding_attention" if i >= first else "full_attention" for i in range(layers)
        ]
        return window, [
            i for i, kind in enumerate(types) if kind == "sliding_attention"
        ] if window is not None else []
    return window, list(range(layers)) if window is not None else []


def window_in_effect(config: Any) -> int | None:
    """The sliding window some layer of ``config`` attends within (``window_layers``), else None."""
    window, layers = window_layers(config)
    return window if layers else None


def _span(layers: list[int]) -> str:
    contiguous = layers == list(range(layers[0], layers[-1] + 1))
    if len(layers) == 1:
        return f"layer {layers[0]}"
    return f"layers {layers[0]}..{layers[-1]}" if contiguous else f"layers {', '.join(map(str, layers))}"


def check_sliding_window(raw_config: Mapping[str, Any], seq_len: int, where: str) -> None:
    """Refuse a config whose sliding window would take effect on ``seq_len``-token sequences under the
    installed transformers (``window_layers``; the module docstring says when); the message says why and
    what to change."""
    family = check_family_config(raw_config, where)
    window, windowed = window_layers(raw_config)
    if not windowed or seq_len <= window:
        return
    effect = (
        f"on max_seq_len={seq_len}-token sequences each position would see only the last {window} "
        "positions, but shearing's model has no window (its logits would not be the stock model's)"
    )
    shorten = f"lower max_seq_len to at most {window} (the window then never applies)"
    if family.name != "qwen2":
        raise ValueError(
            f"{where}: sliding_window={window}: {family.architecture} attends within a {window}-token window "
            f"in every layer, so {effect}. Sliding-window attention is not supported: {shorten}"
        )
    layers = int(_family_field(raw_config, family, "num_hidden_layers"))
    first = int(_family_field(raw_config, family, "max_window_layers"))
    if TRANSFORMERS_5:
        raise ValueError(
            f"{where}: sliding_window={window} with use_sliding_window=true: {_span(windowed)} of this Qwen2 "
            f"attend within a {window}-token window (transformers {transformers.__version__} applies it to the "
            f"layers its layer_types marks sliding_attention), so {effect}. Sliding-window attention is not "
            f"supported: {shorten}"
        )
    if _family_field(raw_config, family, "use_sliding_window") and first < layers:
        raise ValueError(
            f"{where}: sliding_window={window} with use_sliding_window=true and max_window_layers={first}: "
            f"layers {first}..{layers - 1} of this Qwen2 attend within a {window}-token window (and "
            f"transformers 4.51's eager/sdpa attention applies it to every layer), so {effect}. "
            f"Sliding-window attention is not supported: {shorten}"
        )
    unused = (
        f"use_sliding_window=true but max_window_layers={first} >= num_hidden_layers={layers}"
        if _family_field(raw_config, family, "use_sliding_window")
        else "use_sliding_window=false"
    )
    raise ValueError(
        f"{where}: sliding_window={window} with {unused}: the model uses no window, but "
        "transformers 4.51's eager and sdpa attention build the causal mask from sliding_window alone and so "
        f"apply a {window}-token window to every layer (only flash_attention_2 reads use_sliding_window): "
        f'{effect}. Set "sliding_window": null in this config.json (the model does not use it; stock '
        f"transformers then agrees at every length), or {shorten}"
    )
