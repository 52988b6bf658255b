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
``--warmup`` batches (worker start-up), then times ``--batches`` batches. The target is a ratio of at
least 0.9 (mixture / plain).

It also measures the mixture loader's update lag for each worker count: two loaders run side by side,
one gets ``set_proportions`` after step ``LAG_STEP`` (as ``DynamicLoading`` does), and the lag is the
number of batches after ``LAG_STEP`` that still match the loader without the update (0: the next batch
uses the new proportions). Usage::

    OMP_NUM_THREADS=1 .venv/bin/python bench/loader_throughput.py [--batches 300] [--workers 0 2 4]
"""

from __future__ import annotations

import argparse
import json
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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2, 4])
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many runs per cell")
    parser.add_argument("--_measure", nargs=3, metavar=("KIND", "ROOT", "WORKERS"), help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args._measure:
        kind, root, workers = args._measure
        print(json.dumps(time_loader(kind, Path(root), int(workers), args.batches, args.warmup)))
        return

    if (args.batches + args.warmup) * BATCH > DOMAINS["cc"]:
        parser.error(f"the plain loader reads one epoch of {DOMAINS['cc']} samples: lower --batches")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        build_root(root)
        print(f"built {sum(DOMAINS.values())} x {SEQ_LEN}-token samples in {time.perf_counter() - t0:.0f}s")
        rows = []
        for workers in args.workers:
            cell = {}
            for kind in ("plain", "plain_long", "mixture"):
                runs = []
                for _ in range(args.repeats):
                    cmd = [
                        sys.executable,
                        __file__,
                        "--batches",
                        str(args.batches),
                        "--warmup",
                        str(args.warmup),
                    ]
                    out = subprocess.run(
                        [*cmd, "--_measure", kind, str(root), str(workers)],
                        capture_output=True,
                        text=True,
                        check=True,
                    )
                    runs.append(float(out.stdout.strip().splitlines()[-1]))
                cell[kind] = max(runs)
            out = subprocess.run(
                [sys.executable, __file__, "--_measure", "lag", str(root), str(workers)],
                capture_output=True,
                text=True,
                check=True,
            )
            cell["lag"] = int(float(out.stdout.strip().splitlines()[-1]))
            rows.append((workers, cell["plain"], cell["plain_long"], cell["mixture"], cell["lag"]))
        print(f"\nbatches/s, seq {SEQ_LEN}, batch {BATCH}, {len(DOMAINS)} domains, best of {args.repeats}")
        print(
            f"{'workers':>7} | {'plain':>7} | {'plain_long':>10} | {'mixture':>7} | {'vs plain':>8} | "
            f"{'vs plain_long':>13} | {'update lag':>10}"
        )
        for workers, plain, plain_long, mixture, lag in rows:
            print(
                f"{workers:>7} | {plain:>7.1f} | {plain_long:>10.1f} | {mixture:>7.1f} | "
                f"{mixture / plain:>8.2f} | {mixture / plain_long:>13.2f} | {lag:>10d}"
            )


if __name__ == "__main__":
    main()
