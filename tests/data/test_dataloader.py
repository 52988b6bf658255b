"""The mixture and eval loaders over real MDS shards: composition, ranks, reader threads, updates, resume,
errors, a manifest read once."""

from __future__ import annotations

import inspect
import json
import logging
import shutil
from collections import Counter
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from data.conftest_mixture import DOMAINS, SEQ_LEN, decode, make_data_root, shard_files

from shearing.data.dataloader import (
    DomainEvalDataset,
    DomainMixtureDataset,
    build_domain_eval_dataloader,
    build_domain_mixture_dataloader,
)
from shearing.data.manifest import load_manifest, save_manifest
from shearing.data.mixture import Mixture

NAMES = list(DOMAINS)
UPDATES = {100: [0.1, 0.1, 0.8], 250: [0.8, 0.15, 0.05], 400: [1 / 3, 1 / 3, 1 / 3], 700: [0.05, 0.9, 0.05]}


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("mixture_data"))


def mixture_loaders(root, world, workers, device_batch=4, seed=3, **dataset):
    return [
        build_domain_mixture_dataloader(
            None,
            device_batch,
            {"local": root / "train", "rank": r, "world_size": world, "seed": seed, **dataset},
            num_workers=workers,
            prefetch_factor=2,
        )
        for r in range(world)
    ]


def run(specs, steps: int, updates: dict[int, list[float]], start: int = 0):
    """Iterate all ranks in lockstep; publish ``updates[s]`` once s batches were consumed (as the callback
    does). Returns per step the list of (domain, sample id) of every rank, in rank order."""
    datasets = [spec.dataloader.dataset for spec in specs]
    iters = [iter(spec.dataloader) for spec in specs]
    out = []
    for step in range(start, start + steps):
        if step in updates:
            for ds in datasets:
                ds.set_proportions(updates[step], after_step=step)
        rows = []
        for it in iters:
            batch = next(it)
            pairs = list(zip(batch["domain_idx"].tolist(), batch["sample_id"].tolist()))
            assert decode(batch["input_ids"]) == pairs  # the rows are the samples the batch claims
            assert (
                torch.equal(batch["labels"], batch["input_ids"]) and batch["input_ids"].dtype == torch.int64
            )
            rows += pairs
        out.append(rows)
    return out


@pytest.mark.parametrize("world,workers", [(1, 0), (1, 2), (2, 0), (2, 2)])
def test_mixture_batches_follow_the_allocation(root, world, workers):
    steps = 1000
    specs = mixture_loaders(root, world, workers)
    ds = specs[0].dataloader.dataset
    assert ds.global_batch_size == 4 * world
    assert ds.read_threads == workers and specs[0].dataloader.num_workers == 0
    batches = run(specs, steps, UPDATES)

    # Composition equals the pure allocation with the update published after step s in effect from batch
    # s on (the next one), whatever num_workers says.
    replay = Mixture(
        NAMES, [n for n, _ in DOMAINS.values()], 4 * world, 3, True, proportions=ds.initial_proportions
    )
    for s, p in UPDATES.items():
        replay.schedule(s, p)
    in_effect, p_now = [], np.asarray(ds.initial_proportions)
    for step, rows in enumerate(batches):
        p_now = np.asarray(UPDATES[step]) if step in UPDATES else p_now
        in_effect.append(p_now)
        plan = replay.next_batch()
        assert sorted(Counter(d for d, _ in rows).items()) == [(d, c) for d, c in enumerate(plan.counts) if c]

    # Within one sample of the ideal after every batch.
    drawn = np.cumsum([np.bincount([d for d, _ in rows], minlength=3) for rows in batches], axis=0)
    ideal = np.cumsum(np.asarray(in_effect) * 4 * world, axis=0)
    assert np.abs(drawn - ideal).max() < 1

    # No sample twice within a domain's epoch, across ranks and workers.
    for d, (name, (size, _)) in enumerate(DOMAINS.items()):
        seq = [i for rows in batches for dd, i in rows if dd == d]
        assert len(seq) > 2 * size, name  # several epochs of every domain were drawn
        first_epoch_steps = [
            [i for dd, i in rows if dd == d] for rows, n in zip(batches, drawn[:, d]) if n <= size
        ]
        first = [i for step in first_epoch_steps for i in step]
        assert len(first) == len(set(first))
        per_id = Counter(seq)
        full, rest = divmod(len(seq), size)
        assert set(per_id) == set(range(size)) if full else True
        assert sorted(per_id.values()) == [full] * (size - rest) + [full + 1] * rest


