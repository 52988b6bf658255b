"""Throughput of every phase of Sheared-LLaMA on one device: pruning, continued pre-training (CPT), dynamic
loading and inference, in one run (issue 5, section 2).

    python bench/throughput.py --json bench_out/throughput.json                    # GPU: every section
    python bench/throughput.py --sections cpt --activation-checkpointing --json ...  # one section
    OMP_NUM_THREADS=2 python bench/throughput.py --device cpu --shape demo_source --target demo_pruned \
        --cpt-shapes demo_pruned --seq-len 1024 --steps 10 --warmup 2 --loader-domain-scale 0.1 \
        --infer-layers 4 --prompt-len 256 --new-tokens 64 --repeats 2                # CPU-sized

The training sections share one method: bf16 autocast on CUDA (fp32 master weights), fp32 on CPU;
Composer's DecoupledAdamW (the recipes' optimizer) with gradient clipping; one optimizer step per
micro-batch of ``--batch`` x ``--seq-len`` tokens (random ones, except in the loader section); the time of
a step is the mean over ``--steps`` steps after ``--warmup`` (CUDA synchronised at both ends). On CUDA
out-of-memory the micro-batch is halved and the measurement retried; the tables give the batch used and
whether activation checkpointing was on (its recompute is not counted as model FLOPs, so it lowers MFU). MFU = tokens/s x ``flops_per_token`` / the
device's dense bf16 peak (a table of data-sheet values; n/a when the device is not in it, e.g. on CPU).
One device holds the whole model and its AdamW state here; the recipes shard them with FSDP.

train   (i) plain training and (ii) pruning steps of ``--shape`` capped at ``--layers`` layers, per attention
        implementation (SDPA; flash-attn when installed). A pruning step samples hard-concrete masks, runs
        the masked model, adds the Lagrangian term and steps three parameter groups (weights, mask logits,
        multipliers). Overhead ratio = pruning / plain step time (target <= 1.10x); the two are timed
        alternately, step by step, and each is the median of its ``--steps`` steps.
cpt     (iii) plain training of the pruned shapes ``--cpt-shapes`` (full depth unless ``--cpt-layers``), what
        continued pre-training runs (target: MFU >= 45% at seq 4096 on H100-class hardware).
loader  Dynamic-loading overhead per step. A synthetic 7-domain MDS root (``loader_throughput.build_root``:
        RedPajama-like domain sizes times ``--loader-domain-scale``, ``--seq-len`` uint16 tokens) feeds CPT
        steps of ``--loader-shape`` through (a) a plain ``StreamingDataset`` over the largest domain (int64
        collate: what llm-foundry's text loader hands the model), (b) the domain-mixture loader, proportions
        fixed, (c) the domain-mixture loader with a proportion update every ``--update-every`` steps (default
        every step, the worst case; the recipes update every 50 steps when pruning, 400 in CPT): synthetic
        eval losses -> ``update_domain_weights`` -> ``set_proportions``, as the DynamicLoading callback does.
        ``--loader-workers`` workers, prefetch 2. The device is synchronised after every step; then per step
        ``blocked`` = ``next(loader)`` + the host-to-device copy, ``update`` = the proportion update (its
        mean over all steps), ``step`` = the training step, and overhead = (blocked + update) / step.
        Counted: every moment the training loop waits for data or updates proportions. Not counted: loader
        work done by the workers while the step runs (it costs the loop nothing), Composer's per-step
        bookkeeping, the callback's broadcast of the proportions to other ranks and its history files
        (both once per evaluation). Upper bounds: the per-step synchronisation leaves no queued GPU work
        for a data wait to hide behind, and the loader's batch is one micro-batch, so the update is
        charged to each micro-batch instead of to a global batch.
        Per-domain evaluation, amortized (computed from measured times, not run): 500 eval sequences x 7
        domains, forward only, every 50 steps x 32 sequences when pruning (the masked source capped at
        ``--layers``, deterministic masks) and every 400 steps x 256 sequences in CPT (``--loader-shape``),
        SPEC §3-4. Share = 3500 x forward seconds per sequence / (interval x global batch x training
        seconds per sequence), both measured on this device at the same micro-batch (data parallelism
        divides both alike). Eval data loading and the metric all-reduce are not counted.
infer   Prefill tokens/s (batch 1, ``--prompt-len`` tokens) and decode tokens/s (batch 1, greedy, KV cache,
        ``--new-tokens`` tokens) through ``generate``, by ``shearing.evaluation.speed.measure_generation``
        (method in its docstring), of stock ``LlamaForCausalLM``s with random weights: ``--infer-source``,
        the ``--infer-targets`` shapes, and a non-uniform model of the first target's parameter count
        (``nonuniform_layer_widths``: LLM-Pruner-like, the source's hidden size and depth, per-layer heads
        and MLP widths). bf16 on CUDA, fp32 on CPU. ``--infer-layers N`` caps the source at N layers and
        the targets proportionally. The paper's A100 decoding speeds (37 / 47 / 62 tokens/s for 7B / 2.7B
        / 1.3B) are printed beside full-depth rows.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import platform
import shlex
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from composer.optim import DecoupledAdamW

from shearing.evaluation.speed import sync
from shearing.models.hf_io import config_from_shape
from shearing.models.llama import MaskedLlamaForCausalLM, flash_attn_available
from shearing.models.shapes import LlamaShape, count_params, named_shape, resolve_target_shape
from shearing.pruning.l0 import L0Module, PruningClock

SECTIONS = ("train", "cpt", "loader", "infer")
# Dense bf16 peak FLOP/s by device name fragment (vendor data sheets, SXM parts).
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
TARGETS = {"pruning_overhead": 1.10, "cpt_mfu": 0.45, "loader_overhead_pct": 1.0}
# SPEC §3-4: eval sequences per domain; (eval interval in steps, global batch in sequences) per phase.
EVAL_SEQS_PER_DOMAIN = 500
RECIPE_DOMAINS = ("cc", "c4", "github", "book", "wiki", "arxiv", "stackexchange")
RECIPE = {"pruning": (50, 32), "cpt": (400, 256)}
PAPER_DECODE_A100 = {"llama2_7b": 37, "llama2_2.7b": 47, "llama2_1.3b": 62}  # tokens/s, Sheared-LLaMA paper
TOKEN_RANGE = 32000  # the synthetic shards' token ids are below this


# ------------------------------------------------------------------------------------------ FLOPs
def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((flops for key, flops in PEAK_FLOPS.items() if key in name), None)


def flops_per_token(shape: LlamaShape, seq_len: int) -> float:
    """Training FLOPs per token: 6 N (every weight matrix, forward + backward; the input embedding is a
    lookup, the LM head a matmul even when tied) + 6 L T H K (causal attention scores and values)."""
    non_embedding = count_params(shape) - shape.vocab_size * shape.hidden_size * (
        1 if shape.tie_word_embeddings else 2
    )
    lm_head = shape.vocab_size * shape.hidden_size
    attention = 6 * shape.num_hidden_layers * seq_len * shape.num_attention_heads * shape.head_dim
    return 6 * (non_embedding + lm_head) + attention


# ------------------------------------------------------------------------------------- training steps
def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def autocast(device: torch.device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def capped(shape: LlamaShape, layers: int | None) -> LlamaShape:
    return (
        shape
        if layers is None
        else dataclasses.replace(shape, num_hidden_layers=min(layers, shape.num_hidden_layers))
    )


def pruning_shapes(args: argparse.Namespace) -> tuple[LlamaShape, LlamaShape]:
    """The pruning source capped at ``--layers`` and the target's widths at the same cap (the target is
    resolved against the full-depth source, whose layer count it must not exceed)."""
    full = named_shape(args.shape)
    return capped(full, args.layers), capped(resolve_target_shape(full, args.target), args.layers)


def masked_model(shape: LlamaShape, args: argparse.Namespace, attn: str, device: torch.device):
    """A seeded random ``MaskedLlamaForCausalLM`` built directly on ``device``, in training mode."""
    torch.manual_seed(0)
    with torch.device(device):
        model = MaskedLlamaForCausalLM(
            config_from_shape(shape, max_position_embeddings=args.seq_len), attn_impl=attn
        )
    model.activation_checkpointing = args.activation_checkpointing
    return model.train()


def train_step(model, l0: L0Module | None) -> Callable[[torch.Tensor], None]:
    """One optimizer step on a ``[B, T]`` token block: plain training, or the pruning step given ``l0``."""
    model.zero_grad(set_to_none=True)
    groups = [{"params": list(model.parameters())}]
    if l0 is not None:
        groups += [
            {"params": list(l0.log_alphas.parameters()), "lr": 1.0},
            {"params": list(l0.lambdas.parameters()), "lr": -1.0},
        ]
    opt = DecoupledAdamW(groups, lr=1e-4, betas=(0.9, 0.95), weight_decay=0.0)
    params = [p for g in groups for p in g["params"]]

    def step(ids: torch.Tensor) -> None:
        with autocast(ids.device):
            pruning = l0(PruningClock()) if l0 is not None else None
            logits = model(ids, masks=pruning.masks if pruning is not None else None)
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
            if pruning is not None:
                loss = loss + pruning.lagrangian
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def random_tokens(vocab: int, batch: int, seq_len: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, vocab, (batch, seq_len), generator=torch.Generator().manual_seed(0)).to(device)


def mean_seconds(run: Callable[[], Any], steps: int, warmup: int, device: torch.device) -> float:
    """Mean seconds of ``run()`` over ``steps`` calls after ``warmup`` calls, the device synchronised."""
    for _ in range(warmup):
        run()
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    sync(device)
    return (time.perf_counter() - start) / steps


def interleaved_seconds(
    runs: list[Callable[[], Any]], steps: int, warmup: int, device: torch.device
) -> list[float]:
    """Median seconds of each of ``runs``, called in turn ``steps`` times after ``warmup`` rounds: alternating
    them cancels drift (other processes, clocks, allocator growth) that sequential means would charge to
    one of them."""
    for _ in range(warmup):
        for run in runs:
            run()
    times: list[list[float]] = [[] for _ in runs]
    for _ in range(steps):
        for run, seconds in zip(runs, times, strict=True):
            sync(device)
            start = time.perf_counter()
            run()
            sync(device)
            seconds.append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


@torch.no_grad()
def forward_seconds(model, masks, ids: torch.Tensor, args: argparse.Namespace) -> float:
    """Seconds of one evaluation forward (logits of every position) on ``ids``."""
    model.eval()
    try:
        with autocast(ids.device):
            return mean_seconds(lambda: model(ids, masks=masks), args.steps, args.warmup, ids.device)
    finally:
        model.train()


def largest_fitting(measure: Callable[[int], Any], batch: int, device: torch.device) -> tuple[Any, int]:
    """``measure(batch)``, halving ``batch`` after each CUDA out-of-memory error; returns (result, batch)."""
    while True:
        try:
            return measure(batch), batch
        except torch.cuda.OutOfMemoryError:
            if batch == 1:
                raise
        free(device)  # outside the handler, so the failed step's frames are gone
        print(f"  CUDA out of memory at micro-batch {batch}: retrying with {batch // 2}", flush=True)
        batch //= 2


def attn_impls(args: argparse.Namespace) -> list[tuple[str, str | None]]:
    """(implementation, reason it is skipped or None) for each of ``--attn``."""
    out = []
    for attn in args.attn.split(","):
        skip = (
            "flash-attn not installed (pip install -e '.[gpu]')"
            if attn == "flash" and not flash_attn_available()
            else None
        )
        out.append((attn, skip))
    return out


def training_row(dims: LlamaShape, args, batch: int, seconds: float, device: torch.device, **fields) -> dict:
    tokens = batch * args.seq_len
    peak = peak_flops(device)
    return {
        **fields,
        "layers": dims.num_hidden_layers,
        "params": count_params(dims),
        "batch": batch,
        "seq_len": args.seq_len,
        "activation_checkpointing": args.activation_checkpointing,
        "step_s": seconds,
        "tokens_per_s": tokens / seconds,
        "mfu": tokens * flops_per_token(dims, args.seq_len) / seconds / peak if peak else None,
    }


# -------------------------------------------------------------------------------------------- sections
def run_train(args, device: torch.device) -> list[dict]:
    """(i) plain and (ii) pruning steps of the capped source, per attention implementation."""
    shape, target = pruning_shapes(args)
    rows = []
    for attn, skip in attn_impls(args):
        if skip:
            rows.append({"attn": attn, "skipped": skip})
            continue
        model = masked_model(shape, args, attn, device)
        l0 = L0Module(shape, target).to(device).train()

        def measure(batch: int, model=model, l0=l0) -> tuple[float, float]:
            ids = random_tokens(shape.vocab_size, batch, args.seq_len, device)
            prune = train_step(model, l0)
            plain_step = train_step(model, None)
            pruning, plain = interleaved_seconds(
                [lambda: prune(ids), lambda: plain_step(ids)], args.steps, args.warmup, device
            )
            return plain, pruning

        (plain, pruning), batch = largest_fitting(measure, args.batch, device)
        common = {"shape": args.shape, "attn": attn}
        rows.append(training_row(shape, args, batch, plain, device, step="plain", **common))
        rows.append(
            training_row(
                shape, args, batch, pruning, device, step="pruning", overhead=pruning / plain, **common
            )
        )
        del model, l0
        free(device)
    return rows


def run_cpt(args, device: torch.device) -> list[dict]:
    """(iii) plain training of each pruned shape, per attention implementation."""
    rows = []
    for name in args.cpt_shapes:
        shape = capped(named_shape(name), args.cpt_layers)
        for attn, skip in attn_impls(args):
            if skip:
                rows.append({"shape": name, "attn": attn, "skipped": skip})
                continue
            model = masked_model(shape, args, attn, device)

            def measure(batch: int, model=model, shape=shape) -> float:
                ids = random_tokens(shape.vocab_size, batch, args.seq_len, device)
                step = train_step(model, None)
                return mean_seconds(lambda: step(ids), args.steps, args.warmup, device)

            seconds, batch = largest_fitting(measure, args.cpt_batch, device)
            rows.append(training_row(shape, args, batch, seconds, device, shape=name, attn=attn))
            del model
            free(device)
    return rows


def build_synthetic_root(root: Path, seq_len: int, scale: float) -> dict[str, int]:
    """``loader_throughput.build_root`` at ``seq_len`` tokens per sample and ``scale`` x its domain sizes."""
    import loader_throughput

    domains = {name: max(1, round(n * scale)) for name, n in loader_throughput.DOMAINS.items()}
    loader_throughput.build_root(root, seq_len, domains)
    return domains


def make_loader(kind: str, root: Path, batch: int, workers: int):
    """(DataLoader, the mixture dataset or None) of a plain streaming loader or the domain-mixture loader."""
    if kind == "plain":
        from loader_throughput import _to_long, plain_loader

        return plain_loader(root, batch, workers, _to_long), None
    from shearing.data.dataloader import build_domain_mixture_dataloader

    spec = build_domain_mixture_dataloader(
        None,
        batch,
        {"local": str(root / "train"), "seed": 17, "shuffle": True, "rank": 0, "world_size": 1},
        num_workers=workers,
        prefetch_factor=2,
    )
    return spec.dataloader, spec.dataloader.dataset


def proportion_updater(dataset, every: int) -> Callable[[int], None]:
    """After every ``every`` trained batches: new proportions from synthetic eval losses, published to the
    dataset as the DynamicLoading callback does (``update_domain_weights``, then ``set_proportions``)."""
    from shearing.data.weights import update_domain_weights

    rng = np.random.default_rng(0)
    refs = np.full(len(dataset.domains), 2.0)

    def update(trained: int) -> None:
        if trained % every == 0:
            losses = refs + rng.uniform(0.0, 0.5, len(refs))
            new = update_domain_weights(dataset.proportions, losses, refs, eta=1.0, smoothing=1e-4)
            dataset.set_proportions(new.tolist(), after_step=trained)

    return update


def loader_loop(step, loader, update, vocab: int, args, device: torch.device) -> dict[str, float]:
    """Train on ``loader``'s batches: mean seconds per step blocked on data, updating proportions, stepping."""
    it = iter(loader)
    blocked, updating, stepping = [], [], []
    for i in range(args.warmup + args.loader_steps):
        t0 = time.perf_counter()
        ids = next(it)["input_ids"].to(device)
        t1 = time.perf_counter()
        step(ids % vocab if vocab < TOKEN_RANGE else ids)
        sync(device)
        t2 = time.perf_counter()
        if update is not None:
            update(i + 1)
        t3 = time.perf_counter()
        if i >= args.warmup:
            blocked.append(t1 - t0)
            stepping.append(t2 - t1)
            updating.append(t3 - t2)
    del it  # stops the workers
    return {
        "blocked_s": float(np.mean(blocked)),
        "update_s": float(np.mean(updating)) if update is not None else None,
        "step_s": float(np.mean(stepping)),
    }


