"""One run per save_folder (lock, released by the kernel even on SIGKILL; O_EXCL fallback without flock),
and a resume that would change the source/target/families is refused before the model loads."""

import errno
import json
import os
import re
import signal
import socket
import subprocess
import sys

import pytest
from tiny import hold_lock, run_overrides

import shearing.train
from shearing.train import train_from_yaml

YAML = "yamls/testing/prune_tiny.yaml"
TARGET_112 = (
    "variables.target_model={hidden_size: 48, num_hidden_layers: 3, num_attention_heads: 4, "
    "num_key_value_heads: 2, intermediate_size: 112}"
)


def overrides(tiny_gqa_dir, tiny_data, run_dir, *extra):
    return run_overrides(
        tiny_gqa_dir,
        tiny_data,
        run_dir,
        "variables.reference_losses={code: 3.0, docs: 3.0}",  # skip the source-model eval pass
        "max_duration=2ba",
        "save_interval=2ba",
        "eval_interval=100ba",
        *extra,
    )


def forbid_model_loading(monkeypatch):
    def build_model(cfg):
        raise AssertionError("the model was loaded before the save_folder check")

    monkeypatch.setattr(shearing.train, "build_model", build_model)


def test_second_run_is_refused_while_another_holds_the_folder(tmp_path, tiny_gqa_dir, tiny_data, monkeypatch):
    run_dir = tmp_path / "run"
    holder = hold_lock(run_dir)
    try:
        with monkeypatch.context() as patch:
            forbid_model_loading(patch)
            with pytest.raises(
                RuntimeError, match=rf"in use by another run \(host testhost, pid {holder.pid}, since"
            ):
                train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir))
    finally:
        holder.send_signal(signal.SIGKILL)  # the kernel drops its flock
        holder.wait()
    trainer = train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir))
    assert int(trainer.state.timestamp.batch) == 2
    assert (run_dir / "ep0-ba2-rank0.pt").exists()
    assert (run_dir / ".shearing.lock").read_text() == ""  # released (emptied) at the end


def test_without_flock_an_owner_file_is_used_and_a_dead_owner_is_taken_over(tmp_path, monkeypatch):
    import fcntl

    from shearing.composer.run_folder import OWNER_NAME, SaveFolderLock

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    owner = tmp_path / OWNER_NAME
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    host = socket.gethostname()
    owner.write_text(json.dumps({"host": host, "pid": sleeper.pid, "since": "earlier"}))
    with pytest.raises(
        RuntimeError, match=rf"in use by another run \(host {host}, pid {sleeper.pid}, since earlier"
    ):
        SaveFolderLock(tmp_path).acquire()
    sleeper.send_signal(signal.SIGKILL)
    sleeper.wait()
    with pytest.warns(UserWarning, match="stale lock"):
        lock = SaveFolderLock(tmp_path).acquire()
    assert json.loads(owner.read_text())["pid"] == os.getpid()
    with pytest.raises(RuntimeError, match="in use by another run"):  # held now, by this process
        SaveFolderLock(tmp_path).acquire()
    lock.release()
    assert not owner.exists()
    owner.write_text(json.dumps({"host": "elsewhere", "pid": 1, "since": "earlier"}))
    with pytest.raises(RuntimeError, match=f"if that run is gone, delete {owner}"):
        SaveFolderLock(tmp_path).acquire()


