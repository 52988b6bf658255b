"""Inference speed of a (pruned) model against a baseline: prefill and decode tokens/s, same prompt.

Both phases are timed through ``generate`` (greedy, KV cache, ``min_new_tokens = max_new_tokens`` so an
end-of-sequence token cannot stop it early): one call with a single new token is the prefill (one
forward over the prompt), one call with N new tokens adds exactly N - 1 cached decode steps, so

    prefill tokens/s = B * P / t(1)        decode tokens/s = B * (N - 1) / (t(N) - t(1))

with B the batch, P the prompt length and t a wall time, after a warm-up generate per model (kernel
selection, allocator, CPU caches). On CUDA the clock is read after ``torch.cuda.synchronize()``. The
prompt is a seeded random token block shared by both models: speed does not depend on the content, and
a fixed token count keeps the comparison exact. Ratios are model / baseline, so > 1 means the model is
faster.

Why trials, interleaved (``compare_speed`` / ``run_trials``): timing each model's repeats in one block
let a drift of the machine between the blocks (another process, clock boost, a cold cache) land on one
model only; two identical runs gave decode 0.51x and 16.84x where a standalone timing said about 2.1x.
Now each trial times the model then the baseline (A B A B ...), each trial yields its own prefill and
decode rate, and trials repeat (at least ``repeats``) until the relative spread IQR / median of every
rate and of the per-trial speedups is within a tolerance, or a time cap passes. Results carry median,
min, max, quartiles, spread and trial count per model and phase, the speedup as the median of per-trial
ratios (paired in time), and a warning when the spread stayed large. ``measure_generation`` (one model, medians of blocks) remains for
``bench/throughput.py``'s single-model rows.

``random_llama`` builds the models of a shape-only comparison (``bench/throughput.py``): stock
``LlamaForCausalLM`` with random weights, optionally with per-layer widths planned by
``nonuniform_layer_widths`` (see the note above it).
"""

from __future__ import annotations