def eval_share(phase: str, forward_s: float, step_s: float) -> float:
    """Per-domain evaluation time / training time between two evaluations (both per sequence, same batch)."""
    interval, global_batch = RECIPE[phase]
    return EVAL_SEQS_PER_DOMAIN * len(RECIPE_DOMAINS) * forward_s / (interval * global_batch * step_s)


def run_loader(args, device: torch.device) -> list[dict]:
    """Dynamic-loading overhead per CPT step, and the amortized per-domain evaluation (module docstring)."""
    name = args.loader_shape or args.cpt_shapes[0]
    shape = capped(named_shape(name), args.cpt_layers)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        domains = build_synthetic_root(root, args.seq_len, args.loader_domain_scale)
        model = masked_model(shape, args, "sdpa", device)

        def probe(batch: int, model=model):
            step = train_step(model, None)
            ids = random_tokens(shape.vocab_size, batch, args.seq_len, device)
            mean_seconds(lambda: step(ids), 1, max(1, args.warmup), device)  # 2+ steps: AdamW state too
            return step

        step, batch = largest_fitting(probe, args.cpt_batch, device)
        needed = (args.warmup + args.loader_steps) * batch
        if domains["cc"] < needed:
            raise ValueError(
                f"the plain loader reads one epoch of {domains['cc']} samples but the run needs {needed}: "
                "raise --loader-domain-scale or lower --loader-steps"
            )
        every = f"every {args.update_every} steps" if args.update_every > 1 else "every step"
        variants = (("plain", "plain StreamingDataset", "none"), ("mixture", "domain mixture", "none"))
        variants += (("mixture_update", "domain mixture", every),)
        for kind, label, updates in variants:
            loader, dataset = make_loader(kind.split("_")[0], root, batch, args.loader_workers)
            update = proportion_updater(dataset, args.update_every) if kind == "mixture_update" else None
            times = loader_loop(step, loader, update, shape.vocab_size, args, device)
            overhead = times["blocked_s"] + (times["update_s"] or 0.0)
            rows.append(
                {
                    "table": "loader",
                    "loader": label,
                    "proportion_update": updates,
                    "shape": name,
                    "workers": args.loader_workers,
                    "batch": batch,
                    "seq_len": args.seq_len,
                    "activation_checkpointing": args.activation_checkpointing,
                    **times,
                    "overhead_pct": 100 * overhead / times["step_s"],
                }
            )
            del loader, dataset
        plain = rows[0]
        for row in rows[1:]:
            excess = row["blocked_s"] + (row["update_s"] or 0.0) - plain["blocked_s"]
            row["excess_over_plain_pct"] = 100 * excess / row["step_s"]
        ids = random_tokens(shape.vocab_size, batch, args.seq_len, device)
        forward = forward_seconds(model, None, ids, args)
        rows.append(eval_row("cpt", name, shape, batch, forward, plain["step_s"], args))
        del model, step
        free(device)
    rows.append(pruning_eval_row(args, device))
    return rows


