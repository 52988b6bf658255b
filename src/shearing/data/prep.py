"""Tokenize raw domains into fixed-length MDS sequences, with a held-out eval split per domain.

``prepare(config)`` runs four phases, each safe to interrupt and rerun:

1. **Tokenize** every raw file (``workers`` processes, one file a task) into a token cache
   ``DATA_DIR/.prep/tokens/<domain>/<k>.bin`` plus an index ``<k>.npz`` (per-document token offsets and
   document ids). Each document becomes BOS + text + EOS, or text + EOS, following the tokenizer's own
   convention (``shearing.data.tokenizer``: ``--bos-token``, ``--eos-token``, ``--no-bos`` override it;
   the choice is recorded in the manifest). Special-token strings inside a text (a
   literal ``</s>``) are encoded as plain text, never as control tokens. A cached file is reused.
   Memory is bounded whatever a document's length: the tokenizer never sees more than
   ``MAX_PIECE_CHARS`` characters a call nor ``_BATCH_CHARS`` a batch (a longer document is cut where
   the tokenizer gives the same tokens, ``shearing.data.pieces``, and written piece by piece, framed
   once); what remains is the document's own text, held once while it is tokenized. With
   ``max_docs_per_domain`` a domain's files are read in order and only its first N documents (files
   in sorted order, then line order) are tokenized; files past them are not read.
2. **Plan** the split. A domain's documents (files in sorted order, then line order) are put in a seeded
   random order, ``document_order``: numpy ``default_rng([seed, crc32(domain)])``, so a domain's split does
   not depend on which other domains are present. Eval takes whole documents from the front of that
   order until their tokens fill ``eval_seqs`` sequences (with a document cap, of the first N only); exactly ``eval_seqs`` are written and the rest
   of the last eval document is dropped (never given to train), so train and eval are disjoint at the
   document level. Train takes the remaining documents, in the same order. A domain that cannot fill
   its eval split *and* give train at least one sequence is an error (lower ``--eval-seqs``); eval
   taking more than half a domain's tokens is a warning. ``train_tokens`` caps the train tokens in
   total; the cap is allotted in proportion to each domain's train tokens left after the eval split
   (the raw data's natural mixture), rounded down to whole sequences, so at most the cap is written.
3. **Write** each domain: documents are concatenated in order and cut into ``seq_len`` sequences, the
   partial tail carried across documents and dropped only at the end of the split. Shards are written
   under ``DATA_DIR/.prep/tmp/<domain>/`` and renamed into ``DATA_DIR/{train,eval}/<domain>``; then a
   completion record ``DATA_DIR/.prep/done/<domain>.json`` is written atomically. Each shard's xxh3_64
   goes into its ``index.json`` (``SHARD_HASHES``), so a shard corrupted later can be told apart. The record is the
   commit point: on rerun a domain with a record is skipped, one without is redone from scratch, and
   its token cache is deleted once it is recorded.
4. **Manifest**: ``DATA_DIR/manifest.json`` from the records, once every domain is done, with the
   tokenizer's fingerprint and the largest token id written (``max_token_id``), which training and
   evaluation check against the model (``shearing.data.compat``).

What decides the bytes written (tokenizer fingerprint, dtype, seq_len, eval_seqs, seed, train_tokens,
max_docs_per_domain, the raw files and their sizes) is kept in ``DATA_DIR/.prep/settings.json``; once a
domain is written, rerunning with other settings is refused instead of silently mixing two
preparations (before that, a change that alters the tokens, such as another cap, drops the token cache).

A full disk (``ENOSPC``, ``EDQUOT``, a short write) anywhere in phases 1, 3 and 4 stops the run with
``DiskFullError``: the file being written, the free space left there and what to do. The partial file
is removed; finished domains and cached files stay, so rerunning the same command resumes.

Token dtype: ``uint16`` when every id fits (a vocabulary of at most 65,536 tokens, added tokens
included), else ``uint32``. The document order holds one int64 per document in memory, fine for the
~1e7 documents of a pruning- or CPT-sized sample; the token cache costs as much disk as the shards.
"""

from __future__ import annotations

import collections
import errno
import itertools
import json
import logging
import multiprocessing
import os
import queue
import re
import shutil
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from shearing.data.manifest import (
    WORK_DIR,
    DomainEntry,
    Manifest,
    SplitStats,
    manifest_path,
    save_manifest,
)
from shearing.data.pieces import MAX_PIECE_CHARS, CutStats, document_pieces
from shearing.data.raw import RawDomain, RawFile, ReadStats, discover_domains, read_documents
from shearing.data.tokenizer import TokenizerInfo, load_tokenizer_info
from shearing.io import write_json_atomic

