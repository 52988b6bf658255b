"""Reading source models: a local Hugging Face LLaMA checkpoint (strictly) or a named shape (random init).

Loads are strict: a key missing from the checkpoint or a key the model does not have is an error
listing them, never a silent partial load. The only keys tolerated are ones that carry no weights:
rotary ``inv_freq`` buffers written by old transformers versions, and an ``lm_head.weight`` absent
from a checkpoint with tied embeddings.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file
from transformers import LlamaConfig

from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.models.shapes import (
    NAMED_CONFIG_EXTRAS,
    SHAPE_FIELDS,
    LlamaShape,
    is_checkpoint_dir,
    named_shape,
    read_config_json,
    shape_from_mapping,
)

IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


def config_from_shape(shape: LlamaShape, **extra) -> LlamaConfig:
    """An HF ``LlamaConfig`` of this shape (``head_dim`` always written explicitly)."""
    fields = dict(
        hidden_size=shape.hidden_size,
        num_hidden_layers=shape.num_hidden_layers,
        num_attention_heads=shape.num_attention_heads,
        num_key_value_heads=shape.num_key_value_heads,
        intermediate_size=shape.intermediate_size,
        vocab_size=shape.vocab_size,
        head_dim=shape.head_dim,
        tie_word_embeddings=shape.tie_word_embeddings,
    )
    fields.update(extra)
    return LlamaConfig(**fields)


def read_hf_config(path: str | os.PathLike) -> LlamaConfig:
    config = LlamaConfig.from_dict(read_config_json(path))
    if getattr(config, "head_dim", None) is None:
        config.head_dim = config.hidden_size // config.num_attention_heads
    return config


def read_hf_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an HF checkpoint directory (safetensors, sharded or not; else pytorch_model*.bin)."""
    root = Path(path)
    files = sorted(root.glob("*.safetensors"))
    if files:
        state: dict[str, torch.Tensor] = {}
        for file in files:
            state.update(load_file(file))
        return state
    bins = sorted(root.glob("pytorch_model*.bin"))
    if bins:
        state = {}
        for file in bins:
            state.update(torch.load(file, map_location="cpu", weights_only=True))
        return state
    raise ValueError(f"{path} holds no *.safetensors or pytorch_model*.bin weights")


def load_state_dict_strict(model: MaskedLlamaForCausalLM, state: dict[str, torch.Tensor], where: str) -> None:
    """Load ``state`` into ``model``; any missing or unexpected key is an error naming the keys."""
    state = {k: v for k, v in state.items() if not k.endswith(IGNORED_SUFFIXES)}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    expected = set(model.state_dict())
    if model.config.tie_word_embeddings:
        expected.discard("lm_head.weight")
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        raise ValueError(
            f"checkpoint {where} does not match the model: missing keys {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''}, unexpected keys {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''}. Is it a LlamaForCausalLM checkpoint of this config?"
        )
    own = model.state_dict()
    for key, tensor in state.items():
        if tuple(tensor.shape) != tuple(own[key].shape):
            raise ValueError(
                f"checkpoint {where}: {key} has shape {tuple(tensor.shape)} but the config gives {tuple(own[key].shape)}"
            )
    model.load_state_dict(state, strict=False)  # strictness checked above, with the tie handled


def load_source_model(
    spec: str | os.PathLike | Mapping[str, Any], attn_impl: str = "sdpa", seed: int = 17
) -> tuple[MaskedLlamaForCausalLM, LlamaConfig]:
    """The source model: an HF checkpoint directory (strict load), or a named shape or a mapping of shape
    fields (random init, seeded)."""
    if is_checkpoint_dir(spec):
        config = read_hf_config(spec)
        model = MaskedLlamaForCausalLM(config, attn_impl=attn_impl)
        load_state_dict_strict(model, read_hf_state_dict(spec), where=str(spec))
        return model, config
    if isinstance(spec, Mapping):
        shape = shape_from_mapping(spec)
        extras = {k: v for k, v in spec.items() if k not in SHAPE_FIELDS}
    else:
        shape, extras = named_shape(str(spec)), NAMED_CONFIG_EXTRAS.get(str(spec), {})
    config = config_from_shape(shape, **extras)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = MaskedLlamaForCausalLM(config, attn_impl=attn_impl)
    return model, config
