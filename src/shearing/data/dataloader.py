"""The domain-mixture train loader, the per-domain eval loader, and their llm-foundry builders.

Data layout: ``DATA_DIR/{train,eval}/<domain>/`` MDS shards (column ``tokens``, every sample exactly
``seq_len`` tokens) plus ``DATA_DIR/manifest.json`` (``shearing.data.manifest``). Shards are read locally
with streaming's MDS readers (index parsing and decoding are streaming's; the byte reads are ours:
``os.pread`` on cached file descriptors, which is what makes random access cheap). ``remote:`` is not
supported: copy the shards to local disk first. Every sample read, train or eval, is checked against the
manifest's ``max_token_id``: a shard corrupted after preparation is refused naming the shard file and
sample (``shearing.data.shards``) before its batch reaches the model, not as an ``IndexError`` (a
device-side assert on a GPU) in the embedding. A dataset given ``manifest`` (the run's, read once and
checked before anything heavy; the builders take it as ``dataset["manifest"]``) does not read
``manifest.json`` again; without it, each dataset reads it once.

Train batches (``DomainMixtureDataset``) are dicts of ``input_ids`` and ``labels`` (LongTensor [b, T],
equal: the model shifts), ``domain_idx`` (LongTensor [b], index into ``dataset.domains``) and
``sample_id`` (LongTensor [b], the sample's index within its domain's split). Which samples make each
global batch is decided by ``shearing.data.mixture`` (deterministic, rank-consistent; read its docstring
for the allocation rule and its bounds). The dataset yields samples, device batch after device batch,
and the DataLoader stacks them with ``batch_size = device_batch_size`` (Composer reads that attribute
to size microbatches). The stream is infinite: set ``max_duration`` in ``ba``, ``sp`` or ``tok``. In the
raw loader output ``labels`` is the ``input_ids`` tensor itself (the token block is stacked once, and
crosses from an eval worker once, not twice); the ``DataSpec``'s batch transform gives it its own storage
before the model sees it.

Where batches are built. The train loader built by ``build_domain_mixture_dataloader`` composes and
reads each batch in the main process at the moment the trainer asks for it (the DataLoader has no worker
processes, so nothing is prefetched): a proportion update published after step s
(``set_proportions(p, after_step=s)``, called by the ``DynamicLoading`` callback once s batches were
trained) is in effect for batch s (0-based), the very next batch, on every rank. The builder's
``num_workers`` is the number of reader threads that read one batch's samples in parallel (``os.pread``
releases the GIL; useful when the shards are not in the page cache), never a look-ahead. Why not worker
processes: they build batches ``num_workers * prefetch_factor`` ahead, so an update could only take
effect that many batches late (16 of every 50 pruning steps with 8 workers and prefetch 2), and for these
pre-tokenized shards they are slower, not faster: a batch is a few ``pread`` calls and no tokenization,
while a worker must pickle the batch through shared memory (``bench/loader_throughput.py``, seq 4096,
batch 32, shared 2-core CPU: a process loader gave 1002 batches/s in process vs 236 with 2 workers, and
lag 4; the thread reader gives lag 0 at every ``num_workers``, 262-904 batches/s on a busier machine).
The dataset refuses to run inside a DataLoader worker process. An update for a batch already composed
raises instead of diverging, so every rank switches at the same batch on every run. (The eval loader's
``num_workers`` are ordinary DataLoader worker processes: it has no proportions to follow.)

Resumption. Composer calls ``state_dict(num_samples, from_beginning)`` when it checkpoints, with the
number of samples trained (summed over ranks). The main process replays the cheap allocation up to
that step (a ledger, advanced incrementally) and stores ``MixtureState``: the step, per-domain cursors
and residuals, the proportions in effect and the updates not yet in effect. On load, Composer calls
``load_state_dict`` before the loader is iterated and marks the train dataset as resumed, so it does
not also skip batches; the loader starts composing at the saved step. Every ``iter()`` of the loader
starts from that base state (step 0, or the loaded checkpoint): Composer iterates an infinite train
loader once per ``fit``.

Eval batches (``DomainEvalDataset``) take the domains in a fixed order, no mixing, optionally the first
``max_seqs_per_domain`` sequences of each. Global position g goes to rank ``g mod W``; ranks get equal
numbers of batches (so FSDP collectives line up) and the at most one missing sample per rank is a pad
row: token 0, ``labels`` all -100, ``domain_idx`` -1, ``sample_id`` -1, which no metric counts.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, default_collate, get_worker_info

from shearing.data.labels import IGNORE_INDEX
from shearing.data.manifest import Manifest
from shearing.data.mixture import Mixture, MixtureState, validate_proportions
from shearing.data.shards import _domain_list, _open_domains, _split_root

log = logging.getLogger(__name__)

STATE_VERSION = 1


def _check_remote(remote: str | None) -> None:
    if remote:
        raise ValueError(
            f"remote={remote!r}: this loader reads local shards only; copy them to `local` first "
            "(e.g. with your storage's CLI), then drop `remote`"
        )


def _rank_world(rank: int | None, world_size: int | None) -> tuple[int, int]:
    from composer.utils import dist

    world = dist.get_world_size() if world_size is None else int(world_size)
    rank = dist.get_global_rank() if rank is None else int(rank)
    if world <= 0 or not 0 <= rank < world:
        raise ValueError(f"rank {rank} is not in a world of size {world}")
    return rank, world


def _worker() -> tuple[int, int]:
    info = get_worker_info()
    return (0, 1) if info is None else (info.id, info.num_workers)


def _samples(
    tokens: np.ndarray, domain_idx: np.ndarray, sample_ids: np.ndarray
) -> Iterator[dict[str, torch.Tensor]]:
    """One dict per row; a pad row (domain -1) gets labels -100. The DataLoader stacks them."""
    rows = torch.from_numpy(tokens)
    for row, d, i in zip(rows, domain_idx.tolist(), sample_ids.tolist()):
        labels = row if d >= 0 else torch.full_like(row, IGNORE_INDEX)
        yield {
            "input_ids": row,
            "labels": labels,
            "domain_idx": torch.tensor(d),
            "sample_id": torch.tensor(i),
        }


# ---------------------------------------------------------------------------------------------------
# Train: the domain mixture


class DomainMixtureDataset(IterableDataset):
    """An infinite stream of this rank's device batches of a deterministic domain mixture.

    Args:
        local: ``DATA_DIR/train`` (or ``DATA_DIR``) with the manifest and one MDS folder per domain.
        device_batch_size: samples per device batch; the global batch is this × ``world_size``.
        domains: domain names (default: the manifest's, in its order).
        proportions: initial proportions, a list aligned with ``domains`` or a mapping; default: each
            domain's share of the split's tokens in the manifest (restricted to ``domains``).
        seed: seeds the per-domain epoch permutations and per-device-batch shuffles.
        shuffle: shuffle (``False``: each domain in storage order, slots in domain order).
        rank, world_size: default to Composer's distributed setup; give them to simulate ranks.
        read_threads: threads reading one batch's samples in parallel (0 or 1: read inline); they
            never read ahead of the batch being composed.
        remote: unsupported; an error if given.
        manifest: the data root's manifest, already read (it must be ``local``'s: every domain's sample
            count is checked against it); ``None`` reads ``manifest.json``.
    """

    NOT_YAML_KEYS: tuple[str, ...] = ("device_batch_size", "read_threads", "manifest")  # set by our code

    def __init__(
        self,
        local: str | os.PathLike,
        device_batch_size: int,
        domains: Sequence[str] | None = None,
        proportions: Sequence[float] | Mapping[str, float] | None = None,
        seed: int = 17,
        shuffle: bool = True,
        rank: int | None = None,
        world_size: int | None = None,
        read_threads: int = 0,
        remote: str | None = None,
        *,
        manifest: Manifest | None = None,
    ):
        super().__init__()
        _check_remote(remote)
        if int(read_threads) != read_threads or read_threads < 0:
            raise ValueError(f"read_threads must be an integer >= 0, got {read_threads}")
        self.read_threads = int(read_threads)
        if int(device_batch_size) != device_batch_size or device_batch_size <= 0:
            raise ValueError(f"device_batch_size must be a positive integer, got {device_batch_size}")
        root, split, manifest = _split_root(local, "train", manifest)
        self.local = str(root)
        self.domains = _domain_list(manifest, domains)
        if proportions is None:
            shares = manifest.token_proportions(split)
            total = sum(shares[d] for d in self.domains)
            if total <= 0:
                raise ValueError(f"the manifest's {split} split holds no tokens in domains {self.domains}")
            proportions = [shares[d] / total for d in self.domains]
        self.initial_proportions = validate_proportions(proportions, self.domains)
        self.shards = _open_domains(root, split, manifest, self.domains)
        self.seq_len = manifest.seq_len
        self.max_seq_len = manifest.seq_len  # what Composer's default token counting looks for
        self.device_batch_size = int(device_batch_size)
        self.rank, self.world_size = _rank_world(rank, world_size)
        self.global_batch_size = self.device_batch_size * self.world_size
        self.seed = int(seed)
        self.shuffle = bool(shuffle)
        self._base = MixtureState.initial(self.initial_proportions)
        self._published: list[tuple[int, list[float]]] = []  # (effective step, proportions), in step order
        self._ledger: Mixture | None = None
        self._ledger_seen = 0

    # ----------------------------------------------------------------------------- proportions
    def _mixture(self, state: MixtureState) -> Mixture:
        return Mixture(
            self.domains,
            [s.num_samples for s in self.shards],
            self.global_batch_size,
            self.seed,
            self.shuffle,
            state=state,
        )

    @property
    def proportions(self) -> list[float]:
        """The latest proportions: those of the last ``set_proportions`` call, else the starting ones."""
        if self._published:
            return list(self._published[-1][1])
        pending = self._base.pending
        return list(pending[-1][1]) if pending else list(self._base.proportions)

    def set_proportions(self, proportions: Sequence[float] | Mapping[str, float], after_step: int) -> int:
        """Use ``proportions`` from batch ``after_step`` (0-based: the next one) on; returns that batch.

        Call it after ``after_step`` batches were trained, before the next one is asked for, with the
        same arguments on every rank. Steps must not decrease from call to call.
        """
        values = validate_proportions(proportions, self.domains)
        effective = int(after_step)
        last = self._published[-1][0] if self._published else self._base.step
        if effective < last:
            raise ValueError(
                f"proportion update for step {effective} comes after one for step {last}: "
                "updates must be published in step order"
            )
        self._published.append((effective, values))
        return effective

    def reset_proportions(self, proportions: Sequence[float] | Mapping[str, float]) -> None:
        """Replace the starting proportions; only before the first batch of a fresh run."""
        if self._base.step != 0 or self._published or self._base.pending:
            raise ValueError(
                "starting proportions can only be replaced before the first batch of a fresh run"
            )
        self.initial_proportions = validate_proportions(proportions, self.domains)
        self._base = MixtureState.initial(self.initial_proportions)
        self._ledger = None

    # -------------------------------------------------------------------------------- iteration
    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if get_worker_info() is not None:
            raise ValueError(
                "DomainMixtureDataset builds its batches in the main process (proportion updates apply at "
                "the next batch): build the loader with build_domain_mixture_dataloader, whose num_workers "
                "are reader threads, not with a DataLoader that has worker processes"
            )
        mixture = self._mixture(self._base)
        published, seen = self._published, 0  # the updates of the base state this iterator started from
        threads = self.read_threads if self.read_threads > 1 else 0
        pool = ThreadPoolExecutor(threads, thread_name_prefix="mixture-read") if threads else None
        try:
            while True:
                for effective, values in published[seen:]:  # every update published so far, before composing
                    mixture.schedule(effective, values)
                seen = len(published)
                plan = mixture.next_batch()
                if self.rank == 0:
                    for domain, epoch in plan.new_epochs:
                        log.info(
                            "domain %r ran out of samples at batch %d: starting its epoch %d",
                            domain,
                            plan.step,
                            epoch,
                        )
                domain_idx, sample_ids = mixture.rank_slots(plan, self.rank, self.world_size)
                tokens = self._read(domain_idx, sample_ids, pool)
                yield from _samples(tokens, domain_idx, sample_ids)
        finally:
            if pool is not None:
                pool.shutdown(wait=True)

    def _read(self, domain_idx: np.ndarray, sample_ids: np.ndarray, pool) -> np.ndarray:
        """Token rows of one device batch, read inline or split into contiguous chunks over ``pool``."""
        tokens = np.empty((len(sample_ids), self.seq_len), dtype=np.int64)

        def read_rows(rows: slice) -> None:
            d_idx, ids = domain_idx[rows], sample_ids[rows]
            out = tokens[rows]
            for d in np.unique(d_idx):
                sel = d_idx == d
                out[sel] = self.shards[d].read(ids[sel])

        if pool is None:
            read_rows(slice(None))
            return tokens
        bounds = np.linspace(0, len(sample_ids), min(self.read_threads, len(sample_ids)) + 1).astype(int)
        futures = [pool.submit(read_rows, slice(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]
        for future in futures:
            future.result()
        return tokens

    # ------------------------------------------------------------------------------ resumption
    def _ledger_at(self, step: int) -> Mixture:
        if self._ledger is None or self._ledger.state.step > step:
            self._ledger, self._ledger_seen = self._mixture(self._base), 0
        for effective, values in self._published[self._ledger_seen :]:
            self._ledger.schedule(effective, values)
        self._ledger_seen = len(self._published)
        self._ledger.advance_to(step)
        return self._ledger

    def state_dict(self, num_samples: int, from_beginning: bool = True) -> dict[str, Any]:
        """The state after ``num_samples`` samples (all ranks together) were trained.

        ``from_beginning`` is part of Composer's protocol; this dataset never ends an epoch, so the
        count is always from the start of training.
        """
        step, rest = divmod(int(num_samples), self.global_batch_size)
        if rest:
            raise ValueError(
                f"{num_samples} samples is not a whole number of global batches of {self.global_batch_size}"
            )
        return {
            "version": STATE_VERSION,
            "domains": list(self.domains),
            "num_samples": [s.num_samples for s in self.shards],
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "mixture": self._ledger_at(step).state.to_dict(),
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue from a ``state_dict``; refuses one from a different data or batch configuration."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported mixture loader state version {state.get('version')}")
        mine = {
            "domains": list(self.domains),
            "num_samples": [s.num_samples for s in self.shards],
            "global_batch_size": self.global_batch_size,
            "seed": self.seed,
            "shuffle": self.shuffle,
        }
        for key, value in mine.items():
            if state[key] != value:
                raise ValueError(
                    f"cannot resume the domain mixture: the checkpoint has {key}={state[key]!r}, this run "
                    f"{value!r}; resume with the same data, domains, seed, shuffle and global batch size"
                )
        self._base = MixtureState.from_dict(state["mixture"])
        self._published, self._ledger, self._ledger_seen = [], None, 0


# ---------------------------------------------------------------------------------------------------
# Eval: every domain in turn


class DomainEvalDataset(IterableDataset):
    """This rank's eval batches: each domain's first ``max_seqs_per_domain`` sequences, domain by domain.

    Args:
        local: ``DATA_DIR/eval`` (or ``DATA_DIR``).
        device_batch_size: samples per device batch (the last batch may be smaller).
        domains: default: the manifest's, in its order (keep the train loader's order: ``domain_idx``
            indexes this list, and the metrics are built from the train dataset's ``domains``).
        max_seqs_per_domain: read only the first N sequences of each domain (``None``: all).
        rank, world_size: default to Composer's distributed setup.
        remote: unsupported; an error if given.
        manifest: the data root's manifest, already read (it must be ``local``'s); ``None`` reads it.
    """

    NOT_YAML_KEYS: tuple[str, ...] = ("device_batch_size", "manifest")  # set by our code

    def __init__(
        self,
        local: str | os.PathLike,
        device_batch_size: int,
        domains: Sequence[str] | None = None,
        max_seqs_per_domain: int | None = None,
        rank: int | None = None,
        world_size: int | None = None,
        remote: str | None = None,
        *,
        manifest: Manifest | None = None,
    ):
        super().__init__()
        _check_remote(remote)
        if int(device_batch_size) != device_batch_size or device_batch_size <= 0:
            raise ValueError(f"device_batch_size must be a positive integer, got {device_batch_size}")
        if max_seqs_per_domain is not None and max_seqs_per_domain <= 0:
            raise ValueError(
                f"max_seqs_per_domain must be positive (or null for all), got {max_seqs_per_domain}"
            )
        root, split, manifest = _split_root(local, "eval", manifest)
        self.local = str(root)
        self.domains = _domain_list(manifest, domains)
        self.shards = _open_domains(root, split, manifest, self.domains)
        self.seq_len = manifest.seq_len
        self.max_seq_len = manifest.seq_len
        self.device_batch_size = int(device_batch_size)
        self.rank, self.world_size = _rank_world(rank, world_size)
        cap = max_seqs_per_domain or max(s.num_samples for s in self.shards)
        self.samples_per_domain = [min(cap, s.num_samples) for s in self.shards]
        total = sum(self.samples_per_domain)
        self.rank_samples = -(-total // self.world_size)  # every rank gets this many rows, pads included
        self.num_batches = -(-self.rank_samples // self.device_batch_size)

    def __len__(self) -> int:
        return self.rank_samples  # rows this rank yields, pads included: len(DataLoader) = num_batches

    def _rank_slots(self) -> tuple[np.ndarray, np.ndarray]:
        counts = np.asarray(self.samples_per_domain, dtype=np.int64)
        positions = np.arange(self.rank, self.rank_samples * self.world_size, self.world_size)
        real = positions < counts.sum()
        domain_idx = np.full(len(positions), -1, dtype=np.int64)
        sample_ids = np.full(len(positions), -1, dtype=np.int64)
        domain_idx[real] = np.searchsorted(np.cumsum(counts), positions[real], side="right")
        sample_ids[real] = positions[real] - (np.cumsum(counts) - counts)[domain_idx[real]]
        return domain_idx, sample_ids

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        worker, num_workers = _worker()
        domain_idx, sample_ids = self._rank_slots()
        for b in range(worker, self.num_batches, num_workers):
            sl = slice(b * self.device_batch_size, (b + 1) * self.device_batch_size)
            d_idx, ids = domain_idx[sl], sample_ids[sl]
            tokens = np.zeros((len(ids), self.seq_len), dtype=np.int64)
            for d in np.unique(d_idx[d_idx >= 0]):
                sel = d_idx == d
                tokens[sel] = self.shards[d].read(ids[sel])
            yield from _samples(tokens, d_idx, ids)


# ---------------------------------------------------------------------------------------------------
# llm-foundry builders


def num_samples_in_batch(batch: Mapping[str, torch.Tensor]) -> int:
    """Real (non-pad) samples in a batch of either loader."""
    return int((batch["domain_idx"] >= 0).sum())


def num_tokens_in_batch(batch: Mapping[str, torch.Tensor]) -> int:
    """Tokens of the real samples in a batch of either loader."""
    return num_samples_in_batch(batch) * int(batch["input_ids"].shape[1])


def collate(samples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack samples into a batch; ``labels`` that are the very ``input_ids`` rows stay one tensor.

    Sending the token block once instead of twice halves what crosses from a worker to the main
    process (the dominant cost of a multi-worker loader here). ``own_labels``, the loaders' Composer
    batch transform, gives ``labels`` its own storage again before anything can modify it.
    """
    batch = {key: default_collate([s[key] for s in samples]) for key in samples[0] if key != "labels"}
    if all(s["labels"] is s["input_ids"] for s in samples):
        batch["labels"] = batch["input_ids"]
    else:
        batch["labels"] = default_collate([s["labels"] for s in samples])
    return batch