logger = logging.getLogger(__name__)

_SUFFIXES = {"K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_BATCH_DOCS = 256  # documents (or pieces) per tokenizer batch ...
_BATCH_CHARS = 1 << 18  # ... and characters: what one batch costs in memory is bounded by this
SHARD_HASHES = ["xxh3_64"]  # per-shard hashes in each index.json (streaming's MDSWriter ``hashes``)


@dataclass(frozen=True)
class PrepConfig:
    """Arguments of ``data_prep/tokenize_domains.py`` (see the module docstring)."""

    input: Path
    tokenizer: str
    output: Path
    seq_len: int = 4096
    eval_seqs: int = 500
    train_tokens: int | None = None
    workers: int = 1
    seed: int = 17
    progress: bool = True
    bos_token: str | None = None  # override the tokenizer's BOS convention (a token string)
    eos_token: str | None = None  # override its EOS
    no_bos: bool = False  # documents get no BOS
    max_docs_per_domain: int | None = None  # read only each domain's first N documents

    def __post_init__(self) -> None:
        if self.seq_len < 2:
            raise ValueError(f"--seq-len must be at least 2 (a token and its successor), got {self.seq_len}")
        if self.eval_seqs < 1:
            raise ValueError(
                f"--eval-seqs must be at least 1, got {self.eval_seqs}: dynamic batch loading needs "
                "held-out sequences in every domain"
            )
        if self.train_tokens is not None and self.train_tokens < 1:
            raise ValueError(
                f"--train-tokens must be positive (or left out for no cap), got {self.train_tokens}"
            )
        if self.max_docs_per_domain is not None and self.max_docs_per_domain < 1:
            raise ValueError(
                f"--max-docs-per-domain must be at least 1 (or left out for no cap), got {self.max_docs_per_domain}"
            )
        if self.workers < 1:
            raise ValueError(f"--workers must be at least 1, got {self.workers}")
        inp, out = Path(self.input).resolve(), Path(self.output).resolve()
        if out == inp or inp in out.parents:
            raise ValueError(
                f"--output {self.output} must not be inside --input {self.input}: pick another folder"
            )


def parse_token_count(text: str | int) -> int:
    """``"0.4B"`` -> 400_000_000; suffixes K, M, B, T (powers of 1000), case-insensitive; plain integers too."""
    raw = str(text).strip().upper().replace("_", "")
    scale = _SUFFIXES.get(raw[-1:], 1)
    number = raw[:-1] if raw[-1:] in _SUFFIXES else raw
    try:
        value = Decimal(number) * scale
    except InvalidOperation:
        value = Decimal(-1)
    if value < 1 or value != value.to_integral_value():
        raise ValueError(
            f"token count {text!r} is not a positive whole number of tokens: write e.g. 400000, 50M or 0.4B"
        )
    return int(value)


def choose_token_dtype(vocab_size: int) -> str:
    """``uint16`` when every token id (0 .. vocab_size - 1) fits in 16 bits, else ``uint32``."""
    if vocab_size < 1:
        raise ValueError(f"vocab size must be positive, got {vocab_size}")
    if vocab_size > 2**32:
        raise ValueError(f"vocab size {vocab_size} does not fit uint32 token ids")
    return "uint16" if vocab_size <= 2**16 else "uint32"


# ---------------------------------------------------------------------------------------------------
# A full disk


_DISK_FULL = (errno.ENOSPC, errno.EDQUOT)
_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")  # numpy's message for a short write


class DiskFullError(OSError):
    """The disk (or quota) of the output ran out; the message names the file, the free space and the fix."""

    def __str__(self) -> str:
        return str(self.strerror)


def _format_bytes(count: int) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if count < 1000 or unit == "TB":
            return f"{count:,.0f} {unit}" if unit == "B" else f"{count:,.1f} {unit}"
        count /= 1000
    raise AssertionError("unreachable")


def _free_space(path: Path) -> str:
    for folder in (path, *path.parents):
        if folder.exists():
            return f"{_format_bytes(shutil.disk_usage(folder).free)} free there"
    return "free space unknown"


@contextmanager
def _writing(path: Path, cleanup: Iterable[Path] = ()) -> Iterator[None]:
    """Turn running out of disk while writing ``path`` into ``DiskFullError``, removing ``cleanup`` first.

    Caught: ``ENOSPC``, ``EDQUOT`` and short writes. The partial files go, so that their space is free
    again; what was finished before stays, and a rerun resumes from it.
    """
    try:
        yield
    except DiskFullError:
        raise
    except OSError as err:
        if err.errno not in _DISK_FULL and not _SHORT_WRITE.search(str(err)):
            raise
        for leftover in cleanup:
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)
        reason = err.strerror or str(err)
        raise DiskFullError(
            errno.ENOSPC,
            f"no space left on device while writing {path} ({reason}; {_free_space(path.parent)}). Domains "
            "already prepared are kept, and so are the token caches of files already tokenized "
            f"({WORK_DIR}/tokens). Free space on that disk (the shards take 2 bytes a token, 4 for uint32, "
            "and a domain's token cache as much again while it is written) or move the output folder to a "
            "larger disk, then rerun the same command: it resumes with the domains not yet done.",
        ) from err