def test_update_applies_at_the_next_batch_with_the_shipped_worker_settings(root):
    """The recipe's num_workers 8 / prefetch 2 (here 2 / 2): an update after step s changes batch s (0-based),
    and every worker count gives the same batches, with and without updates."""
    updates = {7: [0.0, 0.0, 1.0], 8: [1.0, 0.0, 0.0], 20: [0.2, 0.5, 0.3]}
    outputs = {}
    for workers in (0, 2, 8):
        with_updates = run(mixture_loaders(root, 2, workers), 30, updates)
        without = run(mixture_loaders(root, 2, workers), 30, {})
        assert with_updates[:7] == without[:7]
        assert {d for d, _ in with_updates[7]} == {2}  # wiki only (residuals from before are < 1 sample)
        assert with_updates[7] != without[7] and with_updates[8] != without[8]
        outputs[workers] = with_updates
    assert outputs[0] == outputs[2] == outputs[8]


def test_a_hand_built_loader_matches_the_replay(root):
    """A plain DataLoader over the dataset: each update is in effect from the batch after its step on
    (``set_proportions`` returns that batch), exactly as the replay says."""
    from torch.utils.data import DataLoader

    from shearing.data.dataloader import collate

    updates = {3: [0.1, 0.1, 0.8], 9: [0.8, 0.1, 0.1]}
    ds = DomainMixtureDataset(root / "train", 4, rank=0, world_size=1, seed=3)
    loader = DataLoader(ds, batch_size=4, collate_fn=collate)
    got, it = [], iter(loader)
    for step in range(16):
        if step in updates:
            assert ds.set_proportions(updates[step], after_step=step) == step
        batch = next(it)
        got.append(list(zip(batch["domain_idx"].tolist(), batch["sample_id"].tolist())))
    replay = Mixture(NAMES, [n for n, _ in DOMAINS.values()], 4, 3, True, proportions=ds.initial_proportions)
    for s, p in updates.items():
        replay.schedule(s, p)
    expected = [list(zip(*(x.tolist() for x in replay.rank_slots(replay.next_batch(), 0, 1)))) for _ in got]
    assert got == expected


def test_reader_threads_read_the_same_rows_and_share_descriptors_safely(root, monkeypatch):
    import shearing.data.shards as shards

    monkeypatch.setattr(shards, "_FD_CACHE", 1)  # evict on nearly every read, while other threads read
    inline = DomainMixtureDataset(root / "train", 16, rank=0, world_size=1, seed=3)
    threaded = DomainMixtureDataset(root / "train", 16, rank=0, world_size=1, seed=3, read_threads=4)
    a, b = iter(inline), iter(threaded)
    for _ in range(16 * 40):
        x, y = next(a), next(b)
        assert torch.equal(x["input_ids"], y["input_ids"]) and int(x["sample_id"]) == int(y["sample_id"])
    for shard in threaded.shards:
        assert not shard._in_use and not shard._closing and len(shard._fds) <= 1
    with pytest.raises(ValueError, match="read_threads"):
        DomainMixtureDataset(root / "train", 2, rank=0, world_size=1, read_threads=-1)
    with pytest.raises(ValueError, match="remove update_lag"):
        build_domain_mixture_dataloader(None, 2, {"local": root / "train", "update_lag": 4})


def test_labels_get_their_own_storage_before_use(root):
    (spec,) = mixture_loaders(root, 1, 2)
    raw = next(iter(spec.dataloader))
    assert raw["labels"].data_ptr() == raw["input_ids"].data_ptr()  # stacked once
    batch = spec.batch_transforms(raw)
    assert torch.equal(batch["labels"], batch["input_ids"])
    batch["labels"][0, 0] = -100
    assert int(batch["input_ids"][0, 0]) != -100


def test_new_epochs_are_logged(root, caplog):
    (spec,) = mixture_loaders(root, 1, 0)
    it = iter(spec.dataloader)
    with caplog.at_level(logging.INFO, logger="shearing.data.dataloader"):
        for _ in range(30):
            next(it)
    assert "'wiki' ran out of samples" in caplog.text and "starting its epoch 1" in caplog.text


