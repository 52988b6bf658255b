"""Checkpoints load with ``weights_only=True`` (``shearing.checkpoints.load_checkpoint_file``): a real run's
Composer checkpoints load for the export and the run-metadata check with exactly the documented allow-list,
each entry of which is needed; a crafted pickle that would run a command or write a file is refused naming
the file and the global, and nothing of it runs; ``SHEARING_TRUSTED_GLOBALS`` admits what a user vouches for."""

import fractions
import os
import subprocess
import sys
import warnings

import pytest
import torch

from shearing import checkpoints
from shearing.checkpoints import (
    COMPOSER_CHECKPOINT_GLOBALS,
    TRUSTED_GLOBALS_ENV,
    UntrustedCheckpointError,
    load_checkpoint_file,
)


class RunsCommand:
    """Unpickling it calls ``os.system(command)``."""

    def __init__(self, command):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class WritesFile:
    """Unpickling it calls ``exec`` on code that writes ``path``."""

    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return exec, (f"open({self.path!r}, 'w').write('pwned')",)


@pytest.fixture
def real_checkpoint(pruned_run):
    """A real Composer 0.32.1 checkpoint of a shearing pruning run (prune_tiny, 300 steps)."""
    _, run_dir = pruned_run
    return run_dir / "ep0-ba300-rank0.pt"


@pytest.fixture
def weights_only_loads(monkeypatch):
    """Every ``torch.load`` call's ``weights_only``, recorded."""
    seen, load = [], torch.load

    def spy(*args, **kwargs):
        seen.append(kwargs.get("weights_only"))
        return load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    return seen


def evil_checkpoint(path, payload):
    """A file shaped like a Composer checkpoint (zip archive, state.model) that carries ``payload``."""
    model = {"model.embed_tokens.weight": torch.zeros(2, 2), "_extra_state": {"hf_config": {}}}
    torch.save({"state": {"model": model, "timestamp": {}, "callbacks": {"X": payload}}, "rng": []}, path)
    return path


def test_real_checkpoint_loads_with_weights_only_and_the_allow_list(real_checkpoint, weights_only_loads):
    before = set(map(repr, torch.serialization.get_safe_globals()))
    raw = load_checkpoint_file(real_checkpoint)
    assert weights_only_loads == [True]
    assert raw["state"]["timestamp"]["Timestamp"]["batch"] == 300
    assert "hf_config" in raw["state"]["model"]["_extra_state"]
    assert set(map(repr, torch.serialization.get_safe_globals())) == before  # scoped to the load
    assert set(torch.serialization.get_unsafe_globals_in_checkpoint(real_checkpoint)) <= set(
        COMPOSER_CHECKPOINT_GLOBALS
    )


@pytest.mark.parametrize(
    "name", sorted(set(COMPOSER_CHECKPOINT_GLOBALS) - {"numpy.core.multiarray._reconstruct"})
)
def test_every_allowed_global_is_needed(real_checkpoint, monkeypatch, name):
    """The allow-list is minimal: without any one entry a real checkpoint is refused, naming that entry.
    (numpy.core.multiarray._reconstruct is the same function under numpy < 2's name.)"""
    fewer = {k: v for k, v in COMPOSER_CHECKPOINT_GLOBALS.items() if k != name}
    monkeypatch.setattr(checkpoints, "COMPOSER_CHECKPOINT_GLOBALS", fewer)
    with pytest.raises(UntrustedCheckpointError) as refused:
        load_checkpoint_file(real_checkpoint)
    assert f"needs {name}," in str(refused.value)


def test_export_and_run_metadata_read_real_checkpoints_with_weights_only(pruned_run, weights_only_loads):
    from shearing.composer.run_folder import record_from_checkpoint
    from shearing.export.hf import read_checkpoint

    _, run_dir = pruned_run
    model_state, step, tokens, file = read_checkpoint(run_dir)
    assert (step, file.name) == (300, "ep0-ba300-rank0.pt") and tokens > 0
    assert "l0.hidden.z_loga" in model_state or any(k.startswith("l0.") for k in model_state)
    record = record_from_checkpoint(run_dir)
    assert record["target"] is not None and record["families"]
    assert weights_only_loads == [True, True]


@pytest.mark.parametrize("kind", ["command", "file"])
def test_crafted_checkpoint_is_refused_by_the_export_and_runs_nothing(tmp_path, kind):
    marker = tmp_path / "pwned"
    payload = RunsCommand(f"touch {marker}") if kind == "command" else WritesFile(marker)
    global_name = "posix.system" if kind == "command" else "builtins.exec"
    run = tmp_path / "downloaded_run"
    run.mkdir()
    evil = evil_checkpoint(run / "ep0-ba10-rank0.pt", payload)
    os.symlink(evil.name, run / "latest-rank0.pt")
    out = tmp_path / "out"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "shearing.export",
            "--checkpoint",
            str(run),
            "--output",
            str(out),
            "--no-data",
        ],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2, done.stderr
    # Before: torch.load(weights_only=False) ran the payload (the marker was written), then failed later.
    assert not marker.exists()
    assert not out.exists()
    error = done.stderr
    assert f"checkpoint {evil} was refused" in error and f"needs {global_name}," in error
    assert "Only load checkpoints you made" in error
    assert f"{TRUSTED_GLOBALS_ENV}={global_name}" in error


def test_crafted_latest_checkpoint_is_refused_by_the_run_metadata_check(tmp_path):
    """A run folder without shearing_run.json: its latest checkpoint's metadata is read, never executed."""
    from shearing.composer.run_folder import record_from_checkpoint

    marker = tmp_path / "pwned"
    evil = evil_checkpoint(tmp_path / "ep0-ba10-rank0.pt", RunsCommand(f"touch {marker}"))
    os.symlink(evil.name, tmp_path / "latest-rank0.pt")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert record_from_checkpoint(tmp_path) is None  # reported as unreadable metadata
    assert not marker.exists()


def test_a_user_can_allow_the_names_the_refusal_prints(tmp_path, monkeypatch):
    path = tmp_path / "mine.pt"
    torch.save({"state": {"model": {}, "ratio": fractions.Fraction(1, 3)}}, path)
    with pytest.raises(UntrustedCheckpointError, match=f"{TRUSTED_GLOBALS_ENV}=fractions.Fraction$"):
        load_checkpoint_file(path)
    monkeypatch.setenv(TRUSTED_GLOBALS_ENV, "fractions.Fraction")
    assert load_checkpoint_file(path)["state"]["ratio"] == fractions.Fraction(1, 3)
    monkeypatch.setenv(TRUSTED_GLOBALS_ENV, "fractions.NoSuchThing")
    with pytest.raises(
        ValueError, match=f"{TRUSTED_GLOBALS_ENV}: 'fractions.NoSuchThing' is not an importable"
    ):
        load_checkpoint_file(path)


def test_a_pickle_the_safe_loader_cannot_read_is_refused_without_running(tmp_path):
    """Pickle protocol 4 (not torch.save's): no global can be named statically, still nothing runs."""
    marker = tmp_path / "pwned"
    path = tmp_path / "p4.pt"
    torch.save({"x": RunsCommand(f"touch {marker}")}, path, pickle_protocol=4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch warns about the protocol
        with pytest.raises(UntrustedCheckpointError, match=r"p4\.pt cannot be loaded without running code"):
            load_checkpoint_file(path)
    assert not marker.exists()