# ---------------------------------------------------------------------------------------------------
# Phase 1: tokenize files into the cache


@dataclass(frozen=True)
class FileTask:
    """Tokenize ``file`` of ``domain`` into ``<cache>.bin`` / ``<cache>.npz``."""

    domain: str
    file: RawFile
    cache: Path


_WORKER_STATE: dict[str, Any] = {}


def _worker_state(backend_json: str, bos: int | None, eos: int, dtype: str) -> dict[str, Any]:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_str(backend_json)
    tokenizer.encode_special_tokens = True  # a literal "</s>" in a text is text, not EOS
    return {"tokenizer": tokenizer, "bos": bos, "eos": eos, "dtype": np.dtype(dtype)}


def _init_pool_worker(backend_json: str, bos: int | None, eos: int, dtype: str) -> None:
    os.environ["TOKENIZERS_PARALLELISM"] = "false"  # one process per core already
    _WORKER_STATE.update(_worker_state(backend_json, bos, eos, dtype))


def _run_task(task: FileTask, max_docs: int | None) -> tuple[FileTask, int]:
    return task, tokenize_file(task.file, task.cache, **_WORKER_STATE, max_docs=max_docs)


@dataclass(frozen=True)
class _Piece:
    doc_id: int
    text: str
    first: bool
    last: bool


def _piece_batches(
    documents: Iterable[tuple[int, str]], tokenizer: Any, cuts: CutStats
) -> Iterator[list[_Piece]]:
    """Documents as pieces (``shearing.data.pieces``), batched up to ``_BATCH_DOCS`` or ``_BATCH_CHARS``."""
    batch: list[_Piece] = []
    chars = 0
    for doc_id, text in documents:
        pieces = document_pieces(text, tokenizer, cuts)
        piece = next(pieces)
        first = True
        for following in itertools.chain(pieces, [None]):
            batch.append(_Piece(doc_id, piece, first=first, last=following is None))
            first = False
            chars += len(piece)
            if len(batch) == _BATCH_DOCS or chars >= _BATCH_CHARS:
                yield batch
                batch, chars = [], 0
            piece = following
    if batch:
        yield batch


def tokenize_file(
    file: RawFile,
    cache: Path,
    tokenizer: Any,
    bos: int | None,
    eos: int,
    dtype: np.dtype,
    max_docs: int | None = None,
) -> int:
    """Write every document of ``file`` as [BOS +] ids + EOS to ``cache.bin``, its index to ``cache.npz``.

    Reads at most ``max_docs`` documents; returns how many were written. The tokenizer never sees more
    than ``MAX_PIECE_CHARS`` characters at a time (``shearing.data.pieces``), so memory does not grow with
    a document's length beyond the document's own text.
    """
    stats, cuts = ReadStats(), CutStats()
    offsets, doc_ids = [0], []
    documents = itertools.islice(read_documents(file, stats), max_docs)
    tmp_bin = cache.with_name(cache.name + ".bin.tmp")
    tmp_index = cache.with_name(cache.name + ".npz.tmp")
    with _writing(tmp_bin, cleanup=[tmp_bin, tmp_index]):
        with open(tmp_bin, "wb") as out:
            written = 0
            for batch in _piece_batches(documents, tokenizer, cuts):
                encodings = tokenizer.encode_batch_fast([p.text for p in batch], add_special_tokens=False)
                for piece, encoding in zip(batch, encodings, strict=True):
                    head = int(piece.first and bos is not None)
                    tail = int(piece.last)
                    tokens = np.empty(len(encoding.ids) + head + tail, dtype=dtype)
                    if head:
                        tokens[0] = bos
                    if tail:
                        tokens[-1] = eos
                    tokens[head : len(tokens) - tail] = encoding.ids
                    out.write(tokens.data)
                    written += len(tokens)
                    if piece.last:
                        offsets.append(written)
                        doc_ids.append(piece.doc_id)
        os.replace(tmp_bin, cache.with_suffix(".bin"))
        with open(tmp_index, "wb") as out:
            np.savez(
                out,
                offsets=np.asarray(offsets, dtype=np.int64),
                doc_ids=np.asarray(doc_ids, dtype=np.int64),
                skipped=np.asarray([int(stats.skipped_file), stats.skipped_documents], dtype=np.int64),
                cuts=np.asarray([cuts.documents, cuts.cuts, cuts.unverified], dtype=np.int64),
            )
        os.replace(tmp_index, cache.with_suffix(".npz"))
    return len(doc_ids)


