"""Run-folder pre-flight: corrupt latest checkpoint falls back to the previous one; unwritable or full folders
fail with a clear error."""

import errno
import os
import warnings
import zipfile

import pytest
import torch

from shearing.checkpoints import check_save_folder, checkpoint_is_readable, recover_latest_checkpoint


def write_checkpoints(folder, batches):
    for batch in batches:
        torch.save(
            {"state": {"batch": batch, "weights": torch.randn(256)}}, folder / f"ep0-ba{batch}-rank0.pt"
        )
    os.symlink(f"ep0-ba{batches[-1]}-rank0.pt", folder / "latest-rank0.pt")


def test_truncated_latest_falls_back_to_the_previous_checkpoint(tmp_path):
    write_checkpoints(tmp_path, [10, 20, 30])
    latest = tmp_path / "ep0-ba30-rank0.pt"
    latest.write_bytes(latest.read_bytes()[:-200])  # cut short mid-write
    assert not checkpoint_is_readable(latest)
    with pytest.warns(UserWarning, match="corrupt"):
        chosen = recover_latest_checkpoint(tmp_path)
    assert chosen.name == "ep0-ba20-rank0.pt"
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba20-rank0.pt"
    assert (tmp_path / "ep0-ba30-rank0.pt.corrupt").exists()
    assert torch.load(tmp_path / "latest-rank0.pt")["state"]["batch"] == 20


def test_flipped_bytes_are_caught_by_the_crc(tmp_path):
    write_checkpoints(tmp_path, [10])
    path = tmp_path / "ep0-ba10-rank0.pt"
    with zipfile.ZipFile(path) as archive:
        info = max(archive.infolist(), key=lambda i: i.file_size)
    data = bytearray(path.read_bytes())
    header = info.header_offset  # local file header: name and extra lengths at bytes 26-29
    name_len, extra_len = (int.from_bytes(data[header + i : header + i + 2], "little") for i in (26, 28))
    offset = header + 30 + name_len + extra_len + 10
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))
    assert not checkpoint_is_readable(path)
    with pytest.raises(ValueError, match="no earlier readable checkpoint"):
        recover_latest_checkpoint(tmp_path)


def test_healthy_latest_is_left_alone(tmp_path):
    write_checkpoints(tmp_path, [10, 20])
    assert recover_latest_checkpoint(tmp_path).name == "ep0-ba20-rank0.pt"
    assert recover_latest_checkpoint(tmp_path / "missing") is None


def test_unwritable_or_full_save_folder(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="cannot be written"):
        check_save_folder(blocker / "run", checkpoint_bytes=1)
    with pytest.raises(ValueError, match="GiB free but one checkpoint needs"):
        check_save_folder(tmp_path / "run", checkpoint_bytes=2**62)
    from shearing.checkpoints import unwritable_save_folder

    full = unwritable_save_folder(tmp_path, OSError(errno.ENOSPC, "No space left on device"), tmp_path / "x")
    assert str(full) == (
        f"save_folder {tmp_path} cannot be written: no space left on {tmp_path / 'x'} (disk full or quota). "
        "Free space there, or set save_folder (variables.save_folder) to a writable folder"
    )


