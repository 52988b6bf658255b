"""Run-folder pre-flight: corrupt latest checkpoint falls back to the previous one; unwritable or full folders
fail with a clear error."""

import os
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
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert f"--output {output} cannot be written" in err and "writable folder" in err
    assert cli.main([*argv[:-1], str(tmp_path)]) == 2  # a folder, not a file
    assert f"--output {tmp_path} is a folder" in capsys.readouterr().err