def _cached_documents(cache: Path) -> int:
    with np.load(cache.with_suffix(".npz")) as index:
        return len(index["doc_ids"])


def tokenize_files(
    tasks: list[FileTask],
    info: TokenizerInfo,
    dtype: str,
    workers: int,
    progress: bool,
    max_docs: int | None = None,
) -> None:
    """Tokenize the tasks whose cache is missing, in ``workers`` spawned processes (inline for one).

    With ``max_docs`` (per domain), each file stops after that many documents and a domain's files are
    taken in order: once the files before one hold ``max_docs`` documents, it is not read at all (at
    most ``workers - 1`` files a domain are read ahead while earlier ones are still running).
    """
    documents = {t.cache: _cached_documents(t.cache) for t in tasks if t.cache.with_suffix(".npz").exists()}
    todo = collections.deque(t for t in tasks if t.cache not in documents)
    if not todo:
        return
    for task in todo:
        task.cache.parent.mkdir(parents=True, exist_ok=True)
    by_domain: dict[str, list[FileTask]] = collections.defaultdict(list)
    for task in tasks:
        by_domain[task.domain].append(task)

    def wanted(task: FileTask) -> bool:
        before = 0
        for earlier in by_domain[task.domain]:
            if max_docs is None or earlier is task or earlier.cache not in documents:
                return True
            before += documents[earlier.cache]
            if before >= max_docs:
                return False
        return True

    args = (info.backend_json, info.bos_token_id, info.eos_token_id, dtype)
    with tqdm(total=len(todo), desc="tokenize", unit="file", disable=not progress) as bar:
        if workers == 1 or len(todo) == 1:
            state = _worker_state(*args)
            for task in todo:
                if wanted(task):
                    documents[task.cache] = tokenize_file(task.file, task.cache, **state, max_docs=max_docs)
                bar.update()
            return
        processes = min(workers, len(todo))
        finished: queue.SimpleQueue = queue.SimpleQueue()
        context = multiprocessing.get_context("spawn")  # fork-safe with torch/tokenizers threads
        running: dict[Path, FileTask] = {}
        with context.Pool(processes, initializer=_init_pool_worker, initargs=args) as pool:
            try:
                while todo or running:
                    while todo and len(running) < processes:
                        task = todo.popleft()
                        if not wanted(task):
                            bar.update()
                            continue
                        pool.apply_async(
                            _run_task, (task, max_docs), callback=finished.put, error_callback=finished.put
                        )
                        running[task.cache] = task
                    if not running:
                        continue
                    result = finished.get()
                    if isinstance(result, BaseException):
                        raise result
                    task, count = result
                    del running[task.cache]
                    documents[task.cache] = count
                    bar.set_postfix_str(task.domain)
                    bar.update()
            except BaseException:
                pool.terminate()  # then drop the unfinished caches' partial files (a full disk needs the room)
                pool.join()
                for cache in running:
                    for suffix in (".bin.tmp", ".npz.tmp"):
                        cache.with_name(cache.name + suffix).unlink(missing_ok=True)
                raise


# ---------------------------------------------------------------------------------------------------
# Phase 2: the per-domain document table, the eval/train split, the train-token allotment