def test_resume_with_another_target_is_refused(tmp_path, tiny_gqa_dir, tiny_data, monkeypatch):
    run_dir = tmp_path / "run"
    train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir))
    record = json.loads((run_dir / "shearing_run.json").read_text())
    assert record["target"]["intermediate_size"] == 96 and record["families"] == [
        "hidden",
        "head",
        "intermediate",
        "layer",
    ]
    assert record["seed"] == 17 and record["max_seq_len"] == 64
    changed = overrides(tiny_gqa_dir, tiny_data, run_dir, TARGET_112, "max_duration=4ba")
    both = r"target: the run has \{[^}]*'intermediate_size': 96\}, the yaml \{[^}]*'intermediate_size': 112\}"
    with monkeypatch.context() as patch:
        forbid_model_loading(patch)
        with pytest.raises(ValueError, match=both + r".*shearing_run\.json"):
            train_from_yaml(YAML, changed)
        # a folder from before the record: the checkpoint's own metadata is compared
        (run_dir / "shearing_run.json").unlink()
        with pytest.raises(ValueError, match=both + r".*latest-rank0\.pt"):
            train_from_yaml(YAML, changed)
        (run_dir / "shearing_run.json").write_text(json.dumps(record))
        with pytest.raises(ValueError, match=r"seed: the run has 17, the yaml 18"):
            train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir, "variables.seed=18"))
        # another batch size changes what a step means; another domain list what domain_idx means
        with pytest.raises(ValueError, match=r"global_train_batch_size: the run has 8, the yaml 4"):
            train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir, "global_train_batch_size=4"))
        reordered = ("train_loader.dataset.domains=[docs, code]", "eval_loader.dataset.domains=[docs, code]")
        with pytest.raises(
            ValueError, match=r"train_domains: the run has \['code', 'docs'\], the yaml \['docs', 'code'\]"
        ):
            train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir, *reordered))
    # what may change (a longer max_duration) resumes
    trainer = train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir, "max_duration=3ba"))
    assert int(trainer.state.timestamp.batch) == 3
    assert json.loads((run_dir / "shearing_run.json").read_text()) == record


@pytest.mark.parametrize(
    ("call", "code", "says"),
    [
        ("open", errno.EROFS, "read-only file system on {lock}. Remount it read-write"),
        ("open", errno.EACCES, "permission denied on {lock}"),
        ("pwrite", errno.ENOSPC, "no space left on {lock} (disk full or quota). Free space there"),
    ],
)
def test_an_unwritable_save_folder_is_named_before_the_model_loads(
    tmp_path, tiny_gqa_dir, tiny_data, monkeypatch, call, code, says
):
    """Read-only storage, a folder of another user (root ignores chmod, so os.open is made to fail), a full
    disk (the lock records its holder with os.pwrite)."""
    run_dir = tmp_path / "run"
    lock = run_dir / ".shearing.lock"
    real = getattr(os, call)

    def refusing(*args, **kwargs):
        if call == "pwrite" or str(args[0]) == str(lock):
            raise OSError(code, os.strerror(code), str(lock))
        return real(*args, **kwargs)

    monkeypatch.setattr(os, call, refusing)
    forbid_model_loading(monkeypatch)
    expected = f"save_folder {run_dir} cannot be written: " + says.format(lock=lock)
    with pytest.raises(ValueError, match=re.escape(expected)):  # before: a raw OSError on .shearing.lock
        train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir))
    from shearing.checkpoints import unwritable_save_folder

    assert "variables.save_folder" in str(unwritable_save_folder(run_dir, OSError(code, "x")))


def test_a_save_folder_that_is_a_file_is_named_and_left_alone(tmp_path, tiny_gqa_dir, tiny_data, monkeypatch):
    forbid_model_loading(monkeypatch)
    blocker = tmp_path / "run"
    blocker.write_text("someone's notes")
    with pytest.raises(
        ValueError,
        match=rf"save_folder {re.escape(str(blocker))} cannot be written: it is a file, not a folder",
    ):
        train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, blocker))  # before: [Errno 17] File exists
    with pytest.raises(ValueError, match=rf"{re.escape(str(blocker))} is a file, not a folder"):
        train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, blocker / "run"))  # before: [Errno 20]
    assert blocker.read_text() == "someone's notes"


@pytest.mark.parametrize(
    ("text", "problem"),
    [('{"source": "/m", "seed": 1', "is not valid JSON"), ("", "is empty"), ("[1, 2]", "holds a list")],
)
def test_a_damaged_run_record_is_refused_never_rewritten(
    tmp_path, tiny_gqa_dir, tiny_data, monkeypatch, text, problem
):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    record = run_dir / "shearing_run.json"
    record.write_text(text)
    forbid_model_loading(monkeypatch)
    with pytest.raises(
        ValueError, match=rf"the run record {re.escape(str(record))} {problem}.*Restore it.*or delete it"
    ):
        train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir))  # before: silently rewritten
    assert record.read_text() == text
