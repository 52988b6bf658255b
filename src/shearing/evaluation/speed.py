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
"""

from __future__ import annotations

import statistics
import time
from typing import Any

import torch

from shearing.evaluation.loading import count_parameters


def make_prompt(
    vocab_size: int, batch_size: int, prompt_len: int, device: torch.device, seed: int = 0
) -> torch.Tensor:
    """A ``[B, P]`` block of random token ids below ``vocab_size``, the same for every call with this seed."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch_size, prompt_len), generator=generator)
    return ids.to(device)


def _sync(device: torch.device) -> None:
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
    _sync(prompt.device)
    start = time.perf_counter()
    out = model.generate(input_ids=prompt, attention_mask=mask, generation_config=config)
    _sync(prompt.device)
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