@dataclass
class DomainDocs:
    """A tokenized domain: per document its file, token range in that file's cache, and id in the file."""

    name: str
    source: Path
    files: list[RawFile]
    caches: list[Path]
    file_index: np.ndarray
    starts: np.ndarray
    lengths: np.ndarray
    doc_ids: np.ndarray
    skipped_files: int
    skipped_documents: int
    cuts: CutStats = field(default_factory=CutStats)
    files_read: int = 0  # with a document cap, the files after these were not needed

    def identity(self, doc: int) -> list[Any]:
        """``[file, doc_id]`` of document ``doc``: how the manifest names it."""
        return [self.files[int(self.file_index[doc])].name, int(self.doc_ids[doc])]


def load_domain_docs(domain: RawDomain, caches: list[Path], max_docs: int | None = None) -> DomainDocs:
    """Read the cache indexes of one domain into its document table: its first ``max_docs`` documents."""
    file_index, starts, lengths, doc_ids = [], [], [], []
    skipped_files = skipped_documents = total = 0
    cuts = CutStats()
    for k, cache in enumerate(caches):
        if max_docs is not None and total >= max_docs:
            caches = caches[:k]
            break
        with np.load(cache.with_suffix(".npz")) as index:
            offsets = index["offsets"]
            take = len(offsets) - 1 if max_docs is None else min(len(offsets) - 1, max_docs - total)
            offsets = offsets[: take + 1]
            doc_ids.append(index["doc_ids"][:take])
            skipped_files += int(index["skipped"][0])
            skipped_documents += int(index["skipped"][1])
            if "cuts" in index:
                cuts.add(CutStats(*(int(x) for x in index["cuts"])))
        total += take
        starts.append(offsets[:-1])
        lengths.append(np.diff(offsets))
        file_index.append(np.full(take, k, dtype=np.int32))
    return DomainDocs(
        name=domain.name,
        source=domain.source,
        files=domain.files,
        caches=caches,
        file_index=np.concatenate(file_index),
        starts=np.concatenate(starts),
        lengths=np.concatenate(lengths),
        doc_ids=np.concatenate(doc_ids),
        skipped_files=skipped_files,
        skipped_documents=skipped_documents,
        cuts=cuts,
        files_read=len(caches),
    )


def document_order(num_docs: int, seed: int, domain: str) -> np.ndarray:
    """The seeded random order of a domain's documents; eval is its front, train the rest."""
    rng = np.random.default_rng([seed, zlib.crc32(domain.encode("utf-8"))])
    return rng.permutation(num_docs)


@dataclass(frozen=True)
class SplitPlan:
    """A domain's document order, how many of its first documents are eval, and train's token supply."""

    order: np.ndarray
    num_eval_docs: int
    train_tokens_available: int


def plan_split(
    docs: DomainDocs, seq_len: int, eval_seqs: int, seed: int, max_docs: int | None = None
) -> SplitPlan:
    """Split ``docs`` at the document level (rule in the module docstring); error if the domain runs short.

    ``max_docs`` (the document cap the domain was read with) only shapes the error's advice.
    """
    order = document_order(len(docs.lengths), seed, docs.name)
    ordered = docs.lengths[order]
    total = int(ordered.sum())
    need = eval_seqs * seq_len
    cumulative = np.cumsum(ordered)
    num_eval = int(np.searchsorted(cumulative, need) + 1)
    train_available = total - int(cumulative[num_eval - 1]) if num_eval <= len(ordered) else 0
    if total < need or train_available < seq_len:
        capped = max_docs is not None and len(ordered) >= max_docs
        raise ValueError(
            f"domain {docs.name!r} has {total:,} tokens ({total // seq_len} sequences of {seq_len}) in "
            f"{len(ordered)} documents: not enough for --eval-seqs {eval_seqs} held-out sequences plus at least "
            f"one training sequence from other documents; lower --eval-seqs (e.g. to {max(1, total // seq_len // 4)}) "
            "or --seq-len"
            + (
                f", or raise --max-docs-per-domain, which caps this domain at {max_docs} documents"
                if capped
                else ", or add text to the domain"
            )
        )
    if need > total // 2:
        logger.warning(
            "domain %r: eval takes %d of its %d tokens; consider a smaller --eval-seqs",
            docs.name,
            need,
            total,
        )
    return SplitPlan(order=order, num_eval_docs=num_eval, train_tokens_available=train_available)