def own_labels(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Composer batch transform: a private copy of ``labels`` if it shares ``input_ids``' storage."""
    if batch["labels"] is batch["input_ids"] or batch["labels"].data_ptr() == batch["input_ids"].data_ptr():
        batch = {**batch, "labels": batch["input_ids"].clone()}
    return batch


def _data_spec(
    dataset: DomainMixtureDataset | DomainEvalDataset,
    num_workers: int = 0,
    prefetch_factor: int | None = None,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    timeout: float = 0,
):
    """What both builders return: ``dataset``'s device batches in a DataLoader, as a Composer ``DataSpec``
    that gives ``labels`` their own storage and counts only real (non-pad) samples and tokens."""
    from composer.core import DataSpec

    loader = DataLoader(
        dataset,
        batch_size=dataset.device_batch_size,
        collate_fn=collate,
        num_workers=num_workers,
        prefetch_factor=prefetch_factor if num_workers > 0 else None,
        pin_memory=pin_memory,
        persistent_workers=persistent_workers and num_workers > 0,
        timeout=timeout,
    )
    return DataSpec(
        loader,
        batch_transforms=own_labels,
        get_num_samples_in_batch=num_samples_in_batch,
        get_num_tokens_in_batch=num_tokens_in_batch,
    )


def build_domain_mixture_dataloader(
    tokenizer: Any,
    device_batch_size: int | float,
    dataset: dict[str, Any],
    num_workers: int = 0,
    prefetch_factor: int | None = 2,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    drop_last: bool = True,
    timeout: float = 0,
):
    """llm-foundry builder (``train_loader: {name: domain_mixture, dataset: {...}, ...}``) -> ``DataSpec``.

    ``dataset`` holds ``DomainMixtureDataset``'s arguments (``local``, ``domains``, ``proportions``,
    ``seed``, ``shuffle``, ...), and may carry the run's ``manifest`` already read (not a yaml key).
    Batches are composed and read in the main process when the trainer asks for them, so proportion
    updates take effect at the next batch (module docstring). ``num_workers`` is the number of reader
    threads for one batch's samples, not worker processes; ``prefetch_factor``, ``persistent_workers``
    and ``timeout`` therefore have no effect. ``tokenizer`` is unused (the shards are tokenized) and
    ``drop_last`` has no effect (the stream is infinite); all are accepted for the registry's calling
    convention.
    """
    del tokenizer, drop_last, prefetch_factor, persistent_workers, timeout
    if int(num_workers) != num_workers or num_workers < 0:
        raise ValueError(f"train_loader.num_workers must be an integer >= 0, got {num_workers}")
    if "update_lag" in dataset:
        raise ValueError(
            f"train_loader.dataset.update_lag={dataset['update_lag']!r}: this loader builds batches in the main "
            "process, so updates always apply at the next batch; remove update_lag"
        )
    ds = DomainMixtureDataset(device_batch_size=device_batch_size, read_threads=int(num_workers), **dataset)
    if num_workers:
        log.info(
            "domain_mixture: batches are built in the main process on demand (proportion updates apply at "
            "the next batch); num_workers=%d reads each batch with that many threads",
            num_workers,
        )
    return _data_spec(ds, pin_memory=pin_memory)


def build_domain_eval_dataloader(
    tokenizer: Any,
    device_batch_size: int | float,
    dataset: dict[str, Any],
    num_workers: int = 0,
    prefetch_factor: int | None = 2,
    pin_memory: bool = False,
    persistent_workers: bool = False,
    drop_last: bool = False,
    timeout: float = 0,
):
    """llm-foundry builder (``eval_loader: {name: domain_eval, dataset: {...}}``) -> ``DataSpec``.

    ``dataset`` holds ``DomainEvalDataset``'s arguments (``local``, ``domains``, ``max_seqs_per_domain``),
    and may carry the run's ``manifest`` already read (not a yaml key). ``num_workers`` are DataLoader
    worker processes. ``drop_last`` must stay False: every eval sequence is read, by exactly one rank.
    """
    del tokenizer
    if drop_last:
        raise ValueError("drop_last=True would skip eval sequences; the eval loader reads every one")
    ds = DomainEvalDataset(device_batch_size=device_batch_size, **dataset)
    return _data_spec(ds, num_workers, prefetch_factor, pin_memory, persistent_workers, timeout)


def loader_domains(loader: Any) -> list[str]:
    """The domain names of a built train loader (a ``DataSpec`` or a ``DataLoader``); [] for plain text."""
    dataset = getattr(getattr(loader, "dataloader", loader), "dataset", None)
    return list(getattr(dataset, "domains", []) or [])
