"""A shard whose bytes changed after data preparation is refused when read, naming the shard and sample.

Issue: a byte-corrupted train shard failed mid-training as ``IndexError: index out of range in self``
(a device-side assert on a GPU). The loaders now check every sample they read against the manifest's
``max_token_id`` (``shearing.data.shards``) and say how to redo the domain.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from tiny import SEQ_LEN, run_overrides

from shearing.data.dataloader import DomainEvalDataset, DomainMixtureDataset
from shearing.data.manifest import load_manifest
from shearing.data.prep import PrepConfig, prepare


def _shard(data: Path, split: str, domain: str, k: int = 0) -> Path:
    index = json.loads((data / split / domain / "index.json").read_text())
    return data / split / domain / index["shards"][k]["raw_data"]["basename"]


def _corrupt(shard: Path, samples: list[int], value: int = 0xFFFF) -> None:
    """Overwrite three token ids in each of ``samples`` (uint16 single-column MDS shard) with ``value``."""
    n = int(np.fromfile(shard, dtype=np.uint32, count=1)[0])
    offsets = np.fromfile(shard, dtype=np.uint32, count=n + 2)[1:].astype(np.int64)
    with open(shard, "r+b") as f:
        for sample in samples:
            f.seek(int(offsets[sample + 1]) - SEQ_LEN * 2 + 2 * 5)  # token values end each sample
            f.write(np.full(3, value, dtype=np.uint16).tobytes())


@pytest.fixture
def data(tiny_data, tmp_path) -> Path:
    """A private copy of the tiny prepared data (the session fixture stays intact)."""
    return Path(shutil.copytree(tiny_data, tmp_path / "data"))


def test_loaders_name_the_corrupt_shard_and_sample(data: Path) -> None:
    train_shard, eval_shard = _shard(data, "train", "code"), _shard(data, "eval", "docs")
    _corrupt(train_shard, [3])
    _corrupt(eval_shard, [1])
    highest = load_manifest(data).max_token_id

    train = DomainMixtureDataset(data / "train", device_batch_size=8, shuffle=False, rank=0, world_size=1)
    with pytest.raises(ValueError) as err:
        for _ in itertools.islice(train, 400):
            pass
    message = str(err.value)
    assert f"sample 3 of shard {train_shard} (sample 3 of {data / 'train' / 'code'})" in message
    assert f"token id 65535 at position 5 (3 ids in this sample are above {highest}" in message
    assert (
        "the shard is corrupt: its xxh3_64 no longer matches index.json, its bytes changed after" in message
    )
    assert f"delete {data / '.prep' / 'done' / 'code.json'} and run data_prep/tokenize_domains.py" in message

    evaluation = DomainEvalDataset(data / "eval", device_batch_size=4, rank=0, world_size=1)
    with pytest.raises(ValueError, match=rf"sample 1 of shard {eval_shard} .* token id 65535"):
        list(evaluation)


def test_redoing_the_domain_as_the_message_says_restores_it(
    data: Path, tiny_data, raw_corpus, tokenizer_dir
) -> None:
    shard = _shard(data, "train", "code")
    intact = hashlib.sha256(shard.read_bytes()).hexdigest()
    _corrupt(shard, [0, 7])
    (data / ".prep" / "done" / "code.json").unlink()
    config = PrepConfig(raw_corpus, str(tokenizer_dir), data, seq_len=SEQ_LEN, eval_seqs=16, progress=False)
    prepare(config)
    assert hashlib.sha256(shard.read_bytes()).hexdigest() == intact
    assert load_manifest(data).to_dict() == load_manifest(tiny_data).to_dict()
    train = DomainMixtureDataset(data / "train", device_batch_size=8, shuffle=False, rank=0, world_size=1)
    assert len(list(itertools.islice(train, 400))) == 400


def test_training_stops_at_the_corrupt_sample_not_in_the_embedding(
    data: Path, tiny_gqa_dir, tmp_path
) -> None:
    """Every sample of the code domain's train shard is corrupt: the first batch is refused by the loader
    with the shard named (old code: IndexError from the embedding in the first forward)."""
    from shearing.train import train_from_yaml

    shard = _shard(data, "train", "code")
    count = int(np.fromfile(shard, dtype=np.uint32, count=1)[0])
    _corrupt(shard, list(range(count)))
    overrides = run_overrides(tiny_gqa_dir, data, tmp_path / "run", "variables.max_duration=2ba")
    with pytest.raises(ValueError, match=rf"of shard {shard} .* holds token id 65535"):
        train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)