@pytest.mark.parametrize("workers", [0, 2])
def test_state_dict_resume_continues_exactly(root, workers):
    updates = {10: [0.2, 0.2, 0.6], 28: [0.6, 0.3, 0.1], 40: [0.1, 0.8, 0.1]}
    full = run(mixture_loaders(root, 2, workers), 60, updates)

    first = mixture_loaders(root, 2, workers)
    head = run(first, 30, updates)
    states = [spec.dataloader.dataset.state_dict(num_samples=30 * 8, from_beginning=True) for spec in first]
    assert states[0] == states[1]
    saved = json.loads(json.dumps(states[0]))
    assert saved["mixture"]["step"] == 30
    # the update published after step 28 took effect at batch 28: in effect, nothing pending
    assert saved["mixture"]["pending"] == [] and saved["mixture"]["proportions"] == [0.6, 0.3, 0.1]

    second = mixture_loaders(root, 2, workers)
    for spec in second:
        spec.dataloader.dataset.load_state_dict(saved)
    tail = run(second, 30, updates, start=30)
    assert head + tail == full


def test_resume_refuses_a_different_configuration(root):
    state = mixture_loaders(root, 1, 0)[0].dataloader.dataset.state_dict(0)
    other = mixture_loaders(root, 1, 0, seed=4)[0].dataloader.dataset
    with pytest.raises(ValueError, match="seed"):
        other.load_state_dict(state)
    with pytest.raises(ValueError, match="whole number of global batches"):
        other.state_dict(3)


def test_worker_processes_and_late_updates_are_refused(root, monkeypatch):
    import shearing.data.dataloader as module

    ds = DomainMixtureDataset(root / "train", 2, rank=0, world_size=1)
    # As seen from inside worker 0 of 2 (a real failing worker pool takes 10 s to shut down).
    monkeypatch.setattr(module, "get_worker_info", lambda: SimpleNamespace(id=0, num_workers=2))
    with pytest.raises(ValueError, match="builds its batches in the main process"):
        next(iter(ds))
    monkeypatch.undo()
    stream = iter(ds)
    for _ in range(3 * 2):  # batches 0, 1 and 2
        next(stream)
    ds.set_proportions([0.2, 0.2, 0.6], after_step=3)  # in time: batch 3 is not asked for yet
    for _ in range(2):  # batch 3
        next(stream)
    ds.set_proportions([0.2, 0.2, 0.6], after_step=3)  # late: batch 3 is already composed
    with pytest.raises(ValueError, match="already composed"):
        next(stream)
    with pytest.raises(ValueError, match="step order"):
        ds.set_proportions([0.2, 0.2, 0.6], after_step=2)


def test_default_proportions_come_from_the_manifest(root):
    ds = DomainMixtureDataset(root / "train", 2, rank=0, world_size=1)
    sizes = np.asarray([n for n, _ in DOMAINS.values()], dtype=float)
    assert np.allclose(ds.proportions, sizes / sizes.sum()) and ds.domains == NAMES
    sub = DomainMixtureDataset(root, 2, domains=["wiki", "cc"], rank=0, world_size=1)  # DATA_DIR works too
    assert sub.domains == ["wiki", "cc"] and np.allclose(sub.proportions, [12 / 52, 40 / 52])
    given = DomainMixtureDataset(
        root / "train", 2, proportions={"cc": 0.5, "code": 0.5, "wiki": 0.0}, rank=0, world_size=1
    )
    stream = iter(given)
    assert {int(next(stream)["domain_idx"]) for _ in range(40)} == {0, 1}


def test_a_given_manifest_is_not_read_again(root, monkeypatch):
    import shearing.data.shards as shards

    def eval_ids(**dataset):
        spec = build_domain_eval_dataloader(
            None, 3, {"local": root / "eval", "rank": 0, "world_size": 1, **dataset}
        )
        return [batch["sample_id"].tolist() for batch in spec.dataloader]

    manifest = load_manifest(root)
    train, evaluated = run(mixture_loaders(root, 2, 0), 20, UPDATES), eval_ids()

    def refuse(path):
        raise AssertionError(f"manifest.json read again at {path}")

    monkeypatch.setattr(shards, "load_manifest", refuse)
    assert run(mixture_loaders(root, 2, 0, manifest=manifest), 20, UPDATES) == train
    assert eval_ids(manifest=manifest) == evaluated


@pytest.mark.parametrize("cls", [DomainMixtureDataset, DomainEvalDataset])
def test_not_yaml_keys_are_constructor_arguments(cls):
    """``NOT_YAML_KEYS`` (what the builder or the run fills in) are arguments validation must not accept."""
    assert set(cls.NOT_YAML_KEYS) <= set(inspect.signature(cls).parameters)
    assert {"device_batch_size", "manifest"} <= set(cls.NOT_YAML_KEYS)


def _copy(root, tmp_path):
    return shutil.copytree(root, tmp_path / "copy")


def _rewrite_manifest(root, **changes):
    manifest = load_manifest(root)
    for key, value in changes.items():
        setattr(manifest, key, value)
    save_manifest(manifest, root)


