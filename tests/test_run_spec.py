"""The run spec is resolved once: one prune run builds its pruning plan once, reads the source's config.json
once and each data manifest once, and the yaml's config is not changed by the run."""

from __future__ import annotations

import builtins
import copy
import dataclasses
import io
from collections import Counter
from pathlib import Path

import pytest
from tiny import run_overrides

from shearing.composer.run_folder import RECORD_NAME
from shearing.data.manifest import MANIFEST_NAME
from shearing.pruning.plan import PruningPlan

YAML = "yamls/testing/prune_tiny.yaml"


def test_one_prune_run_reads_each_input_once(tiny_gqa_dir, tiny_data, tmp_path, monkeypatch):
    import shearing.train
    from shearing.config import load_config

    counts: Counter[str] = Counter()
    watched = {
        str(Path(tiny_gqa_dir) / "config.json"): "source config.json",
        str(Path(tiny_data) / MANIFEST_NAME): "manifest.json",
    }
    real_open = builtins.open

    def counting_open(file, *args, **kwargs):
        name = watched.get(str(file))
        if name is not None:
            counts[name] += 1
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", counting_open)
    monkeypatch.setattr(io, "open", counting_open)  # pathlib's read_text opens through io.open
    build = PruningPlan.build.__func__

    def counting_build(cls, *args, **kwargs):
        counts["plan"] += 1
        return build(cls, *args, **kwargs)

    monkeypatch.setattr(PruningPlan, "build", classmethod(counting_build))
    built: list = []
    load = load_config

    def keeping_load_config(*args, **kwargs):
        built.append(load(*args, **kwargs))
        return built[-1]

    monkeypatch.setattr(shearing.train, "load_config", keeping_load_config)
    overrides = run_overrides(
        tiny_gqa_dir,
        tiny_data,
        tmp_path / "run",
        "variables.max_duration=2ba",
        "variables.eval_interval=2ba",
        "variables.save_interval=2ba",
    )
    as_written = copy.deepcopy(load_config(YAML, overrides))
    counts.clear()
    trainer = shearing.train.train_from_yaml(YAML, overrides)
    assert int(trainer.state.timestamp.batch) == 2
    # dynamic loading with reference_losses: source ran, the run record was written and checked
    assert (tmp_path / "run" / RECORD_NAME).is_file()
    assert counts == {"plan": 1, "source config.json": 1, "manifest.json": 1}, counts
    # The source's losses went to the callback, not into the config: the yaml's values are what the run has.
    assert dataclasses.asdict(built[0]) == dataclasses.asdict(as_written)
    assert built[0].callbacks["dynamic_loading"]["reference_losses"] == "source"


@pytest.mark.parametrize("field", ["source", "plan", "train_domains"])
def test_the_spec_is_frozen(field, tiny_gqa_dir, tiny_data, tmp_path):
    from shearing.config import load_config
    from shearing.spec import resolve_run

    spec = resolve_run(load_config(YAML, run_overrides(tiny_gqa_dir, tiny_data, tmp_path / "run")))
    assert spec.train_domains == spec.eval_domains == ("code", "docs")
    assert spec.plan is not None and spec.plan.source == spec.source
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(spec, field, None)