def allot_train_sequences(
    available: dict[str, int], seq_len: int, train_tokens: int | None
) -> dict[str, int]:
    """Train sequences per domain: all available, or ``train_tokens`` shared in proportion to ``available``."""
    capacity = {name: tokens // seq_len for name, tokens in available.items()}
    total = sum(available.values())
    if train_tokens is None or train_tokens >= sum(capacity.values()) * seq_len:
        if train_tokens is not None:
            logger.warning(
                "--train-tokens %d is more than the data holds; writing all %d", train_tokens, total
            )
        return capacity
    allotted = {
        name: min(capacity[name], train_tokens * tokens // total // seq_len)
        for name, tokens in available.items()
    }
    empty = [name for name, seqs in allotted.items() if seqs == 0]
    if empty:
        smallest = min(available[name] for name in empty)
        raise ValueError(
            f"--train-tokens {train_tokens:,} leaves domain(s) {', '.join(empty)} without one full training "
            f"sequence under the proportional allotment: raise it to at least {seq_len * total // smallest + 1:,}"
        )
    return allotted


# ---------------------------------------------------------------------------------------------------
# Phase 3: pack and write one domain


def pack_sequences(
    chunks: Iterable[np.ndarray], seq_len: int, max_seqs: int | None = None
) -> Iterator[np.ndarray]:
    """Concatenate ``chunks`` and cut them into ``seq_len`` sequences, the tail carried over and dropped at the end.

    Stops after ``max_seqs`` sequences without reading further chunks.
    """
    if max_seqs == 0:
        return
    buffer: np.ndarray | None = None
    fill = count = 0
    for chunk in chunks:
        if buffer is None:
            buffer = np.empty(seq_len, dtype=chunk.dtype)
        pos = 0
        while pos < len(chunk):
            take = min(seq_len - fill, len(chunk) - pos)
            buffer[fill : fill + take] = chunk[pos : pos + take]
            fill, pos = fill + take, pos + take
            if fill == seq_len:
                yield buffer.copy()
                fill, count = 0, count + 1
                if count == max_seqs:
                    return


class _DocReader:
    """Reads documents' tokens from a domain's cache and counts how many were read."""

    def __init__(self, docs: DomainDocs, dtype: str) -> None:
        self.docs = docs
        self.maps = [
            np.memmap(cache.with_suffix(".bin"), dtype=dtype, mode="r")
            if cache.with_suffix(".bin").stat().st_size
            else None
            for cache in docs.caches
        ]
        self.read = 0

    def chunks(self, doc_indices: np.ndarray) -> Iterator[np.ndarray]:
        for doc in doc_indices:
            tokens = self.maps[self.docs.file_index[doc]]
            start = int(self.docs.starts[doc])
            self.read += 1
            yield np.asarray(tokens[start : start + int(self.docs.lengths[doc])])


def write_split(
    out: Path, sequences: Iterable[np.ndarray], dtype: str, desc: str, total: int, progress: bool
) -> tuple[int, int]:
    """Write ``sequences`` as MDS shards (column ``tokens``, ``ndarray:<dtype>``) into ``out``.

    Each shard's ``SHARD_HASHES`` go into ``index.json``, so a shard whose bytes changed later can be told
    from one that was written that way (``shearing.data.shards``). Returns the count and the largest
    token id written (-1 for none).
    """
    from streaming import MDSWriter

    count, max_id = 0, -1
    columns = {"tokens": f"ndarray:{dtype}"}
    with (
        MDSWriter(out=str(out), columns=columns, compression=None, hashes=SHARD_HASHES) as writer,
        tqdm(total=total, desc=desc, unit="seq", disable=not progress) as bar,
    ):
        for sequence in sequences:
            writer.write({"tokens": sequence})
            max_id = max(max_id, int(sequence.max()))
            count += 1
            bar.update()
    return count, max_id


def write_domain(
    docs: DomainDocs, plan: SplitPlan, train_seqs: int, config: PrepConfig, dtype: str
) -> dict[str, Any]:
    """Write a domain's eval and train shards and move them into place; return its completion record."""
    work = Path(config.output) / WORK_DIR / "tmp" / docs.name
    shutil.rmtree(work, ignore_errors=True)
    stats, max_id = {}, -1
    for split, doc_indices, max_seqs in (
        ("eval", plan.order[: plan.num_eval_docs], config.eval_seqs),
        ("train", plan.order[plan.num_eval_docs :], train_seqs),
    ):
        reader = _DocReader(docs, dtype)
        sequences = pack_sequences(reader.chunks(doc_indices), config.seq_len, max_seqs)
        with _writing(work / split, cleanup=[work]):
            count, split_max = write_split(
                work / split, sequences, dtype, f"{docs.name}/{split}", max_seqs, config.progress
            )
        max_id = max(max_id, split_max)
        assert count == max_seqs, (docs.name, split, count, max_seqs)
        stats[split] = SplitStats(sequences=count, tokens=count * config.seq_len, documents=reader.read)
    for split in ("eval", "train"):
        final = Path(config.output) / split / docs.name
        final.parent.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(work / split, final)
    shutil.rmtree(work, ignore_errors=True)
    entry = DomainEntry(
        train=stats["train"],
        eval=stats["eval"],
        source=str(docs.source),
        skipped_files=docs.skipped_files,
        skipped_documents=docs.skipped_documents,
    )
    return {
        "entry": asdict(entry),
        "train_tokens_available": plan.train_tokens_available,
        "max_token_id": max_id,
        "eval_documents": [docs.identity(doc) for doc in plan.order[: plan.num_eval_docs]],
    }


# ---------------------------------------------------------------------------------------------------
# Orchestration, resume bookkeeping and the manifest


def _settings(
    config: PrepConfig, info: TokenizerInfo, dtype: str, domains: dict[str, RawDomain]
) -> dict[str, Any]:
    return {
        "tokenizer": info.settings_digest,
        "dtype": dtype,
        "seq_len": config.seq_len,
        "eval_seqs": config.eval_seqs,
        "seed": config.seed,
        "train_tokens": config.train_tokens,
        "max_docs_per_domain": config.max_docs_per_domain,
        "domains": {name: [[f.name, f.size] for f in domain.files] for name, domain in domains.items()},
    }


_TOKEN_SETTINGS = ("tokenizer", "dtype", "domains", "max_docs_per_domain")  # what the token cache depends on


def _check_settings(output: Path, settings: dict[str, Any]) -> None:
    """Refuse to resume into ``output`` when a domain was written with other settings, or by something else.

    While no domain is finished yet (e.g. the last run stopped at a "lower --eval-seqs" error), new
    settings simply replace the old ones; the token cache is kept unless the tokens would differ.
    """
    path = output / WORK_DIR / "settings.json"
    if path.exists():
        old = json.loads(path.read_text())
        changed = [key for key in settings if old.get(key) != settings[key]]
        if not changed:
            return
        if any((output / WORK_DIR / "done").glob("*.json")):
            raise ValueError(
                f"--output {output} was prepared with different settings ({', '.join(changed)} changed): rerun "
                "with the same arguments and raw files to resume, or pick a new --output"
            )
        if any(key in _TOKEN_SETTINGS for key in changed):
            shutil.rmtree(output / WORK_DIR / "tokens", ignore_errors=True)
    elif any((output / split).is_dir() and any((output / split).iterdir()) for split in ("train", "eval")):
        raise ValueError(
            f"--output {output} already holds train/ or eval/ data that this tool did not record: pick an "
            "empty --output folder"
        )
    with _writing(path):
        write_json_atomic(path, settings)


def _domain_caches(output: Path, domain: RawDomain) -> list[Path]:
    return [output / WORK_DIR / "tokens" / domain.name / f"{k:06d}" for k in range(len(domain.files))]


def _done_path(output: Path, name: str) -> Path:
    return output / WORK_DIR / "done" / f"{name}.json"


def prepare(config: PrepConfig) -> Manifest:
    """Run the whole preparation (module docstring) and return the manifest written to ``config.output``."""
    output = Path(config.output)
    info = load_tokenizer_info(config.tokenizer, config.bos_token, config.eos_token, config.no_bos)
    dtype = choose_token_dtype(info.vocab_size)
    domains = discover_domains(config.input)
    _check_settings(output, json.loads(json.dumps(_settings(config, info, dtype, domains))))
    records = {
        name: json.loads(_done_path(output, name).read_text())
        for name in domains
        if _done_path(output, name).exists()
    }
    pending = [name for name in domains if name not in records]
    for name in records:
        logger.info("domain %r is already prepared: skipping it", name)

    caches = {name: _domain_caches(output, domains[name]) for name in pending}
    tasks = [
        FileTask(name, file, cache)
        for name in pending
        for file, cache in zip(domains[name].files, caches[name])
    ]
    cap = config.max_docs_per_domain
    tokenize_files(tasks, info, dtype, config.workers, config.progress, cap)
    docs = {name: load_domain_docs(domains[name], caches[name], cap) for name in pending}
    for name in pending:
        _log_reading(docs[name], cap)
    plans = {
        name: plan_split(docs[name], config.seq_len, config.eval_seqs, config.seed, cap) for name in pending
    }

    available = {
        name: records[name]["train_tokens_available"]
        if name in records
        else plans[name].train_tokens_available
        for name in domains
    }
    train_seqs = allot_train_sequences(available, config.seq_len, config.train_tokens)
    for name in pending:
        records[name] = write_domain(docs[name], plans[name], train_seqs[name], config, dtype)
        with _writing(_done_path(output, name)):
            write_json_atomic(_done_path(output, name), records[name])
        shutil.rmtree(output / WORK_DIR / "tokens" / name, ignore_errors=True)

    for leftover in ("tmp", "tokens"):
        shutil.rmtree(output / WORK_DIR / leftover, ignore_errors=True)
    manifest = build_manifest(config, info, dtype, {name: records[name] for name in domains})
    with _writing(manifest_path(output)):
        save_manifest(manifest, output)
    return manifest


def _log_reading(docs: DomainDocs, max_docs: int | None) -> None:
    """Say what the document cap left unread, and how long documents were cut."""
    if max_docs is not None and len(docs.lengths) >= max_docs:
        logger.info(
            "domain %r: capped at its first %d documents (--max-docs-per-domain), from %d of its %d files",
            docs.name,
            max_docs,
            docs.files_read,
            len(docs.files),
        )
    if docs.cuts.documents:
        logger.info(
            "domain %r: %d document(s) longer than %d characters tokenized in %d pieces",
            docs.name,
            docs.cuts.documents,
            MAX_PIECE_CHARS,
            docs.cuts.documents + docs.cuts.cuts,
        )
    if docs.cuts.unverified:
        logger.warning(
            "domain %r: %d cuts of long documents found no place where the tokenizer splits the text the same "
            "way within %d characters (e.g. a long text without spaces); the tokens next to those cuts may "
            "differ from tokenizing the whole document",
            docs.name,
            docs.cuts.unverified,
            MAX_PIECE_CHARS,
        )


def build_manifest(
    config: PrepConfig, info: TokenizerInfo, dtype: str, records: dict[str, dict[str, Any]]
) -> Manifest:
    """The manifest of a finished preparation, from the domains' completion records."""
    domains = {}
    for name, record in records.items():
        entry = dict(record["entry"])
        entry["train"], entry["eval"] = SplitStats(**entry["train"]), SplitStats(**entry["eval"])
        domains[name] = DomainEntry(**entry)
    split = {
        "seed": config.seed,
        "eval_seqs": config.eval_seqs,
        "order": "numpy default_rng([seed, crc32(domain)]).permutation of the domain's documents "
        "(files in sorted order, then line order)",
        "rule": "eval takes whole documents from the front of the order until it fills eval_seqs sequences "
        "(the rest of its last document is dropped); train takes the remaining documents in order",
        "train_tokens": config.train_tokens,
        "max_docs_per_domain": config.max_docs_per_domain,
        "document_cap": "each domain's first max_docs_per_domain documents (files in sorted order, then line "
        "order), taken before the order above; null: every document",
        "train_allotment": "proportional to each domain's tokens left after the eval split, rounded down to whole sequences",
        "eval_documents": {name: record["eval_documents"] for name, record in records.items()},
    }
    maxima = [record.get("max_token_id") for record in records.values()]
    return Manifest(
        seq_len=config.seq_len,
        dtype=dtype,
        domains=domains,
        tokenizer=info.to_manifest(),
        split=split,
        max_token_id=None if not maxima or None in maxima else int(max(maxima)),
    )


def format_summary(manifest: Manifest) -> str:
    """A short table of what was written, for the command line."""
    lines = [
        f"seq_len {manifest.seq_len}, dtype {manifest.dtype}, tokenizer {manifest.tokenizer.get('name', '?')}"
    ]
    lines.append(
        f"{'domain':<16}{'train seqs':>12}{'train tokens':>15}{'eval seqs':>11}{'docs':>10}{'skipped':>14}"
    )
    for name, entry in manifest.domains.items():
        docs = entry.train.documents + entry.eval.documents
        skipped = f"{entry.skipped_files}f/{entry.skipped_documents}d"
        lines.append(
            f"{name:<16}{entry.train.sequences:>12,}{entry.train.tokens:>15,}{entry.eval.sequences:>11,}{docs:>10,}{skipped:>14}"
        )
    if any(entry.skipped_files or entry.skipped_documents for entry in manifest.domains.values()):
        lines.append("skipped: f = files that are not UTF-8, d = documents that are not UTF-8 or empty")
    return "\n".join(lines)