def eval_row(phase: str, name: str, shape: LlamaShape, batch: int, forward: float, step: float, args) -> dict:
    interval, global_batch = RECIPE[phase]
    return {
        "table": "eval",
        "phase": phase,
        "shape": name,
        "layers": shape.num_hidden_layers,
        "batch": batch,
        "seq_len": args.seq_len,
        "activation_checkpointing": args.activation_checkpointing,
        "eval_sequences": EVAL_SEQS_PER_DOMAIN * len(RECIPE_DOMAINS),
        "interval_steps": interval,
        "global_batch": global_batch,
        "forward_s_per_seq": forward / batch,
        "train_s_per_seq": step / batch,
        "amortized_pct": 100 * eval_share(phase, forward, step),
    }


def pruning_eval_row(args, device: torch.device) -> dict:
    """The pruning run's per-domain evaluation: the masked source under deterministic masks."""
    shape, target = pruning_shapes(args)
    model = masked_model(shape, args, "sdpa", device)
    l0 = L0Module(shape, target).to(device)

    def measure(batch: int, model=model, l0=l0) -> tuple[float, float]:
        ids = random_tokens(shape.vocab_size, batch, args.seq_len, device)
        step = train_step(model, l0.train())
        seconds = mean_seconds(lambda: step(ids), args.steps, args.warmup, device)
        masks = l0.eval()()
        return forward_seconds(model, masks, ids, args), seconds

    (forward, step), batch = largest_fitting(measure, args.batch, device)
    del model, l0
    free(device)
    return eval_row("pruning", args.shape, shape, batch, forward, step, args)


