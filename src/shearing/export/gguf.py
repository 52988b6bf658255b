"""Write an exported LLaMA model as a single GGUF file (llama.cpp's format), without llama.cpp.

``python -m shearing.export ... --gguf [NAME]`` calls ``write_gguf`` on the finished export (inside its
temporary folder, so the GGUF appears atomically with the rest: ``OUT/model.gguf`` by default). PyPI has
no HF -> GGUF converter, only the ``gguf`` package's ``GGUFWriter``; this module is the converter for
the one architecture shearing exports, ``LlamaForCausalLM``.

What goes in:

- Metadata under ``llama.*``: context length (``max_position_embeddings``), embedding length (hidden),
  block count, feed-forward length, head count and KV head count, ``rope.dimension_count`` =
  ``head_dim`` and ``attention.key_length`` / ``value_length`` (a pruned model's heads x head_dim need
  not equal its hidden size; transformers reads head_dim back from ``rope.dimension_count``), rope freq
  base, RMS eps, vocab size; ``general.file_type`` (``ALL_F32`` or ``MOSTLY_F16``). Rope scaling:
  ``linear`` is written as llama.cpp's ``rope.scaling.type/factor``; LLaMA-3's ``llama3`` scaling as the
  per-frequency ``rope_freqs.weight`` factors llama.cpp reads; any other type is refused. RoPE theta and
  scaling are read through ``shearing.models.hf_io.portable_config_dict`` (transformers 5's config has
  ``rope_parameters`` and no ``rope_theta`` attribute; 4.x's has ``rope_theta``/``rope_scaling``).
- The tokenizer (``shearing.export.gguf_vocab``): byte-level BPE (ours, SmolLM2's, LLaMA-3's, Qwen2's) as
  ``tokenizer.ggml.model = "gpt2"``, with ``tokenizer.ggml.pre`` identified from what the pre-tokenizer
  does (a tokenizer llama.cpp would split differently is refused), the tokens in id order (padded with
  ``[PAD<i>]`` up to the model's vocab size), token types, merges, and bos/eos/pad ids as the export's
  ``generation_config.json`` has them (a warning when the tokenizer files disagree). SentencePiece
  tokenizers (LLaMA-2's) are refused rather than written approximately.
- Tensors under llama.cpp's names: ``token_embd``, ``blk.N.{attn_norm, attn_q, attn_k, attn_v,
  attn_output, ffn_norm, ffn_gate, ffn_up, ffn_down}``, ``output_norm`` and ``output`` (absent when the
  embeddings are tied: that absence is how readers know). q and k rows are permuted per head from HF's
  rotate-half layout to the interleaved pairs llama.cpp's rope uses (rows ``[h, 2, d/2]`` ->
  ``[h, d/2, 2]``; k with the KV head count); transformers' GGUF loader applies the inverse, so loading
  the file with ``from_pretrained(dir, gguf_file=...)`` gives back the HF weights exactly.
- Precision from ``--dtype``: float32 -> F32; float16 -> F16; bfloat16 -> F16 (GGUF readers expect
  F16/F32 for unquantised files), or F32 when a weight would overflow float16 (a warning says so).
  A non-finite value in what would be written (float16's inf for a weight beyond 65504, or a NaN) is
  refused, naming the tensor; nothing is written.
  1-D tensors (norms, rope factors) are always F32, as llama.cpp writes them. No quantisation: llama.cpp's
  ``llama-quantize`` does that from this file.
"""

from __future__ import annotations

import logging
import math
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from shearing.export.gguf_vocab import gguf_tokenizer
from shearing.models.hf_io import portable_config_dict

log = logging.getLogger(__name__)

DEFAULT_NAME = "model.gguf"
FP16_MAX = 65504.0

# HF LlamaForCausalLM state-dict name pieces -> llama.cpp tensor names.
_LAYER_TENSORS = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}
_GLOBAL_TENSORS = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}


def check_gguf_name(name: str) -> str:
    """``--gguf NAME``: a plain file name ending in ``.gguf``, written inside the export folder."""
    if not isinstance(name, str) or not name.endswith(".gguf") or os.sep in name or name in ("", ".gguf"):
        raise ValueError(
            f"--gguf {name!r} must be a file name ending in .gguf (it is written inside the export folder, "
            f"atomically with it), e.g. --gguf {DEFAULT_NAME}"
        )
    return name


