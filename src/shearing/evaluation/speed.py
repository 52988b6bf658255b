"""Inference speed of a (pruned) model against a baseline: prefill and decode tokens/s, same prompt.

Both phases are timed through ``generate`` (greedy, KV cache, ``min_new_tokens = max_new_tokens`` so an
end-of-sequence token cannot stop it early): one call with a single new token is the prefill (one
forward over the prompt), one call with N new tokens adds exactly N - 1 cached decode steps, so

    prefill tokens/s = B * P / t(1)        decode tokens/s = B * (N - 1) / (t(N) - t(1))

with B the batch, P the prompt length and t the median wall time over ``repeats`` runs, after a warm-up
generate per model (kernel selection, allocator, CPU caches). On CUDA the clock is read after
``torch.cuda.synchronize()``. The prompt is a seeded random token block shared by both models: speed
does not depend on the content, and a fixed token count keeps the comparison exact. Ratios are
model / baseline, so > 1 means the model is faster.

``random_llama`` builds the models of a shape-only comparison (``bench/throughput.py``): stock
``LlamaForCausalLM`` with random weights, optionally with per-layer widths planned by
``nonuniform_layer_widths`` (see the note above it).
"""

from __future__ import annotations

import copy
import statistics
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from shearing.evaluation.loading import count_parameters
from shearing.models.shapes import LlamaShape, layer_params, outside_layer_params


def make_prompt(
    vocab_size: int, batch_size: int, prompt_len: int, device: torch.device, seed: int = 0
) -> torch.Tensor:
    """A ``[B, P]`` block of random token ids below ``vocab_size``, the same for every call with this seed."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, prompt_len), generator=generator)
    return ids.to(device)


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op off CUDA), so wall-clock times cover it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def time_generate(model: Any, prompt: torch.Tensor, new_tokens: int) -> float:
    """Seconds for one greedy ``generate`` of exactly ``new_tokens`` tokens after ``prompt``."""
    from transformers import GenerationConfig

    config = GenerationConfig(
        do_sample=False,
        num_beams=1,
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        use_cache=True,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id or 0,
    )
    mask = torch.ones_like(prompt)
    sync(prompt.device)
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=mask, generation_config=config)
    sync(prompt.device)
    seconds = time.perf_counter() - start
    assert out.shape == (prompt.shape[0], prompt.shape[1] + new_tokens), out.shape
    return seconds


def measure_generation(
    model: Any, prompt: torch.Tensor, new_tokens: int, repeats: int = 3, warmup: int = 1
) -> dict[str, float | int]:
    """Prefill and decode throughput of ``model`` on ``prompt`` (see the module note for the method)."""
    for _ in range(warmup):
        time_generate(model, prompt, new_tokens)
    prefill = statistics.median(time_generate(model, prompt, 1) for _ in range(repeats))
    full = statistics.median(time_generate(model, prompt, new_tokens) for _ in range(repeats))
    decode = full - prefill
    if decode <= 0:
        raise ValueError(
            f"decoding {new_tokens - 1} tokens took no measurable time ({full:.2e} s with them, "
            f"{prefill:.2e} s without): raise --new-tokens"
        )
    batch, prompt_len = prompt.shape
    return {
        "parameters": count_parameters(model),
        "prefill_s": prefill,
        "decode_s": decode,
        "prefill_tokens_per_s": batch * prompt_len / prefill,
        "decode_tokens_per_s": batch * (new_tokens - 1) / decode,
    }


def compare_speed(
    model: Any,
    baseline: Any,
    prompt_len: int = 512,
    new_tokens: int = 128,
    batch_size: int = 1,
    repeats: int = 3,
    seed: int = 0,
) -> dict[str, Any]:
    """Prefill/decode tokens/s of ``model`` and ``baseline`` on one shared prompt, and their ratios."""
    if prompt_len < 1 or batch_size < 1 or repeats < 1:
        raise ValueError(
            f"--prompt-len, --batch-size and repeats must be at least 1, got {prompt_len}, {batch_size}, {repeats}"
        )
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 to time decoding, got {new_tokens}")
    device = next(model.parameters()).device
    if next(baseline.parameters()).device != device:
        raise ValueError("the model and the speed baseline must be on the same device")
    for name, m in (("model", model), ("baseline", baseline)):
        limit = getattr(m.config, "max_position_embeddings", None)
        if limit is not None and prompt_len + new_tokens > limit:
            raise ValueError(
                f"--prompt-len {prompt_len} + --new-tokens {new_tokens} exceeds the {name}'s "
                f"max_position_embeddings {limit}: shorten them"
            )
    vocab = min(model.config.vocab_size, baseline.config.vocab_size)
    prompt = make_prompt(vocab, batch_size, prompt_len, device, seed)
    ours = measure_generation(model, prompt, new_tokens, repeats)
    theirs = measure_generation(baseline, prompt, new_tokens, repeats)
    return {
        "device": device.type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        "model": ours,
        "baseline": theirs,
        "prefill_speedup": ours["prefill_tokens_per_s"] / theirs["prefill_tokens_per_s"],
        "decode_speedup": ours["decode_tokens_per_s"] / theirs["decode_tokens_per_s"],
    }


# ---------------------------------------------------------------------------------------------------
# Randomly initialised HF models for speed comparisons, uniform or with per-layer widths.
#
# A *non-uniform* model keeps the source's hidden size and depth and gives every decoder layer its own
# number of query/KV heads and MLP channels, as width pruning without a target shape (LLM-Pruner) ends
# up with. ``nonuniform_layer_widths`` plans one with a given total parameter count: the first and last
# few layers stay dense (LLM-Pruner's LLaMA-7B example prunes blocks 4-29 of 32; scaled here to the
# depth), the others keep a fraction of their heads and channels that varies from layer to layer, and
# the MLP widths are arbitrary integers (not multiples of 64), so GEMMs get ragged sizes.

LayerWidths = tuple[int, int, int]  # (query heads, KV heads, MLP channels) of one decoder layer


def nonuniform_param_count(source: LlamaShape, layers: Sequence[LayerWidths]) -> int:
    """Total parameters of a decoder with ``source``'s hidden size, vocabulary and head_dim and these layers."""
    return outside_layer_params(source) + sum(
        layer_params(source.hidden_size, source.head_dim, *w) for w in layers
    )