@pytest.mark.parametrize(
    "breakage,message",
    [
        ("missing", "does not exist"),
        ("no_index", "no index.json"),
        ("empty", "holds no samples"),
        ("dtype", "stores tokens as 'ndarray:uint16' but the manifest says dtype uint32"),
        ("seq_len", "seq_len 20"),
        ("truncated", "corrupt: index.json says"),
        ("header", r"corrupt: index.json says \d+ samples, the file header says 11"),
        ("count", "out of sync"),
        ("unknown_domain", "not in the manifest"),
        ("remote", "local shards only"),
    ],
)
def test_bad_data_is_refused_up_front(root, tmp_path, breakage, message):
    data = _copy(root, tmp_path)
    dataset: dict = {"local": data / "train", "rank": 0, "world_size": 1}
    wiki = data / "train" / "wiki"
    if breakage == "missing":
        shutil.rmtree(wiki)
    elif breakage == "no_index":
        (wiki / "index.json").unlink()
    elif breakage == "empty":
        (wiki / "index.json").write_text(json.dumps({"version": 2, "shards": []}))
    elif breakage in ("dtype", "seq_len"):
        _rewrite_manifest(data, **({"dtype": "uint32"} if breakage == "dtype" else {"seq_len": 20}))
    elif breakage == "truncated":
        path = shard_files(wiki)[0]
        path.write_bytes(path.read_bytes()[:-10])
    elif breakage == "header":
        path = shard_files(wiki)[0]
        raw = bytearray(path.read_bytes())
        raw[0:4] = np.uint32(11).tobytes()
        path.write_bytes(bytes(raw))
    elif breakage == "count":
        manifest = load_manifest(data)
        manifest.domains["wiki"].train.sequences += 1
        save_manifest(manifest, data)
    elif breakage == "unknown_domain":
        dataset["domains"] = ["cc", "books"]
    elif breakage == "remote":
        dataset["remote"] = "s3://bucket/train"
    with pytest.raises(ValueError, match=message):
        build_domain_mixture_dataloader(None, 2, dataset)


@pytest.mark.parametrize(
    "proportions,message",
    [([0.5, 0.6, -0.1], ">= 0"), ([0.5, 0.5], "one proportion per domain"), ([0.5, 0.3, 0.1], "sum to")],
)
def test_bad_proportions_are_refused(root, proportions, message):
    with pytest.raises(ValueError, match=message):
        build_domain_mixture_dataloader(None, 2, {"local": root / "train", "proportions": proportions})


@pytest.mark.parametrize("world,workers,cap", [(1, 0, None), (2, 0, 4), (2, 2, None), (3, 2, 2)])
def test_eval_loader_reads_every_sequence_once(root, world, workers, cap):
    specs = [
        build_domain_eval_dataloader(
            None,
            3,
            {"local": root / "eval", "rank": r, "world_size": world, "max_seqs_per_domain": cap},
            num_workers=workers,
        )
        for r in range(world)
    ]
    seen, tokens, real_rows = [], 0, 0
    lengths, rows = set(), set()
    for spec in specs:
        batches = list(spec.dataloader)
        lengths.add(len(batches))
        rows.add(sum(len(b["domain_idx"]) for b in batches))
        assert len(batches) == len(spec.dataloader)
        order = []
        for batch in batches:
            real = batch["domain_idx"] >= 0
            pad = ~real
            assert torch.all(batch["labels"][pad] == -100) and torch.all(batch["sample_id"][pad] == -1)
            pairs = list(zip(batch["domain_idx"][real].tolist(), batch["sample_id"][real].tolist()))
            assert decode(batch["input_ids"][real]) == pairs
            order += [d for d, _ in pairs]
            seen += pairs
            tokens += spec.get_num_tokens_in_batch(batch)
            real_rows += spec.get_num_samples_in_batch(batch)
        assert order == sorted(order)  # domain by domain, in a fixed order
    assert len(lengths) == 1 and len(rows) == 1  # every rank runs the same batches (pads fill the gap)
    expected = [(d, i) for d, (_, n) in enumerate(DOMAINS.values()) for i in range(min(n, cap or n))]
    assert sorted(seen) == expected  # each sequence exactly once, across ranks and workers
    assert real_rows == len(expected) and tokens == len(expected) * SEQ_LEN


def test_eval_loader_refuses_drop_last(root):
    with pytest.raises(ValueError, match="drop_last"):
        build_domain_eval_dataloader(None, 2, {"local": root / "eval"}, drop_last=True)
    assert DomainEvalDataset(root / "eval", 2, rank=0, world_size=1).domains == NAMES