def run_infer(args, device: torch.device) -> list[dict]:
    """Prefill and decode tokens/s of the source, the target shapes and a non-uniform model."""
    from shearing.evaluation.loading import count_parameters
    from shearing.evaluation.speed import (
        make_prompt,
        measure_generation,
        nonuniform_layer_widths,
        nonuniform_param_count,
        random_llama,
    )

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    full_source = named_shape(args.infer_source)
    depth = args.infer_layers or full_source.num_hidden_layers
    source = capped(full_source, depth)

    def scaled(shape: LlamaShape) -> LlamaShape:
        layers = shape.num_hidden_layers * depth / full_source.num_hidden_layers
        return capped(shape, max(1, round(layers)))

    models: list[tuple[str, str, LlamaShape, Any]] = [(args.infer_source, "uniform", source, None)]
    for name in args.infer_targets:
        models.append((name, "uniform", scaled(resolve_target_shape(full_source, name)), None))
    equal_name, equal_to = models[1][0], models[1][2]  # the non-uniform model matches the first target
    rows = []
    try:
        widths = nonuniform_layer_widths(source, count_params(equal_to))
        models.append((f"non-uniform ~ {equal_name}", "non-uniform", source, widths))
    except ValueError as err:
        rows.append({"model": f"non-uniform ~ {equal_name}", "skipped": str(err)})
    prompt = make_prompt(source.vocab_size, 1, args.prompt_len, device)
    full_depth = args.infer_layers is None
    for label, kind, shape, widths in models:
        config = config_from_shape(
            shape, max_position_embeddings=max(4096, args.prompt_len + args.new_tokens)
        )
        model = random_llama(config, device, dtype, widths)
        expected = count_params(shape) if widths is None else nonuniform_param_count(shape, widths)
        assert count_parameters(model) == expected, (label, count_parameters(model), expected)
        result = measure_generation(model, prompt, args.new_tokens, repeats=args.repeats)
        row = {
            "model": label,
            "kind": kind,
            "layers": shape.num_hidden_layers,
            "hidden": shape.hidden_size,
            "params": expected,
            "dtype": str(dtype).removeprefix("torch."),
            "prompt_len": args.prompt_len,
            "new_tokens": args.new_tokens,
            "prefill_tokens_per_s": result["prefill_tokens_per_s"],
            "decode_tokens_per_s": result["decode_tokens_per_s"],
            "paper_a100_decode_tokens_per_s": PAPER_DECODE_A100.get(label) if full_depth else None,
        }
        if widths is not None:
            dense = (shape.num_attention_heads, shape.num_key_value_heads, shape.intermediate_size)
            pruned = [w for w in widths if w != dense]
            row["heads_range"] = [min(w[0] for w in pruned), max(w[0] for w in pruned)]
            row["mlp_range"] = [min(w[2] for w in pruned), max(w[2] for w in pruned)]
        rows.append(row)
        del model
        free(device)
    for row in rows:
        if "decode_tokens_per_s" in row:
            row["decode_vs_source"] = row["decode_tokens_per_s"] / rows[0]["decode_tokens_per_s"]
            row["prefill_vs_source"] = row["prefill_tokens_per_s"] / rows[0]["prefill_tokens_per_s"]
    return rows