def nonuniform_layer_widths(
    source: LlamaShape,
    target_params: int,
    dense_first: int | None = None,
    dense_last: int | None = None,
    spread: float = 0.3,
    seed: int = 0,
) -> list[LayerWidths]:
    """Per-layer widths of an LLM-Pruner-like model of ``source``'s hidden size and depth, ``target_params``
    parameters in total (to within a few times 3 D).

    ``dense_first``/``dense_last`` layers keep the source widths (default: 4 and 2 per 32 layers, rounded).
    Every other layer keeps KV groups in proportion to ``ratio * f_i`` (f_i drawn uniformly from
    ``1 ± spread`` with ``seed``; whole groups, so each layer stays a valid GQA/MHA layer) and MLP
    channels in proportion to another such draw, the ratio chosen so the total hits the target.
    """
    depth, d, k, group = (
        source.num_hidden_layers,
        source.hidden_size,
        source.head_dim,
        source.group_size,
    )
    first = round(4 * depth / 32) if dense_first is None else dense_first
    last = round(2 * depth / 32) if dense_last is None else dense_last
    pruned = [i for i in range(depth) if first <= i < depth - last]
    dense = (source.num_attention_heads, source.num_key_value_heads, source.intermediate_size)
    widths = [dense] * depth
    fixed = nonuniform_param_count(source, [dense] * (depth - len(pruned)))
    smallest = len(pruned) * layer_params(d, k, group, 1, 1)
    largest = len(pruned) * layer_params(d, k, *dense)
    if not pruned or not smallest <= target_params - fixed < largest:
        raise ValueError(
            f"no non-uniform model of hidden size {d} and {depth} layers ({first} + {last} dense) has "
            f"{target_params:,} parameters: its size ranges over [{fixed + smallest:,}, {fixed + largest:,}); "
            "use more layers (or another target)"
        )
    rng = np.random.default_rng(seed)
    head_f = 1 + spread * rng.uniform(-1, 1, len(pruned))
    mlp_f = 1 + spread * rng.uniform(-1, 1, len(pruned))
    budget = target_params - fixed - len(pruned) * 2 * d  # attention and MLP weights of the pruned layers
    ratio = budget / (len(pruned) * (layer_params(d, k, *dense) - 2 * d))
    groups = np.clip(np.rint(ratio * head_f * source.num_key_value_heads), 1, source.num_key_value_heads)
    attention = int(sum(2 * d * k * (g * group + g) for g in groups))
    channels = (budget - attention) / (3 * d)  # MLP channels over all pruned layers
    mlp = np.clip(np.rint(channels * mlp_f / mlp_f.sum()), 1, source.intermediate_size).astype(int)
    mlp[-1] = np.clip(mlp[-1] + round(channels - mlp.sum()), 1, source.intermediate_size)
    mlp = np.where(mlp % 64 == 0, mlp - 1, mlp)  # ragged, as importance-based pruning leaves them
    for i, g, c in zip(pruned, groups, mlp):
        widths[i] = (int(g) * group, int(g), int(c))
    total = nonuniform_param_count(source, widths)
    if abs(total - target_params) > 0.01 * target_params:
        raise ValueError(
            f"the non-uniform plan has {total:,} parameters, more than 1% off the target {target_params:,}: "
            "lower spread"
        )
    return widths


@contextmanager
def _default_device_dtype(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            yield
    finally:
        torch.set_default_dtype(old)


def random_llama(
    config: Any, device: torch.device, dtype: torch.dtype, layers: Sequence[LayerWidths] | None = None
) -> Any:
    """A randomly initialised ``transformers.LlamaForCausalLM`` built directly on ``device`` in ``dtype``, in
    eval mode. With ``layers``, decoder layer i is a stock ``LlamaDecoderLayer`` built from a copy of the
    config with that layer's heads, KV heads and MLP width (attention and MLP read them from the config)."""
    from transformers import LlamaForCausalLM
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    config = copy.deepcopy(config)
    if layers is not None:
        config.num_hidden_layers = 0
    with _default_device_dtype(device, dtype):
        model = LlamaForCausalLM._from_config(config, torch_dtype=dtype, attn_implementation="sdpa")
        for i, (heads, kv_heads, channels) in enumerate(layers or ()):
            layer_config = copy.deepcopy(model.config)
            layer_config.num_attention_heads = heads
            layer_config.num_key_value_heads = kv_heads
            layer_config.intermediate_size = channels
            layer = LlamaDecoderLayer(layer_config, layer_idx=i)
            layer.apply(model._init_weights)
            model.model.layers.append(layer)
    if layers is not None:  # the decoder runs layers[: config.num_hidden_layers]
        model.config.num_hidden_layers = model.model.config.num_hidden_layers = len(layers)
    return model.eval()
