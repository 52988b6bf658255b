"""Batches/s of the domain-mixture loader vs a plain StreamingDataset over one domain.

Builds a synthetic 7-domain MDS root (seq 4096, uint16, RedPajama-like sizes) in a temporary folder,
then times, for 0, 2 and 4 DataLoader workers:

- ``mixture``: ``build_domain_mixture_dataloader`` (7 domains, shuffled, device batch 32; its
  ``num_workers`` are reader threads in the main process, see ``shearing.data.dataloader``);
- ``plain``: ``streaming.StreamingDataset(local=<largest domain>, shuffle=True, batch_size=32)`` in a
  ``DataLoader(batch_size=32)``, the loader llm-foundry's ``text`` dataloader wraps; its batches are the
  raw uint16 tokens;
- ``plain_long``: the same, collated in the workers into int64 ``input_ids`` plus ``labels`` (what
  llm-foundry's text loader hands the model, and what the mixture loader yields).

Each measurement runs in a fresh subprocess (streaming keeps per-process shared state), skips
``--warmup`` batches (worker start-up), then times ``--batches`` batches. The three loaders of a worker
count are measured interleaved, ``--repeats`` rounds of plain, plain_long, mixture (the order reversed
every other round), and each round gives its own ratios, so a load change on a shared machine hits both
sides of a ratio alike; printed: the median batches/s of each loader and the median ratio with its
min-max over rounds. The like-for-like comparison is mixture / plain_long (both hand the model int64
``input_ids`` and ``labels``); mixture / plain is against raw uint16 batches that still need that
conversion. The target is a ratio of at least 0.9 (mixture / plain_long). The largest domain is made big
enough for one epoch of the plain loader to cover ``--warmup`` + ``--batches`` batches.

It also measures the mixture loader's update lag for each worker count: two loaders run side by side,
one gets ``set_proportions`` after step ``LAG_STEP`` (as ``DynamicLoading`` does), and the lag is the
number of batches after ``LAG_STEP`` that still match the loader without the update (0: the next batch
uses the new proportions). Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/loader_throughput.py [--batches 300] [--workers 0 2 4] [--json OUT]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

SEQ_LEN = 4096
BATCH = 32
DOMAINS = {
    "cc": 9000,
    "c4": 2400,
    "github": 900,
    "book": 900,
    "wiki": 900,
    "arxiv": 600,
    "stackexchange": 600,
}


def build_root(root: Path, seq_len: int = SEQ_LEN, domains: dict[str, int] = DOMAINS) -> None:
    from streaming import MDSWriter

    from shearing.data.manifest import DomainEntry, Manifest, SplitStats, save_manifest

    rng = np.random.default_rng(0)
    entries = {}
    for name, count in domains.items():
        for split, n in (("train", count), ("eval", 8)):
            with MDSWriter(out=str(root / split / name), columns={"tokens": "ndarray:uint16"}) as writer:
                for _ in range(n):
                    writer.write({"tokens": rng.integers(0, 32000, seq_len, dtype=np.uint16)})
        entries[name] = DomainEntry(
            train=SplitStats(sequences=count, tokens=count * seq_len),
            eval=SplitStats(sequences=8, tokens=8 * seq_len),
        )
    save_manifest(Manifest(seq_len=seq_len, dtype="uint16", domains=entries), root)


def _to_long(samples: list[dict]) -> dict:
    import torch

    ids = torch.from_numpy(np.stack([s["tokens"] for s in samples]).astype(np.int64))
    return {"input_ids": ids, "labels": ids.clone()}


def plain_loader(root: Path, batch: int, workers: int, collate_fn=None):
    """A ``DataLoader`` over a plain shuffled ``StreamingDataset`` of the largest domain (``cc``)."""
    from streaming import StreamingDataset
    from streaming.base.util import clean_stale_shared_memory
    from torch.utils.data import DataLoader

    clean_stale_shared_memory()
    dataset = StreamingDataset(
        local=str(root / "train" / "cc"), shuffle=True, shuffle_seed=17, batch_size=batch
    )
    return DataLoader(
        dataset,
        batch_size=batch,
        num_workers=workers,
        prefetch_factor=2 if workers else None,
        collate_fn=collate_fn,
    )


LAG_STEP = 5


def _mixture_loader(root: Path, workers: int):
    from shearing.data.dataloader import build_domain_mixture_dataloader

    return build_domain_mixture_dataloader(
        None,
        BATCH,
        {"local": str(root / "train"), "seed": 17, "shuffle": True, "rank": 0, "world_size": 1},
        num_workers=workers,
        prefetch_factor=2,
    ).dataloader


def measure_lag(root: Path, workers: int, horizon: int = 40) -> int:
    """Batches between an update published after step ``LAG_STEP`` and the first batch it changes."""
    plain, updated = _mixture_loader(root, workers), _mixture_loader(root, workers)
    k = len(DOMAINS)
    new = [0.0] * k
    new[k - 1] = 1.0  # everything from the smallest domain: any batch composed with it differs
    a, b = iter(plain), iter(updated)
    for step in range(LAG_STEP + horizon):
        if step == LAG_STEP:
            updated.dataset.set_proportions(new, after_step=step)
        x, y = next(a), next(b)
        if step >= LAG_STEP and not torch_equal(x["domain_idx"], y["domain_idx"]):
            return step - LAG_STEP
    raise AssertionError(f"the update had no effect within {horizon} batches")


def torch_equal(x, y) -> bool:
    import torch

    return bool(torch.equal(x, y))


def time_loader(kind: str, root: Path, workers: int, batches: int, warmup: int) -> float:
    """Batches per second of one loader (run inside a subprocess)."""
    if kind == "lag":
        return float(measure_lag(root, workers))
    if kind == "mixture":
        loader = _mixture_loader(root, workers)
    else:
        loader = plain_loader(root, BATCH, workers, _to_long if kind == "plain_long" else None)
    it = iter(loader)
    for _ in range(warmup):
        next(it)
    start = time.perf_counter()
    total = 0
    for _ in range(batches):
        batch = next(it)
        total += int(batch["tokens" if kind == "plain" else "input_ids"].shape[0])
    elapsed = time.perf_counter() - start
    assert total == batches * BATCH
    return batches / elapsed


KINDS = ("plain", "plain_long", "mixture")


def measure(kind: str, root: Path, workers: int, batches: int, warmup: int) -> float:
    """One measurement in a fresh subprocess (batches/s; the lag in batches for ``lag``)."""
    cmd = [sys.executable, __file__, "--batches", str(batches), "--warmup", str(warmup)]
    out = subprocess.run([*cmd, "--_measure", kind, str(root), str(workers)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{kind} with {workers} workers failed:\n{out.stderr[-3000:]}")
    return float(out.stdout.strip().splitlines()[-1])


def spread(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values)}


def interleaved_cell(root: Path, workers: int, batches: int, warmup: int, rounds: int) -> dict:
    """``rounds`` rounds of the three loaders, the order reversed every other round; per-round ratios."""
    speeds: dict[str, list[float]] = {kind: [] for kind in KINDS}
    ratios: dict[str, list[float]] = {"mixture/plain": [], "mixture/plain_long": []}
    for r in range(rounds):
        got = {
            kind: measure(kind, root, workers, batches, warmup)
            for kind in (KINDS if r % 2 == 0 else KINDS[::-1])
        }
        for kind, value in got.items():
            speeds[kind].append(value)
        ratios["mixture/plain"].append(got["mixture"] / got["plain"])
        ratios["mixture/plain_long"].append(got["mixture"] / got["plain_long"])
        print(
            f"  workers {workers} round {r + 1}/{rounds}: "
            + ", ".join(f"{kind} {got[kind]:.1f}" for kind in KINDS)
            + f" batches/s; mixture/plain_long {ratios['mixture/plain_long'][-1]:.2f}",
            flush=True,
        )
    return {
        "workers": workers,
        "batches_per_s": {kind: spread(values) for kind, values in speeds.items()},
        "ratios": {name: {**spread(values), "rounds": values} for name, values in ratios.items()},
        "update_lag": int(measure("lag", root, workers, batches, warmup)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=5, help="interleaved rounds per worker count")
    parser.add_argument("--json", type=Path, help="write the record here")
    parser.add_argument("--_measure", nargs=3, metavar=("KIND", "ROOT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._measure:
        kind, root, workers = args._measure
        print(json.dumps(time_loader(kind, Path(root), int(workers), args.batches, args.warmup)))
        return
    if args.batches < 1 or args.warmup < 0 or args.repeats < 1:
        parser.error("--batches and --repeats must be positive, --warmup non-negative")

    # one epoch of the plain loader (the largest domain) must cover the warm-up and the timed batches
    domains = {**DOMAINS, "cc": max(DOMAINS["cc"], (args.batches + args.warmup) * BATCH)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_root(root, domains=domains)
        print(
            f"built {sum(domains.values())} x {SEQ_LEN}-token samples in {time.perf_counter() - t0:.0f}s",
            flush=True,
        )
        cells = [interleaved_cell(root, w, args.batches, args.warmup, args.repeats) for w in args.workers]
    print(
        f"\nbatches/s (median of {args.repeats} interleaved rounds), seq {SEQ_LEN}, batch {BATCH}, "
        f"{len(domains)} domains; ratios: median [min-max] of the per-round ratios"
    )
    print(
        f"{'workers':>7} | {'plain':>7} | {'plain_long':>10} | {'mixture':>7} | {'mixture/plain_long':>20} | {'mixture/plain':>17} | lag"
    )
    for cell in cells:
        speed, ratio = cell["batches_per_s"], cell["ratios"]
        like, raw = ratio["mixture/plain_long"], ratio["mixture/plain"]
        print(
            f"{cell['workers']:>7} | {speed['plain']['median']:>7.1f} | {speed['plain_long']['median']:>10.1f} | "
            f"{speed['mixture']['median']:>7.1f} | {like['median']:>5.2f} [{like['min']:.2f}-{like['max']:.2f}]"
            f"{'':>6} | {raw['median']:>5.2f} [{raw['min']:.2f}-{raw['max']:.2f}]{'':>3} | {cell['update_lag']}"
        )
    if args.json:
        record = {
            "command": " ".join([Path(sys.executable).name, *sys.argv]),
            "seq_len": SEQ_LEN,
            "batch": BATCH,
            "domains": domains,
            "batches": args.batches,
            "warmup": args.warmup,
            "rounds": args.repeats,
            "cells": cells,
        }
        args.json.write_text(json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