# -------------------------------------------------------------------------------------------- output
def _fmt(value: Any, spec: str) -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "on" if value else "off"
    if spec == "%":
        return f"{value:.1%}"
    if spec == "x":
        return f"{value:.3f}x"
    if spec == "ms":
        return f"{1000 * value:.2f}"
    return format(value, spec)


TABLES: dict[str, list[tuple[str, str, str]]] = {  # (header, row key, format)
    "train": [
        ("attn", "attn", ""),
        ("step", "step", ""),
        ("layers", "layers", "d"),
        ("batch", "batch", "d"),
        ("ckpt", "activation_checkpointing", ""),
        ("step s", "step_s", ".3f"),
        ("tokens/s", "tokens_per_s", ",.0f"),
        ("MFU", "mfu", "%"),
        ("overhead", "overhead", "x"),
    ],
    "cpt": [
        ("shape", "shape", ""),
        ("attn", "attn", ""),
        ("layers", "layers", "d"),
        ("params", "params", ",d"),
        ("batch", "batch", "d"),
        ("ckpt", "activation_checkpointing", ""),
        ("step s", "step_s", ".3f"),
        ("tokens/s", "tokens_per_s", ",.0f"),
        ("MFU", "mfu", "%"),
    ],
    "loader": [
        ("loader", "loader", ""),
        ("update", "proportion_update", ""),
        ("workers", "workers", "d"),
        ("batch", "batch", "d"),
        ("ckpt", "activation_checkpointing", ""),
        ("step ms", "step_s", "ms"),
        ("blocked ms", "blocked_s", "ms"),
        ("update ms", "update_s", "ms"),
        ("overhead %", "overhead_pct", ".3f"),
        ("vs plain %", "excess_over_plain_pct", "+.3f"),
    ],
    "eval": [
        ("phase", "phase", ""),
        ("shape", "shape", ""),
        ("layers", "layers", "d"),
        ("batch", "batch", "d"),
        ("ckpt", "activation_checkpointing", ""),
        ("eval seqs", "eval_sequences", "d"),
        ("every", "interval_steps", "d"),
        ("x batch", "global_batch", "d"),
        ("fwd ms/seq", "forward_s_per_seq", "ms"),
        ("train ms/seq", "train_s_per_seq", "ms"),
        ("amortized %", "amortized_pct", ".2f"),
    ],
    "infer": [
        ("model", "model", ""),
        ("layers", "layers", "d"),
        ("params", "params", ",d"),
        ("prefill tok/s", "prefill_tokens_per_s", ",.0f"),
        ("decode tok/s", "decode_tokens_per_s", ",.1f"),
        ("decode vs src", "decode_vs_source", ".2f"),
        ("paper A100 decode", "paper_a100_decode_tokens_per_s", "d"),
    ],
}

