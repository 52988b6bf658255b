"""Random access to a prepared data root's MDS shards, validated against the manifest up front.

Index parsing and sample decoding are streaming's; the byte reads are ours (``os.pread`` on cached file
descriptors), which is what makes the mixture loader's random access cheap. Checked before any read:
the domain folder exists and is not empty, every shard's samples have the manifest's ``seq_len`` and
dtype, and every shard file is as long as its index says (a truncated shard is an error, not padding).

Checked on every read: each sample's largest id is at most the manifest's ``max_token_id`` (the largest
id data preparation wrote, itself checked against the model's vocabulary before training). Bytes that
changed after preparation (a bad disk, a broken copy) would otherwise reach the embedding as an id
beyond it: ``IndexError: index out of range in self`` on the CPU, a device-side assert on a GPU, mid-run.
One ``max`` over the rows read costs nothing next to the read. Hashing every shard at start would catch
in-range corruption too but costs a full read of the data; instead the shard's hash recorded at
preparation (``index.json``) is checked when a sample fails, to say whether the file changed since.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from collections import OrderedDict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from shearing.data.manifest import MANIFEST_NAME, SPLITS, WORK_DIR, Manifest, load_manifest

log = logging.getLogger(__name__)

TOKENS_COLUMN = "tokens"
_FD_CACHE = 128  # open shard files kept per process


class DomainShards:
    """Random access to one domain's MDS shards, validated against the manifest up front.

    Raises ``ValueError`` naming the folder or shard if the folder is missing or empty, the ``tokens``
    column has another dtype or length than the manifest says, or a shard is corrupt (its file is
    missing, shorter or longer than its index entry, or its header disagrees with the index). ``read``
    raises ``ValueError`` naming the shard and sample when a sample holds an id above ``max_token_id``
    (``None``: not checked).
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        domain: str,
        seq_len: int,
        dtype: str,
        max_token_id: int | None = None,
    ):
        from streaming.base.format import reader_from_json

        self.folder = Path(folder)
        self.domain = domain
        self.seq_len = seq_len
        self.dtype = np.dtype(dtype)
        self.max_token_id = max_token_id
        index = self.folder / "index.json"
        if not self.folder.is_dir():
            raise ValueError(
                f"domain {domain!r}: folder {self.folder} does not exist (check the domain list)"
            )
        if not index.is_file():
            raise ValueError(
                f"domain {domain!r}: {self.folder} has no index.json; it is not an MDS shard folder"
            )
        with open(index) as f:
            shards = json.load(f).get("shards", [])
        readers = [reader_from_json(str(self.folder), None, obj) for obj in shards]
        readers = [r for r in readers if r.samples > 0]
        if not readers:
            raise ValueError(f"domain {domain!r}: {self.folder} holds no samples")
        self._paths: list[str] = []
        self._data_start: list[int] = []  # file offset of sample 0's token values (fast path)
        self._stride: list[int] = []  # bytes per sample (fast path); 0 means decode generically
        self._readers = readers
        for reader in readers:
            self._check_shard(reader)
        counts = np.asarray([r.samples for r in readers], dtype=np.int64)
        self._starts = np.concatenate([[0], np.cumsum(counts)])
        self.num_samples = int(self._starts[-1])
        self._fds: OrderedDict[int, int] = OrderedDict()
        self._fd_lock = threading.Lock()  # the mixture loader's reader threads share the cache
        self._in_use: dict[int, int] = {}  # descriptor -> reads in flight
        self._closing: set[int] = set()  # evicted while in use: closed by the last reader
        self._pid = os.getpid()

    def _check_shard(self, reader) -> None:
        name = f"domain {self.domain!r} shard {self.folder / reader.raw_data.basename}"
        if TOKENS_COLUMN not in reader.column_names:
            raise ValueError(f"{name} has no {TOKENS_COLUMN!r} column (columns: {reader.column_names})")
        encoding = reader.column_encodings[reader.column_names.index(TOKENS_COLUMN)]
        parts = encoding.split(":")
        if parts[0] != "ndarray" or len(parts) < 2 or parts[1] != self.dtype.name:
            raise ValueError(
                f"{name} stores tokens as {encoding!r} but the manifest says dtype {self.dtype.name}: "
                f"expected 'ndarray:{self.dtype.name}'"
            )
        path = self.folder / reader.raw_data.basename
        if not path.is_file():
            hint = (
                " (compressed shards are not supported: write them with compression=None)"
                if reader.zip_data
                else ""
            )
            raise ValueError(f"{name} is missing{hint}")
        size = path.stat().st_size
        if size != reader.raw_data.bytes:
            raise ValueError(
                f"{name} is corrupt: index.json says {reader.raw_data.bytes} bytes, the file has {size}; "
                "re-run data preparation for this domain"
            )
        n = reader.samples
        header = np.fromfile(path, dtype=np.uint32, count=n + 2)
        if len(header) < n + 2 or header[0] != n:
            raise ValueError(
                f"{name} is corrupt: index.json says {n} samples, the file header says "
                f"{int(header[0]) if len(header) else 'nothing'}; re-run data preparation for this domain"
            )
        offsets = header[1:].astype(np.int64)
        if offsets[-1] != size or np.any(np.diff(offsets) <= 0):
            raise ValueError(
                f"{name} is corrupt: its sample offsets end at byte {int(offsets[-1])} of a {size}-byte file; "
                "re-run data preparation for this domain"
            )
        with open(path, "rb") as f:
            f.seek(int(offsets[0]))
            first = reader.decode_sample(f.read(int(offsets[1] - offsets[0])))[TOKENS_COLUMN]
        if first.ndim != 1 or len(first) != self.seq_len or first.dtype != self.dtype:
            raise ValueError(
                f"{name} holds sequences of shape {tuple(first.shape)} and dtype {first.dtype}, but the manifest "
                f"says seq_len {self.seq_len} and dtype {self.dtype.name}"
            )
        sizes = np.diff(offsets)
        value_bytes = self.seq_len * self.dtype.itemsize
        if len(reader.column_names) == 1 and np.all(sizes == sizes[0]):
            self._data_start.append(int(offsets[0] + sizes[0] - value_bytes))
            self._stride.append(int(sizes[0]))
        elif len(reader.column_names) == 1:
            raise ValueError(
                f"{name} holds samples of different lengths; every sample must be exactly {self.seq_len} tokens"
            )
        else:  # other columns around the tokens: decode each sample with streaming's reader
            self._data_start.append(int(offsets[0]))
            self._stride.append(0)
        self._paths.append(str(path))

    # ------------------------------------------------------------------------------------ reads
    def _acquire_fd(self, shard: int) -> int:
        """An open descriptor of ``shard``, counted as in use until ``_release_fd``.

        The cache is shared by the mixture loader's reader threads: an evicted descriptor is closed only
        once no thread is reading from it (closing it under a reader could hand its number to another file).
        """
        if os.getpid() != self._pid:  # forked into a worker: descriptors (and the lock) are per process
            self._fds, self._fd_lock, self._pid = OrderedDict(), threading.Lock(), os.getpid()
            self._in_use, self._closing = {}, set()
        with self._fd_lock:
            fd = self._fds.get(shard)
            if fd is None:
                fd = os.open(self._paths[shard], os.O_RDONLY)
                self._fds[shard] = fd
                if len(self._fds) > _FD_CACHE:
                    old = self._fds.popitem(last=False)[1]
                    if self._in_use.get(old):
                        self._closing.add(old)
                    else:
                        os.close(old)
            else:
                self._fds.move_to_end(shard)
            self._in_use[fd] = self._in_use.get(fd, 0) + 1
            return fd

    def _release_fd(self, fd: int) -> None:
        with self._fd_lock:
            self._in_use[fd] -= 1
            if not self._in_use[fd]:
                del self._in_use[fd]
                if fd in self._closing:
                    self._closing.discard(fd)
                    os.close(fd)

    def _read_one(self, shard: int, local: int) -> bytes:
        fd = self._acquire_fd(shard)
        try:
            stride = self._stride[shard]
            value_bytes = self.seq_len * self.dtype.itemsize
            if stride:
                data = os.pread(fd, value_bytes, self._data_start[shard] + local * stride)
                if len(data) != value_bytes:
                    raise ValueError(
                        f"domain {self.domain!r}: shard {self._paths[shard]} ends early; it is corrupt"
                    )
                return data
            begin, end = np.frombuffer(os.pread(fd, 8, 4 + 4 * local), dtype=np.uint32).astype(np.int64)
            sample = self._readers[shard].decode_sample(os.pread(fd, int(end - begin), int(begin)))
            return np.ascontiguousarray(sample[TOKENS_COLUMN], dtype=self.dtype).tobytes()
        finally:
            self._release_fd(fd)

    def read(self, ids: Sequence[int] | np.ndarray) -> np.ndarray:
        """Token rows [len(ids), seq_len] (the manifest's dtype) of the samples ``ids`` (0-based, in order)."""
        ids = np.asarray(ids, dtype=np.int64)
        if len(ids) and (ids.min() < 0 or ids.max() >= self.num_samples):
            raise IndexError(
                f"domain {self.domain!r} has {self.num_samples} samples; asked for {ids.min()}..{ids.max()}"
            )
        shards = np.searchsorted(self._starts, ids, side="right") - 1
        locals_ = ids - self._starts[shards]
        buf = b"".join(self._read_one(int(s), int(i)) for s, i in zip(shards, locals_))
        rows = np.frombuffer(buf, dtype=self.dtype).reshape(len(ids), self.seq_len)
        if self.max_token_id is not None and len(rows) and int(rows.max()) > self.max_token_id:
            row = int(np.flatnonzero(rows.max(axis=1) > self.max_token_id)[0])
            self._refuse_sample(int(ids[row]), int(shards[row]), int(locals_[row]), rows[row])
        return rows

    def _refuse_sample(self, sample: int, shard: int, local: int, tokens: np.ndarray) -> None:
        """Raise the error for a sample holding ids above ``max_token_id`` (module docstring)."""
        bad = np.flatnonzero(tokens > self.max_token_id)
        done = self.folder.parent.parent / WORK_DIR / "done" / f"{self.domain}.json"
        if done.is_file():
            redo = (
                f"delete {done} and run data_prep/tokenize_domains.py again with the same arguments (it redoes "
                "that domain only)"
            )
        else:  # a copy without data preparation's records
            redo = "run data_prep/tokenize_domains.py again into a fresh --output"
        raise ValueError(
            f"domain {self.domain!r}: sample {local} of shard {self._paths[shard]} (sample {sample} of "
            f"{self.folder}) holds token id {int(tokens[bad[0]])} at position {int(bad[0])} ({len(bad)} ids "
            f"in this sample are above {self.max_token_id}, the largest id data preparation wrote, per "
            f"manifest.json){self._hash_note(shard)}. Re-run data preparation for domain {self.domain!r}: "
            f"{redo}, or copy the domain's shards again from an intact copy"
        )

    def _hash_note(self, shard: int) -> str:
        """Whether the shard's bytes still match the hash recorded in ``index.json`` at preparation."""
        from streaming.base.hashing import get_hash, get_hashes

        recorded = self._readers[shard].raw_data.hashes or {}
        algo = next((a for a in sorted(recorded) if a in get_hashes()), None)
        if algo is None:
            return "; the shard is corrupt (index.json records no hash to tell since when)"
        with open(self._paths[shard], "rb") as f:
            actual = get_hash(algo, f.read())
        if actual != recorded[algo]:
            return (
                f"; the shard is corrupt: its {algo} no longer matches index.json, its bytes changed after "
                "it was written"
            )
        return (
            f"; the shard's {algo} still matches index.json, so it was written this way: the manifest or the "
            "preparation is at fault"
        )

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_fds"], state["_in_use"], state["_closing"] = OrderedDict(), {}, set()
        del state["_fd_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._fd_lock = threading.Lock()
        self._pid = os.getpid()


# ---------------------------------------------------------------------------------------------------
# Configuration helpers


def _split_root(
    local: str | os.PathLike, split: str, manifest: Manifest | None = None
) -> tuple[Path, str, Manifest]:
    """The folder holding the domain folders, the split name and the manifest, for ``local``.

    ``manifest``: ``local``'s manifest already read (not read again; ``_open_domains`` checks every
    domain's sample count against it); ``None`` reads ``manifest.json``.
    """
    root = Path(local)
    if (root / MANIFEST_NAME).is_file():  # DATA_DIR itself
        root = root / split
    elif root.name in SPLITS:
        split = root.name
    return root, split, load_manifest(root) if manifest is None else manifest


def _domain_list(manifest: Manifest, domains: Sequence[str] | None) -> list[str]:
    if domains is None:
        return manifest.domain_names
    domains = [str(d) for d in domains]
    unknown = [d for d in domains if d not in manifest.domains]
    if unknown:
        raise ValueError(f"domains {unknown} are not in the manifest (it has {manifest.domain_names})")
    if not domains or len(set(domains)) != len(domains):
        raise ValueError(f"the domain list must be non-empty and without repeats, got {domains}")
    return domains


def _id_limit(manifest: Manifest) -> int | None:
    """The largest id a sample may hold: the manifest's ``max_token_id``, else its vocabulary's last id."""
    if manifest.max_token_id is not None:
        return manifest.max_token_id
    vocab = manifest.tokenizer.get("vocab_size")
    return int(vocab) - 1 if vocab else None


def _open_domains(root: Path, split: str, manifest: Manifest, domains: Sequence[str]) -> list[DomainShards]:
    opened = []
    for domain in domains:
        shards = DomainShards(root / domain, domain, manifest.seq_len, manifest.dtype, _id_limit(manifest))
        expected = getattr(manifest.domains[domain], split).sequences
        if shards.num_samples != expected:
            raise ValueError(
                f"domain {domain!r}: the manifest says {expected} {split} sequences but {root / domain} holds "
                f"{shards.num_samples}; the shards and manifest.json are out of sync (re-run data preparation)"
            )
        opened.append(shards)
    return opened