def gguf_tensor_name(hf_name: str) -> str:
    """The llama.cpp name of an HF ``LlamaForCausalLM`` state-dict key."""
    if hf_name in _GLOBAL_TENSORS:
        return _GLOBAL_TENSORS[hf_name]
    parts = hf_name.split(".", 3)  # model.layers.N.rest
    if len(parts) == 4 and parts[:2] == ["model", "layers"] and parts[3] in _LAYER_TENSORS:
        return f"blk.{int(parts[2])}.{_LAYER_TENSORS[parts[3]]}"
    raise ValueError(
        f"tensor {hf_name!r} has no llama.cpp name: only LlamaForCausalLM weights can be written"
    )


def permute_for_rope(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Rows of a q/k projection from HF's rotate-half order to llama.cpp's interleaved pairs, per head."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise ValueError(f"a projection with {rows} rows cannot be split into {n_heads} heads of even size")
    half = rows // n_heads // 2
    return weight.reshape(n_heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def rope_settings(config: Any) -> tuple[float, dict[str, Any] | None]:
    """``(rope_theta, rope_scaling)`` of an HF config under transformers 4.x and 5.x alike (the 4.x form of
    ``portable_config_dict``; ``rope_scaling`` is None for plain RoPE)."""
    portable = portable_config_dict(config.to_dict())
    return float(portable["rope_theta"]), portable.get("rope_scaling")


def llama3_rope_factors(config: Any) -> np.ndarray:
    """Per-frequency divisors of LLaMA-3's rope scaling, in the form llama.cpp's ``rope_freqs`` holds."""
    theta, scaling = rope_settings(config)
    head_dim = _head_dim(config)
    freqs = 1.0 / (theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim))
    factor = float(scaling["factor"])
    low, high = float(scaling.get("low_freq_factor", 1.0)), float(scaling.get("high_freq_factor", 4.0))
    old_len = float(scaling.get("original_max_position_embeddings", 8192))
    low_wavelen, high_wavelen = old_len / low, old_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_wavelen:
            factors.append(1.0)
        elif wavelen > low_wavelen:
            factors.append(factor)
        else:
            smooth = (old_len / wavelen - low) / (high - low)
            factors.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.asarray(factors, dtype=np.float32)


def _head_dim(config: Any) -> int:
    return int(getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads)


# --------------------------------------------------------------------------------------- writer
def write_gguf(
    config: Any,
    state: dict[str, torch.Tensor],
    folder: str | os.PathLike,
    path: str | os.PathLike,
    dtype: str = "float32",
    name: str = "shearing export",
) -> dict[str, Any]:
    """Write ``state`` (an HF ``LlamaForCausalLM`` state dict) as a llama GGUF at ``path``.

    ``folder`` is the export folder: its tokenizer files, ``generation_config.json`` and ``config.json``
    give the ``tokenizer.ggml.*`` fields (``shearing.export.gguf_vocab``). Returns ``{"file", "file_type",
    "tensors", "bytes", "tokenizer_pre", "special_tokens"}``. Every check runs before the file is opened,
    and the file appears at ``path`` only once complete.
    """
    from gguf import GGUFWriter, LlamaFileType, RopeScalingType

    if getattr(config, "model_type", "llama") != "llama":
        raise ValueError(
            f"--gguf writes llama-architecture GGUF files; model_type {config.model_type!r} is not supported: "
            "export without --gguf (export.gguf: null); the HF folder loads with its stock class"
        )
    if dtype not in ("float32", "float16", "bfloat16"):
        raise ValueError(f"dtype must be float32, float16 or bfloat16 for --gguf, got {dtype!r}")
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ValueError("--gguf: attention_bias / mlp_bias models are not LLaMA as llama.cpp reads it")
    rope_kind, rope_factors = _rope_scaling(config)
    tokenizer = gguf_tokenizer(folder, config)
    arrays, half = _tensor_arrays(config, state, dtype)
    file_type = LlamaFileType.MOSTLY_F16 if half else LlamaFileType.ALL_F32

    head_dim = _head_dim(config)
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    writer = GGUFWriter(os.fspath(tmp), arch="llama")
    writer.add_name(name)
    writer.add_context_length(int(config.max_position_embeddings))
    writer.add_embedding_length(int(config.hidden_size))
    writer.add_block_count(int(config.num_hidden_layers))
    writer.add_feed_forward_length(int(config.intermediate_size))
    writer.add_head_count(int(config.num_attention_heads))
    writer.add_head_count_kv(int(config.num_key_value_heads))
    writer.add_rope_dimension_count(head_dim)
    writer.add_key_length(head_dim)
    writer.add_value_length(head_dim)
    theta, scaling = rope_settings(config)
    writer.add_rope_freq_base(theta)
    if rope_kind == "linear":
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(scaling["factor"]))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_vocab_size(int(config.vocab_size))
    writer.add_file_type(file_type)

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(tokenizer["pre"])
    writer.add_token_list(tokenizer["tokens"])
    writer.add_token_types(tokenizer["types"])
    writer.add_token_merges(tokenizer["merges"])
    for kind, chosen in tokenizer["special"].items():
        getattr(writer, f"add_{kind}_token_id")(chosen["id"])
    writer.add_add_bos_token(bool(tokenizer["add_bos"]))
    writer.add_add_eos_token(bool(tokenizer["add_eos"]))
    if tokenizer["chat_template"]:
        writer.add_chat_template(tokenizer["chat_template"])

    if rope_factors is not None:
        writer.add_tensor("rope_freqs.weight", rope_factors)
    for tensor_name, array in arrays.items():
        writer.add_tensor(tensor_name, array)
    try:
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return {
        "file": path.name,
        "file_type": "MOSTLY_F16" if half else "ALL_F32",
        "tensors": len(arrays) + (rope_factors is not None),
        "bytes": path.stat().st_size,
        "tokenizer_pre": tokenizer["pre"],
        "special_tokens": tokenizer["special"],
    }