NOTES = {
    "train": "overhead = pruning / plain step time (target <= {pruning_overhead:.2f}x)",
    "cpt": "target: MFU >= {cpt_mfu:.0%} for the 1.3B/2.7B shapes at seq 4096 on H100-class hardware",
    "loader": "overhead = (blocked + update) / step (target < {loader_overhead_pct:g}%); an upper bound, see --help",
    "eval": "computed from measured forward and training times (SPEC §3-4), not run; eval loading not counted",
    "infer": "batch 1, greedy, KV cache; paper: A100, full-depth shapes only",
}


def print_table(table: str, rows: list[dict]) -> None:
    columns = TABLES[table]
    cells = [[header for header, _, _ in columns]]
    skipped = []
    for row in rows:
        if "skipped" in row:
            what = " ".join(str(row[k]) for k in ("shape", "attn", "model") if k in row)
            skipped.append(f"  {what}: skipped, {row['skipped']}")
            continue
        cells.append([_fmt(row.get(key), spec) for _, key, spec in columns])
    widths = [max(len(line[i]) for line in cells) for i in range(len(columns))]
    print(f"\n[{table}] {NOTES[table].format(**TARGETS)}")
    for line in cells:
        print("  " + "  ".join(cell.rjust(w) for cell, w in zip(line, widths)))
    for line in skipped:
        print(line)