import copy
import math
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from shearing.evaluation.loading import count_parameters, dtype_kwargs
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
    repeats: int = 5,
    seed: int = 0,
    tolerance: float = 0.1,
    max_seconds: float = 300.0,
    max_trials: int = 50,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Prefill/decode tokens/s of ``model`` and ``baseline`` on one shared prompt, timed in interleaved
    trials (``run_trials``: at least ``repeats``, until the spread is within ``tolerance`` or
    ``max_seconds`` pass), and their ratios."""
    if prompt_len < 1 or batch_size < 1 or repeats < 1:
        raise ValueError(
            f"--prompt-len, --batch-size and --repeats must be at least 1, got {prompt_len}, {batch_size}, {repeats}"
        )
    if new_tokens < 2:
        raise ValueError(f"--new-tokens must be at least 2 to time decoding, got {new_tokens}")
    if not tolerance > 0 or not max_seconds > 0:
        raise ValueError(
            f"--speed-tolerance and --speed-max-seconds must be > 0, got {tolerance} and {max_seconds}"
        )
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
    models = {"model": model, "baseline": baseline}
    for m in models.values():  # warm-up: kernel selection, allocator, caches
        time_generate(m, prompt, new_tokens)

    def measure(name: str) -> tuple[float, float]:
        return time_generate(models[name], prompt, 1), time_generate(models[name], prompt, new_tokens)

    trials = run_trials(
        measure,
        batch_size,
        prompt_len,
        new_tokens,
        min_trials=repeats,
        max_trials=max(max_trials, repeats),
        tolerance=tolerance,
        max_seconds=max_seconds,
        progress=progress,
    )
    for name, m in models.items():
        trials[name] = {"parameters": count_parameters(m), **trials[name]}
    return {
        "device": device.type,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "prompt_len": prompt_len,
        "new_tokens": new_tokens,
        "batch_size": batch_size,
        "repeats": repeats,
        **trials,
    }


def spread_stats(values: Sequence[float]) -> dict[str, float | int]:
    """Median, min, max, quartiles and the relative spread ``IQR / median`` of ``values`` (at least one).

    The interquartile range (``statistics.quantiles``, inclusive method) ignores a lone outlier (a GC
    pause, a clock ramp) that ``max - min`` would keep forever, so it settles as trials accumulate."""
    if not values:
        raise ValueError("no trials to aggregate")
    values = sorted(float(v) for v in values)
    median = statistics.median(values)
    q1, q3 = (median, median)
    if len(values) > 1:
        q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return {
        "median": median,
        "min": values[0],
        "max": values[-1],
        "q1": q1,
        "q3": q3,
        "spread": (q3 - q1) / median if median > 0 else math.inf,
        "trials": len(values),
    }


def run_trials(
    measure: Callable[[str], tuple[float, float]],
    batch_size: int,
    prompt_len: int,
    new_tokens: int,
    names: Sequence[str] = ("model", "baseline"),
    min_trials: int = 5,
    max_trials: int = 50,
    tolerance: float = 0.1,
    max_seconds: float = 300.0,
    clock: Callable[[], float] = time.perf_counter,
    progress: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Interleaved timing trials until every rate is stable; the statistics of each model and the ratios.

    One *round* times ``measure(name)`` for each of ``names`` in turn (A B, A B, ...), so a slow drift of
    the machine (clocks, thermals, a neighbour's job) hits both models alike. ``measure`` returns
    ``(t1, tN)``: the seconds of a 1-token and of an N-token generate. Per trial, prefill tokens/s is
    ``B P / t1`` and decode tokens/s ``B (N - 1) / (tN - t1)`` (a trial whose difference is not positive
    has no decode rate; it is counted in ``decode_invalid``). Rounds stop when, after at least
    ``min_trials``, the relative spread (IQR / median) of every model's prefill and decode rate, and of
    the per-round speedups, is at most ``tolerance`` (``stopped: "converged"``), or at ``max_trials`` rounds, or once ``max_seconds``
    have passed on ``clock`` (checked after each round; at least one round always runs). ``spread_ok``
    is false and ``warning`` says so when the spread is still above the tolerance at the end.

    The per-model rate is the median over trials; ``prefill_s``/``decode_s`` are the times that median
    rate means. The speedup is the median of the per-round ratios model / baseline (paired in time),
    with its own spread statistics.
    """
    if min_trials < 1 or max_trials < min_trials:
        raise ValueError(
            f"--repeats (minimum trials) must be at least 1 and at most the maximum {max_trials}, got {min_trials}"
        )
    if not tolerance > 0:
        raise ValueError(f"--speed-tolerance must be > 0 (a relative spread, e.g. 0.1), got {tolerance}")
    if not max_seconds > 0:
        raise ValueError(f"--speed-max-seconds must be > 0, got {max_seconds}")
    rates: dict[str, dict[str, list[float]]] = {n: {"prefill": [], "decode": []} for n in names}
    ratios: dict[str, list[float]] = {"prefill": [], "decode": []}
    invalid = dict.fromkeys(names, 0)
    start = clock()
    stopped, trial = "max trials", 0
    while trial < max_trials:
        trial += 1
        this_round: dict[str, dict[str, float | None]] = {}
        for name in names:
            t1, tn = measure(name)
            prefill = batch_size * prompt_len / t1
            decode = batch_size * (new_tokens - 1) / (tn - t1) if tn > t1 else None
            rates[name]["prefill"].append(prefill)
            if decode is None:
                invalid[name] += 1
            else:
                rates[name]["decode"].append(decode)
            this_round[name] = {"prefill": prefill, "decode": decode}
            if progress is not None:
                shown = "n/a" if decode is None else f"{decode:,.1f}"
                progress(f"speed trial {trial}: {name} prefill {prefill:,.1f} tok/s decode {shown} tok/s")
        if len(names) == 2:
            a, b = (this_round[n] for n in names)
            for phase in ("prefill", "decode"):
                if a[phase] is not None and b[phase] is not None:
                    ratios[phase].append(a[phase] / b[phase])
        spreads = [spread_stats(v)["spread"] if v else math.inf for r in rates.values() for v in r.values()]
        spreads += [spread_stats(v)["spread"] for v in ratios.values() if v]
        if trial >= min_trials and max(spreads) <= tolerance:
            stopped = "converged"
            break
        if clock() - start >= max_seconds:
            stopped = "time cap"
            break
    elapsed = clock() - start
    result: dict[str, Any] = {
        "trials": trial,
        "min_trials": min_trials,
        "tolerance": tolerance,
        "max_seconds": max_seconds,
        "elapsed_s": elapsed,
        "stopped": stopped,
    }
    worst = []
    for name in names:
        if not rates[name]["decode"]:
            raise ValueError(
                f"decoding {new_tokens - 1} tokens took no measurable time in any of {trial} trials of the "
                f"{name}: raise --new-tokens"
            )
        prefill, decode = spread_stats(rates[name]["prefill"]), spread_stats(rates[name]["decode"])
        result[name] = {
            "prefill_tokens_per_s": prefill["median"],
            "decode_tokens_per_s": decode["median"],
            "prefill_s": batch_size * prompt_len / prefill["median"],
            "decode_s": batch_size * (new_tokens - 1) / decode["median"],
            "prefill": prefill,
            "decode": decode,
            "decode_invalid": invalid[name],
        }
        worst += [(prefill["spread"], f"{name} prefill rate"), (decode["spread"], f"{name} decode rate")]
    for phase in ("prefill", "decode"):
        if ratios[phase]:
            stats = spread_stats(ratios[phase])
            result[f"{phase}_speedup"] = stats["median"]
            result[f"{phase}_speedup_stats"] = stats
            worst.append((stats["spread"], f"{phase} speedup"))
    spread, which = max(worst)
    result["max_spread"] = spread
    result["spread_ok"] = spread <= tolerance
    result["warning"] = None
    if not result["spread_ok"]:
        result["warning"] = (
            f"speed numbers are noisy: the {which} still spreads {spread:.0%} (IQR / median) after "
            f"{trial} trials ({stopped}, tolerance {tolerance:.0%}); treat the ratios as rough, run on an idle "
            "machine, raise --new-tokens or --speed-max-seconds"
        )
    return result


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
        model = LlamaForCausalLM._from_config(config, attn_implementation="sdpa", **dtype_kwargs(dtype))
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