def exit_code(main, argv) -> int:
    """A CLI's exit status, whether its ``main`` returns it or exits with it (``shearing.refusals``)."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("module", ["shearing.evaluate", "shearing.reference_losses"])
def test_cli_refuses_an_unwritable_output_before_the_work(
    tmp_path, module, tiny_gqa_dir, tiny_data, monkeypatch, capsys
):
    """--output under a regular file (chmod tests do not work as root): exit 2 naming it, nothing evaluated."""
    import importlib

    cli = importlib.import_module(module)
    work = "evaluate" if module == "shearing.evaluate" else "_from_model"

    def expensive(*args, **kwargs):
        raise AssertionError("the evaluation ran before --output was checked")

    monkeypatch.setattr(cli, work, expensive)
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    output = blocker / "out" / "results.json"
    argv = ["--model", str(tiny_gqa_dir), "--data", str(tiny_data / "eval"), "--output", str(output)]
    assert exit_code(cli.main, argv) == 2
    err = capsys.readouterr().err
    assert f"--output {output} cannot be written" in err and "writable folder" in err
    assert exit_code(cli.main, [*argv[:-1], str(tmp_path)]) == 2  # a folder, not a file
    assert f"--output {tmp_path} is a folder" in capsys.readouterr().err


def truncate(path, keep=0.5):
    """A checkpoint cut short, as a full disk leaves it (Composer 0.32 writes ``ep*-ba*-rank0.pt`` in place)."""
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])


def test_disk_full_leftovers_are_moved_aside_then_removed_once_superseded(tmp_path):
    """No training: the start-up tidy and the after-checkpoint sweep on a folder a full disk left behind."""
    from shearing.checkpoints import tidy_save_folder
    from shearing.composer.run_folder import SupersededCheckpointSweep

    write_checkpoints(tmp_path, [10, 20])  # latest -> ba20, both good
    torch.save({"state": {"batch": 30}}, tmp_path / "ep0-ba30-rank0.pt")
    truncate(tmp_path / "ep0-ba30-rank0.pt")  # the write at ba30 failed; latest was never moved to it
    (tmp_path / "ep0-ba5-rank0.pt.corrupt").write_bytes(b"PK")  # moved aside by an earlier start
    (tmp_path / ".shearing_run.json.k3j2.tmp").write_text("{")  # write_json_atomic cut short by a kill
    good = {p.name: p.read_bytes() for p in tmp_path.glob("ep*-ba*-rank0.pt") if "ba30" not in p.name}

    with pytest.warns(
        UserWarning, match=r"ep0-ba30-rank0\.pt is incomplete .*moved aside as ep0-ba30-rank0\.pt\.corrupt"
    ):
        assert tidy_save_folder(tmp_path).name == "ep0-ba20-rank0.pt"
    assert not (tmp_path / "ep0-ba30-rank0.pt").exists()  # nothing can load or export it any more
    assert (tmp_path / "ep0-ba30-rank0.pt.corrupt").exists()  # kept until a checkpoint supersedes it
    assert not (tmp_path / "ep0-ba5-rank0.pt.corrupt").exists()  # superseded by the good ba20
    assert not list(tmp_path.glob("*.tmp"))
    assert {p.name: p.read_bytes() for p in tmp_path.glob("ep*-ba*-rank0.pt")} == good  # good ones untouched
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba20-rank0.pt"

    sweep = SupersededCheckpointSweep(tmp_path)
    sweep.batch_checkpoint(None, None)  # a checkpoint at ba20 does not supersede ba30
    assert (tmp_path / "ep0-ba30-rank0.pt.corrupt").exists()
    torch.save({"state": {"batch": 30}}, tmp_path / "ep0-ba30-rank0.pt")  # the resumed run saves ba30
    os.replace(tmp_path / "latest-rank0.pt", tmp_path / "old-link")
    os.symlink("ep0-ba30-rank0.pt", tmp_path / "latest-rank0.pt")
    sweep.batch_checkpoint(None, None)
    assert not (tmp_path / "ep0-ba30-rank0.pt.corrupt").exists()
    assert sorted(p.name for p in tmp_path.glob("ep*")) == [f"ep0-ba{b}-rank0.pt" for b in (10, 20, 30)]


def test_a_missing_latest_link_is_restored_not_restarted_from_zero(tmp_path):
    """Composer removes latest-rank0.pt before linking the new one: a full disk (or a kill) in between
    left none, and autoresume started again from step 0, overwriting the checkpoints."""
    from shearing.checkpoints import tidy_save_folder

    write_checkpoints(tmp_path, [10, 20, 30])
    (tmp_path / "latest-rank0.pt").unlink()
    truncate(tmp_path / "ep0-ba30-rank0.pt")
    with pytest.warns(UserWarning) as warned:
        assert tidy_save_folder(tmp_path).name == "ep0-ba20-rank0.pt"
    messages = " ".join(str(w.message) for w in warned)
    assert "ep0-ba30-rank0.pt is incomplete" in messages and "was missing" in messages
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba20-rank0.pt"
    assert tidy_save_folder(tmp_path / "missing") is None


@pytest.fixture(scope="module")
def two_checkpoints(tmp_path_factory, tiny_gqa_dir, tiny_data):
    """A prune_tiny run folder trained to batch 2 with a checkpoint at batches 1 and 2 (latest -> ba2)."""
    run = tmp_path_factory.mktemp("two_checkpoints") / "run"
    train_tiny(run, tiny_gqa_dir, tiny_data, "2ba")
    return run


def train_tiny(run, tiny_gqa_dir, tiny_data, max_duration, *extra):
    from tiny import run_overrides

    from shearing.train import train_from_yaml

    overrides = run_overrides(
        tiny_gqa_dir,
        tiny_data,
        run,
        "variables.reference_losses={code: 3.0, docs: 3.0}",
        f"max_duration={max_duration}",
        "save_interval=1ba",
        "eval_interval=100ba",
        *extra,
    )
    return train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)


def test_a_corrupt_latest_is_gone_once_the_resumed_run_saves_past_it(
    tmp_path, two_checkpoints, tiny_gqa_dir, tiny_data
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    truncate(run / "ep0-ba2-rank0.pt")  # latest -> ba2, cut short (the disk filled, or power was lost)
    with pytest.warns(
        UserWarning, match=r"ep0-ba2-rank0\.pt .* is corrupt .*resuming from ep0-ba1-rank0\.pt"
    ):
        trainer = train_tiny(run, tiny_gqa_dir, tiny_data, "3ba")
    assert int(trainer.state.timestamp.batch) == 3
    # Before: ep0-ba2-rank0.pt.corrupt (as large as a checkpoint) stayed after the resumed run saved ba2 again.
    assert not list(run.glob("*.corrupt"))
    assert sorted(p.name for p in run.glob("ep*")) == [f"ep0-ba{b}-rank0.pt" for b in (1, 2, 3)]
    assert all(checkpoint_is_readable(p) for p in run.glob("ep*"))
    assert os.readlink(run / "latest-rank0.pt") == "ep0-ba3-rank0.pt"


def test_a_run_whose_latest_link_is_missing_resumes_from_its_newest_checkpoint(
    tmp_path, two_checkpoints, tiny_gqa_dir, tiny_data
):
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)
    (run / "latest-rank0.pt").unlink()  # removed by Composer; the full disk refused the new link
    written = {b: (run / f"ep0-ba{b}-rank0.pt").stat().st_mtime_ns for b in (1, 2)}
    with warnings.catch_warnings(record=True) as warned:
        warnings.simplefilter("always")
        trainer = train_tiny(run, tiny_gqa_dir, tiny_data, "3ba")
    assert int(trainer.state.timestamp.batch) == 3
    # Before: autoresume found no latest, trained again from step 0 and overwrote ba1 and ba2.
    assert {b: (run / f"ep0-ba{b}-rank0.pt").stat().st_mtime_ns for b in (1, 2)} == written
    assert any("latest-rank0.pt was missing" in str(w.message) for w in warned)
    assert os.readlink(run / "latest-rank0.pt") == "ep0-ba3-rank0.pt"


def names(folder):
    return sorted(p.name for p in folder.iterdir())


def test_only_the_newest_n_checkpoints_are_kept_whoever_wrote_them(tmp_path):
    """No training: the after-checkpoint sweep on a folder earlier processes filled."""
    from shearing.checkpoints import remove_old_checkpoints

    write_checkpoints(tmp_path, [10, 20, 30, 40, 50])  # latest -> ba50
    (tmp_path / "ep0-ba60-rank0.pt").write_bytes(b"PK")  # newer than latest: a write in progress
    others = ["ep0-ba5-rank0.pt.corrupt", "ep0-ba6-rank0.pt.bak", "ep0-ba7-rank1.pt", "best-ba8-rank0.pt"]
    for name in others:
        (tmp_path / name).write_bytes(b"x")
    os.symlink("ep0-ba10-rank0.pt", tmp_path / "ep0-ba11-rank0.pt")  # a link, not a checkpoint file
    assert remove_old_checkpoints(tmp_path, -1) == [] and remove_old_checkpoints(tmp_path, 0) == []
    tracked = [tmp_path / "ep0-ba20-rank0.pt"]  # Composer's saver rotates this one itself
    removed = remove_old_checkpoints(tmp_path, 2, tracked)
    assert sorted(p.name for p in removed) == ["ep0-ba10-rank0.pt", "ep0-ba30-rank0.pt"]
    kept = ["ep0-ba20-rank0.pt", "ep0-ba40-rank0.pt", "ep0-ba50-rank0.pt", "ep0-ba60-rank0.pt"]
    assert names(tmp_path) == sorted([*kept, *others, "ep0-ba11-rank0.pt", "latest-rank0.pt"])
    assert {p.name for p in remove_old_checkpoints(tmp_path, 1)} == {"ep0-ba20-rank0.pt", "ep0-ba40-rank0.pt"}
    assert os.readlink(tmp_path / "latest-rank0.pt") == "ep0-ba50-rank0.pt"


def test_latest_is_kept_even_when_newer_checkpoints_exist(tmp_path):
    from shearing.checkpoints import remove_old_checkpoints

    write_checkpoints(tmp_path, [10, 20, 30])
    os.replace(tmp_path / "latest-rank0.pt", tmp_path / "old-link")
    os.symlink("ep0-ba10-rank0.pt", tmp_path / "latest-rank0.pt")  # re-pointed back (a fallback)
    assert remove_old_checkpoints(tmp_path, 1) == []
    assert {p.name for p in tmp_path.glob("ep*")} == {f"ep0-ba{b}-rank0.pt" for b in (10, 20, 30)}


def test_resumed_runs_keep_exactly_save_num_checkpoints_to_keep(
    tmp_path, two_checkpoints, tiny_gqa_dir, tiny_data
):
    """Composer 0.32.1's saver forgets on resume what earlier processes wrote: before, every resume left them."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(two_checkpoints, run, symlinks=True)  # ba1, ba2 written by an earlier process
    keep = "save_num_checkpoints_to_keep=2"
    trainer = train_tiny(run, tiny_gqa_dir, tiny_data, "4ba", keep)
    assert int(trainer.state.timestamp.batch) == 4
    # Before: ep0-ba1 and ep0-ba2 stayed (4 checkpoints); Composer only removed the ones this process wrote.
    assert sorted(p.name for p in run.glob("ep*")) == ["ep0-ba3-rank0.pt", "ep0-ba4-rank0.pt"]
    written = (run / "ep0-ba4-rank0.pt").stat().st_mtime_ns
    trainer = train_tiny(run, tiny_gqa_dir, tiny_data, "5ba", keep)  # resumes from ba4
    assert int(trainer.state.timestamp.batch) == 5
    assert (run / "ep0-ba4-rank0.pt").stat().st_mtime_ns == written  # resumed, not retrained from step 0
    assert sorted(p.name for p in run.glob("ep*")) == ["ep0-ba4-rank0.pt", "ep0-ba5-rank0.pt"]
    assert os.readlink(run / "latest-rank0.pt") == "ep0-ba5-rank0.pt"
    assert all(checkpoint_is_readable(p) for p in run.glob("ep*"))