def environment(device: torch.device) -> dict[str, Any]:
    import transformers

    versions = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    for module in ("composer", "streaming", "flash_attn"):
        try:
            versions[module] = __import__(module).__version__
        except ImportError:
            versions[module] = None
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        versions["cuda"] = torch.version.cuda
    else:
        name = f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"
    return {"device": name, "versions": versions}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--sections", default=",".join(SECTIONS), help="comma-separated, of " + ",".join(SECTIONS)
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--seq-len", type=int, default=4096)
    parser.add_argument("--batch", type=int, default=4, help="micro-batch of the train section")
    parser.add_argument("--steps", type=int, default=20, help="timed steps (and forwards) per measurement")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--attn", default="sdpa,flash")
    parser.add_argument("--activation-checkpointing", action="store_true")
    parser.add_argument("--shape", default="llama2_7b", help="pruning source (train section)")
    parser.add_argument("--target", default="llama2_2.7b", help="pruning target (its widths; layers capped)")
    parser.add_argument("--layers", type=int, default=4, help="depth cap of the pruning source")
    parser.add_argument("--cpt-shapes", default="llama2_2.7b,llama2_1.3b")
    parser.add_argument(
        "--cpt-layers", type=int, default=None, help="depth cap of the CPT shapes (default: full)"
    )
    parser.add_argument("--cpt-batch", type=int, default=None, help="CPT micro-batch (default: --batch)")
    parser.add_argument(
        "--loader-shape", default=None, help="CPT shape of the loader section (default: the first)"
    )
    parser.add_argument("--loader-workers", type=int, default=2)
    parser.add_argument(
        "--loader-steps", type=int, default=None, help="timed steps per loader (default: --steps)"
    )
    parser.add_argument("--update-every", type=int, default=1, help="proportion update interval, in steps")
    parser.add_argument(
        "--loader-domain-scale", type=float, default=1.0, help="x the synthetic domains' sizes"
    )
    parser.add_argument("--infer-source", default="llama2_7b")
    parser.add_argument("--infer-targets", default="llama2_2.7b,llama2_1.3b")
    parser.add_argument("--infer-layers", type=int, default=None, help="source depth cap (targets scaled)")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=3, help="generate calls per timing (median)")
    parser.add_argument("--json", type=Path, default=None, help="write every result here")
    args = parser.parse_args(argv)
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = sorted(set(args.sections) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {unknown}; choose from {','.join(SECTIONS)}")
    args.cpt_shapes = [s for s in args.cpt_shapes.split(",") if s]
    args.infer_targets = [s for s in args.infer_targets.split(",") if s]
    if "infer" in args.sections and not args.infer_targets:
        parser.error("--infer-targets needs at least one shape (the non-uniform model matches the first)")
    args.cpt_batch = args.cpt_batch or args.batch
    args.loader_steps = args.loader_steps or args.steps
    if min(args.batch, args.cpt_batch, args.steps, args.update_every, args.seq_len) < 1 or args.warmup < 0:
        parser.error(
            "--batch, --cpt-batch, --steps, --update-every and --seq-len must be >= 1, --warmup >= 0"
        )
    return args


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    device = torch.device(args.device)
    command = (
        shlex.join(["python", *sys.argv]) if argv is None else shlex.join(["python", sys.argv[0], *argv])
    )
    record = {"command": command, **environment(device), "targets": TARGETS, "sections": {}}
    record["args"] = {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}
    print(f"device {record['device']}; " + ", ".join(f"{k} {v}" for k, v in record["versions"].items() if v))
    print(f"command: {command}")
    run = {"train": run_train, "cpt": run_cpt, "loader": run_loader, "infer": run_infer}
    for section in args.sections:
        start = time.perf_counter()
        rows = run[section](args, device)
        seconds = time.perf_counter() - start
        record["sections"][section] = {"seconds": seconds, "rows": rows}
        tables = {row.get("table", section) for row in rows}
        for table in (t for t in TABLES if t in tables):
            print_table(table, [row for row in rows if row.get("table", section) == table])
        print(f"  ({section}: {seconds:.0f} s)", flush=True)
        if args.json:
            from shearing.io import write_json_atomic

            write_json_atomic(args.json, record)
    return record


if __name__ == "__main__":
    main()
