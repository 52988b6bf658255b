"""Test data for the domain-mixture loader: a small multi-domain MDS root whose samples say who they are.

Imported explicitly (``from data.conftest_mixture import ...``); not a conftest pytest loads by itself.
Sample i of domain d starts with tokens ``[d, i % 256, i // 256]``; the rest is random below 256, so a
tiny model with a 256-token vocabulary can train on it and any row can be traced back to its sample.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from shearing.data.manifest import DomainEntry, Manifest, SplitStats, save_manifest

SEQ_LEN = 16
DOMAINS = {"cc": (40, 7), "code": (25, 5), "wiki": (12, 3)}  # name: (train, eval) sequences


def sample_tokens(domain_idx: int, index: int, seq_len: int = SEQ_LEN, dtype: str = "uint16") -> np.ndarray:
    rng = np.random.default_rng([domain_idx, index, 7])
    tokens = rng.integers(0, 256, seq_len).astype(dtype)
    tokens[:3] = (domain_idx, index % 256, index // 256)
    return tokens


def decode(input_ids: torch.Tensor) -> list[tuple[int, int]]:
    """(domain index, sample index) of each row of a batch."""
    rows = input_ids[:, :3].tolist()
    return [(d, lo + 256 * hi) for d, lo, hi in rows]


def write_domain(
    folder: Path, domain_idx: int, count: int, seq_len: int = SEQ_LEN, dtype: str = "uint16"
) -> None:
    from streaming import MDSWriter

    size_limit = 12 * (seq_len * np.dtype(dtype).itemsize + 16)  # about a dozen samples a shard
    with MDSWriter(out=str(folder), columns={"tokens": f"ndarray:{dtype}"}, size_limit=size_limit) as writer:
        for i in range(count):
            writer.write({"tokens": sample_tokens(domain_idx, i, seq_len, dtype)})


def make_data_root(
    root: Path,
    domains: Mapping[str, tuple[int, int]] = DOMAINS,
    seq_len: int = SEQ_LEN,
    dtype: str = "uint16",
) -> Path:
    """``root/{train,eval}/<domain>`` MDS shards and ``root/manifest.json``; returns ``root``."""
    entries = {}
    for d, (name, (n_train, n_eval)) in enumerate(domains.items()):
        write_domain(root / "train" / name, d, n_train, seq_len, dtype)
        write_domain(root / "eval" / name, d, n_eval, seq_len, dtype)
        entries[name] = DomainEntry(
            train=SplitStats(sequences=n_train, tokens=n_train * seq_len),
            eval=SplitStats(sequences=n_eval, tokens=n_eval * seq_len),
        )
    save_manifest(Manifest(seq_len=seq_len, dtype=dtype, domains=entries), root)
    return root


def shard_files(folder: Path) -> list[Path]:
    with open(folder / "index.json") as f:
        return [folder / s["raw_data"]["basename"] for s in json.load(f)["shards"]]
