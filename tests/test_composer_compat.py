"""shearing.composer.compat workaround 2: a torch newer than the tested profiles is said once, on rank 0, at
training start (a warning and a log line naming the tested versions); tested or older versions are silent.
The tested versions are the lock files' torch pins. (Workaround 1 is tested in tests/test_multinode.py.)"""

import logging
import re
import warnings
from pathlib import Path

import pytest
import torch

from shearing.composer import compat as composer_compat

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def fresh(monkeypatch):
    """No warning given yet in this process (the flag is per process)."""
    monkeypatch.setattr(composer_compat, "_torch_warned", False)


def test_a_newer_torch_warns_once_naming_the_tested_versions(fresh, monkeypatch, caplog):
    monkeypatch.setattr(torch, "__version__", "2.12.0+cu130")
    with caplog.at_level(logging.WARNING, logger="shearing.composer.compat"):
        with pytest.warns(UserWarning, match=r"torch 2\.12\.0\+cu130 is newer") as warned:
            message = composer_compat.warn_if_torch_untested()
    assert len(warned) == 1 and str(warned[0].message) == message
    assert "torch 2.7.0 (Python 3.11) and torch 2.11.0 (Python 3.12)" in message
    assert [r.getMessage() for r in caplog.records] == [message]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a second call (or a second yaml in the process) is silent
        assert composer_compat.warn_if_torch_untested() is None


@pytest.mark.parametrize("version", ["2.7.0+cu126", "2.11.0", "2.11.0+cpu", "2.9.1", "2.6.0"])
def test_a_tested_or_older_torch_is_silent(fresh, monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert composer_compat.warn_if_torch_untested() is None


@pytest.mark.parametrize("version", ["2.11.1", "2.12.0.dev20260101", "3.0.0"])
def test_anything_past_the_newest_tested_release_warns(fresh, monkeypatch, version):
    monkeypatch.setattr(torch, "__version__", version)
    with pytest.warns(UserWarning, match="is newer than the versions shearing is tested with"):
        composer_compat.warn_if_torch_untested()


def test_only_global_rank_zero_warns(fresh, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.12.0")
    monkeypatch.setattr(composer_compat.dist, "get_global_rank", lambda: 1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert composer_compat.warn_if_torch_untested() is None


def test_training_start_warns(fresh, monkeypatch, tmp_path):
    """train_from_yaml says it first, before the yaml is even read."""
    from shearing.train import train_from_yaml

    monkeypatch.setattr(torch, "__version__", "2.12.0")
    with pytest.warns(UserWarning, match="newer than the versions shearing is tested with"):
        with pytest.raises(FileNotFoundError):
            train_from_yaml(tmp_path / "missing.yaml")


def test_tested_versions_are_the_lock_files_torch_pins():
    locks = sorted((ROOT / "locks").glob("py3*-torch*.txt"))
    assert locks, "locks/ holds no profile lock files"
    pinned = {}
    for lock in locks:
        version = re.search(r"^torch==(\S+)", lock.read_text(), re.M).group(1)
        python = re.match(r"py3(\d+)-", lock.name).group(1)
        pinned[version] = f"3.{python}"
    assert pinned == composer_compat.TESTED_TORCH
