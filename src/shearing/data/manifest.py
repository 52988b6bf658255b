"""The manifest of a prepared data root: the contract between data preparation and the loaders.

A data root written by ``data_prep/tokenize_domains.py`` looks like::

    DATA_DIR/manifest.json
    DATA_DIR/train/<domain>/   MDS shards, one column ``tokens`` (``ndarray:uint16`` or ``ndarray:uint32``),
    DATA_DIR/eval/<domain>/    every sample exactly ``seq_len`` tokens

``manifest.json`` records, per domain and split, how many sequences and tokens were written, plus the
tokenizer (name, path, vocabulary size, fingerprint, the bos/eos framing chosen), the largest token
id written, the sequence length, the token dtype and how the train/eval split was drawn. Loaders check
shards against it (sequence length, dtype, sample counts) before any training starts.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from shearing.io import write_json_atomic

MANIFEST_NAME = "manifest.json"
WORK_DIR = ".prep"  # data preparation's resume state inside DATA_DIR (``.prep/done/<domain>.json``, ...)
FORMAT_VERSION = 1
SPLITS = ("train", "eval")
TOKEN_DTYPES = ("uint16", "uint32")


@dataclass
class SplitStats:
    """What one domain's split holds."""

    sequences: int
    tokens: int
    documents: int = 0


@dataclass
class DomainEntry:
    """One domain: its splits and where its raw text came from.

    ``skipped_files`` counts raw files not read (a .txt that is not UTF-8); ``skipped_documents`` counts
    documents dropped from files that were read (a JSON line that is not UTF-8, an empty text).
    """

    train: SplitStats
    eval: SplitStats
    source: str = ""
    skipped_files: int = 0
    skipped_documents: int = 0


@dataclass
class Manifest:
    """The manifest of a prepared data root (see the module docstring)."""

    seq_len: int
    dtype: str
    domains: dict[str, DomainEntry]
    tokenizer: dict[str, Any] = field(default_factory=dict)
    split: dict[str, Any] = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    max_token_id: int | None = None  # the largest id in any split (None: written before it was recorded)

    def __post_init__(self) -> None:
        if self.dtype not in TOKEN_DTYPES:
            raise ValueError(f"manifest dtype must be one of {TOKEN_DTYPES}, got {self.dtype!r}")
        if self.seq_len <= 0:
            raise ValueError(f"manifest seq_len must be positive, got {self.seq_len}")

    @property
    def domain_names(self) -> list[str]:
        return list(self.domains)

    def token_proportions(self, split: str = "train") -> dict[str, float]:
        """Each domain's share of the split's tokens: the default initial mixture."""
        counts = {name: getattr(entry, split).tokens for name, entry in self.domains.items()}
        total = sum(counts.values())
        if total == 0:
            raise ValueError(f"the {split} split holds no tokens in any domain")
        return {name: count / total for name, count in counts.items()}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> Manifest:
        version = raw.get("format_version", FORMAT_VERSION)
        if version != FORMAT_VERSION:
            raise ValueError(
                f"manifest format_version {version} is not supported (expected {FORMAT_VERSION})"
            )
        domains = {
            name: DomainEntry(
                train=SplitStats(**entry["train"]),
                eval=SplitStats(**entry["eval"]),
                source=entry.get("source", ""),
                skipped_files=entry.get("skipped_files", 0),
                skipped_documents=entry.get("skipped_documents", 0),
            )
            for name, entry in raw["domains"].items()
        }
        return cls(
            seq_len=int(raw["seq_len"]),
            dtype=raw["dtype"],
            domains=domains,
            tokenizer=raw.get("tokenizer", {}),
            split=raw.get("split", {}),
            format_version=version,
            max_token_id=None if raw.get("max_token_id") is None else int(raw["max_token_id"]),
        )


def manifest_path(data_root: str | os.PathLike) -> Path:
    return Path(data_root) / MANIFEST_NAME


def load_manifest(data_root: str | os.PathLike) -> Manifest:
    """Read ``DATA_DIR/manifest.json``; ``data_root`` may also be ``DATA_DIR/train`` or ``DATA_DIR/eval``."""
    root = Path(data_root)
    path = manifest_path(root)
    if not path.is_file() and root.name in SPLITS:
        path = manifest_path(root.parent)
    if not path.is_file():
        raise FileNotFoundError(
            f"no {MANIFEST_NAME} at {root} (or its parent): point variables.data_local at the output "
            "folder of data_prep/tokenize_domains.py"
        )
    fix = "re-run data_prep/tokenize_domains.py into a fresh folder (the shards and manifest go together)"
    try:
        with open(path) as f:
            raw = json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path} is not valid JSON ({e}): {fix}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(raw).__name__}: {fix}")
    try:
        return Manifest.from_dict(raw)
    except KeyError as e:
        raise ValueError(f"{path} is missing the field {e.args[0]!r}: {fix}") from None
    except (TypeError, AttributeError) as e:
        raise ValueError(f"{path} has a malformed field ({e}): {fix}") from None
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None


def save_manifest(manifest: Manifest, data_root: str | os.PathLike) -> Path:
    """Write the manifest atomically (a temporary file renamed over the old one)."""
    return write_json_atomic(manifest_path(data_root), manifest.to_dict())