def _tensor_arrays(
    config: Any, state: dict[str, torch.Tensor], dtype: str
) -> tuple[dict[str, np.ndarray], bool]:
    """The arrays to write under their llama.cpp names, and whether 2-D ones are F16 (see the docstring).

    Refuses (ValueError naming the tensor) any non-finite value in what would be written: a weight that
    float16 cannot hold becomes inf in an F16 tensor, and llama.cpp would compute with it."""
    tied = bool(config.tie_word_embeddings) or "lm_head.weight" not in state
    arrays, hf_names = {}, {}
    for key, value in state.items():
        if key == "lm_head.weight" and tied:
            continue
        hf_names[gguf_tensor_name(key)] = key
        arrays[gguf_tensor_name(key)] = value.detach().to(torch.float32).cpu().numpy()
    for i in range(int(config.num_hidden_layers)):
        q, k = f"blk.{i}.attn_q.weight", f"blk.{i}.attn_k.weight"
        arrays[q] = permute_for_rope(arrays[q], int(config.num_attention_heads))
        arrays[k] = permute_for_rope(arrays[k], int(config.num_key_value_heads))
    half = dtype != "float32"
    if dtype == "bfloat16":
        worst = max(float(np.abs(a).max()) for a in arrays.values() if a.ndim > 1)
        if worst > FP16_MAX:
            message = f"--gguf: a weight reaches {worst:.3g}, beyond float16; the GGUF is written in float32"
            warnings.warn(message, stacklevel=3)
            log.warning(message)
            half = False
    bad = []
    for tensor_name, array in arrays.items():
        written = array
        if half and array.ndim > 1:
            with np.errstate(over="ignore"):
                written = array.astype(np.float16)
        if not np.isfinite(written).all():
            worst = float(np.abs(array).max())  # nan when the weights hold a NaN
            bad.append(f"{tensor_name} ({hf_names.get(tensor_name, tensor_name)}) max |value| {worst:.4g}")
        arrays[tensor_name] = np.ascontiguousarray(written)
    if bad:
        fix = (
            f"float16 holds up to {FP16_MAX:g}: export with --dtype bfloat16 (its GGUF falls back to F32 for "
            "such weights) or --dtype float32"
            if dtype == "float16"
            else "the weights themselves are not finite: export an earlier checkpoint"
        )
        raise ValueError(
            f"--gguf refused: non-finite values as written ({dtype}) in {len(bad)} tensor(s): "
            f"{'; '.join(bad[:5])}. {fix}. Nothing was written"
        )
    return arrays, half


def _rope_scaling(config: Any) -> tuple[str | None, np.ndarray | None]:
    _, scaling = rope_settings(config)
    if not scaling:
        return None, None
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind in (None, "default"):
        return None, None
    if kind == "linear":
        return "linear", None
    if kind == "llama3":
        return "llama3", llama3_rope_factors(config)
    raise ValueError(
        f"--gguf: rope_scaling type {kind!r} has no llama.cpp equivalent written by shearing (linear and "
        "llama3 are); export without --gguf"
    )
