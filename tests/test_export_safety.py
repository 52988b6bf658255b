"""Export output safety on a real tiny run: never replace a run folder, a checkpoint or foreign files; only a
previous export is replaced; leftovers of killed exports are cleaned; outputs follow the umask; a corrupt
latest checkpoint falls back to the previous readable one."""

import json
import os
import shutil
import stat
import subprocess
import sys
import warnings

import pytest

from shearing.export import hf as export_mod
from shearing.io import write_json_atomic
from shearing.train import train_from_yaml


@pytest.fixture
def run_copy(pruned_run, tmp_path):
    """A private copy of the converged run's folder (its checkpoint, metrics and history), safe to damage."""
    _, run_dir = pruned_run
    copy = tmp_path / "run"
    copy.mkdir()
    for name in ("ep0-ba300-rank0.pt", "metrics.jsonl", "dynamic_loading.json"):
        shutil.copy2(run_dir / name, copy / name)
    os.symlink("ep0-ba300-rank0.pt", copy / "latest-rank0.pt")
    return copy


def listing(folder):
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def cli(*args):
    cmd = [sys.executable, "-m", "shearing.export", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_output_that_is_the_run_folder_is_refused_even_with_overwrite(run_copy):
    before = listing(run_copy)
    done = cli("--checkpoint", run_copy, "--output", run_copy, "--overwrite")
    assert done.returncode == 2, done.stdout
    assert "is the run folder" in done.stderr and "would delete" in done.stderr
    assert listing(run_copy) == before


def test_output_that_contains_the_run_folder_is_refused(run_copy):
    parent = run_copy.parent
    before = listing(parent)
    done = cli("--checkpoint", run_copy / "ep0-ba300-rank0.pt", "--output", parent, "--overwrite")
    assert done.returncode == 2
    assert "contains the" in done.stderr
    assert listing(parent) == before


def test_export_folder_equal_to_save_folder_fails_before_training(tiny_gqa_dir, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = [
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        f"variables.save_folder={run_dir}",
        "max_duration=2ba",
        "export.on_fit_end=true",
        f"export.folder={run_dir}",
    ]
    with pytest.raises(ValueError, match="is the run folder"):
        train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)
    assert not list(run_dir.glob("*.pt"))  # refused before any training


def test_non_empty_folder_that_is_not_an_export_is_refused_even_with_overwrite(run_copy, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "notes.txt").write_text("keep me")
    (out / "data").mkdir()
    done = cli("--checkpoint", run_copy, "--output", out, "--overwrite")
    assert done.returncode == 2
    assert "not a previous shearing export" in done.stderr and "data, notes.txt" in done.stderr
    assert (out / "notes.txt").read_text() == "keep me"


def test_previous_export_holding_a_checkpoint_is_refused(run_copy, tmp_path):
    out = tmp_path / "hf"
    assert cli("--checkpoint", run_copy, "--output", out).returncode == 0
    shutil.copy2(run_copy / "ep0-ba300-rank0.pt", out / "ep0-ba300-rank0.pt")
    done = cli("--checkpoint", run_copy, "--output", out, "--overwrite")
    assert done.returncode == 2 and "ep0-ba300-rank0.pt" in done.stderr
    assert (out / "ep0-ba300-rank0.pt").is_file()


def test_previous_export_is_replaced_with_overwrite_only(run_copy, tmp_path):
    out = tmp_path / "hf"
    assert cli("--checkpoint", run_copy, "--output", out).returncode == 0
    again = cli("--checkpoint", run_copy, "--output", out)
    assert again.returncode == 2 and "--overwrite" in again.stderr
    (out / "stale.txt").write_text("from the previous export")
    done = cli("--checkpoint", run_copy, "--output", out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert not (out / "stale.txt").exists() and (out / export_mod.SUMMARY_NAME).is_file()


def test_leftovers_of_killed_exports_are_removed(run_copy, tmp_path):
    out = tmp_path / "hf"
    dead = 2**22 + 12345  # above the default pid_max: no such process
    leftovers = [
        tmp_path / f".hf.tmp-{dead}-abc123",
        tmp_path / f".hf.old-{dead}",
        tmp_path / ".hf.tmp-x1y2z3",
    ]
    for path in leftovers:
        path.mkdir()
        (path / "model.safetensors").write_bytes(b"half written")
    running = tmp_path / f".hf.tmp-{os.getppid()}-live"  # an export in progress in a live process
    running.mkdir()
    unrelated = tmp_path / ".other.tmp-1"
    unrelated.mkdir()
    assert cli("--checkpoint", run_copy, "--output", out).returncode == 0
    assert not any(path.exists() for path in leftovers)
    assert running.is_dir() and unrelated.is_dir()


@pytest.mark.parametrize("umask,dir_mode,file_mode", [(0o022, 0o755, 0o644), (0o027, 0o750, 0o640)])
def test_outputs_follow_the_umask(run_copy, tmp_path, umask, dir_mode, file_mode):
    old = os.umask(umask)
    try:
        state = export_mod.load_model_state(run_copy)
        out = tmp_path / "hf"
        export_mod.export_model_state(state, out)
        json_file = write_json_atomic(tmp_path / "records" / "results.json", {"a": 1})
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == dir_mode
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) >= 4  # config, weights, tokenizer, summary
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in files} == {p.name: file_mode for p in files}
    assert stat.S_IMODE(json_file.stat().st_mode) == file_mode


def test_corrupt_latest_checkpoint_falls_back_to_the_previous_readable_one(run_copy, tmp_path):
    shutil.copy2(run_copy / "ep0-ba300-rank0.pt", run_copy / "ep0-ba200-rank0.pt")
    latest = run_copy / "ep0-ba400-rank0.pt"
    data = (run_copy / "ep0-ba300-rank0.pt").read_bytes()
    latest.write_bytes(data[: len(data) // 2])  # a write cut short
    (run_copy / "latest-rank0.pt").unlink()
    os.symlink(latest.name, run_copy / "latest-rank0.pt")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        found = export_mod.find_checkpoint(run_copy)
    assert found.name == "ep0-ba300-rank0.pt"
    message = " ".join(str(w.message) for w in caught)
    assert "ep0-ba400-rank0.pt" in message and "ep0-ba300-rank0.pt" in message
    done = cli("--checkpoint", run_copy, "--output", tmp_path / "hf")
    assert done.returncode == 0, done.stderr
    assert "ep0-ba400-rank0.pt is corrupt" in done.stderr
    assert json.loads((tmp_path / "hf" / export_mod.SUMMARY_NAME).read_text())["checkpoint_batch"] == 300


def test_corrupt_checkpoint_given_explicitly_is_an_error_naming_it(run_copy, tmp_path):
    bad = run_copy / "ep0-ba400-rank0.pt"
    data = (run_copy / "ep0-ba300-rank0.pt").read_bytes()
    bad.write_bytes(data[: len(data) // 2])
    done = cli("--checkpoint", bad, "--output", tmp_path / "hf")
    assert done.returncode == 2
    assert str(bad) in done.stderr and "corrupt or truncated" in done.stderr
