"""A refused input to ``python -m shearing.export``, ``shearing.evaluate`` or ``shearing.report`` is one
message naming the path or flag and the fix, and exit 2, never a traceback (``shearing.refusals``); an
error during the work itself keeps its traceback.

The subprocess cases run the commands as a user does (what reaches stderr, the exit status); the others
call ``main`` in process, where a refusal is ``SystemExit(2)`` and any other error propagates."""

from __future__ import annotations

import json
import math

import pytest
import torch
from subproc import run_python

from shearing import evaluate as evaluate_mod
from shearing import report as report_mod
from shearing.export import hf as export_mod

TIMEOUT = 300


def refused(done, what: str, *needles: str) -> str:
    """Assert that the finished command refused with one message holding ``needles``; its stderr."""
    assert done.returncode == 2, done.stdout + done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.count(f"shearing: {what} was refused before it started:") == 1, done.stderr
    for needle in needles:
        assert needle in done.stderr, done.stderr
    return done.stderr


def refused_in_process(main, argv: list[str], capsys, what: str, *needles: str) -> str:
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    err = capsys.readouterr().err
    assert f"shearing: {what} was refused before it started:" in err, err
    for needle in needles:
        assert needle in err, err
    return err


def save_checkpoint(path, model_state) -> str:
    """A readable Composer-like checkpoint file holding ``model_state`` (not a shearing run's)."""
    torch.save({"state": {"model": model_state, "timestamp": {"batch": 1}}}, path)
    return str(path)


# ------------------------------------------------------------------------------------ export
def test_export_of_a_missing_checkpoint_is_a_message(tmp_path):
    missing = tmp_path / "runs" / "nope"
    done = run_python(
        ["-m", "shearing.export", "--checkpoint", missing, "--output", tmp_path / "hf"], TIMEOUT
    )
    refused(done, "the export", f"--checkpoint {missing} is neither a checkpoint file nor a run folder")
    assert not (tmp_path / "hf").exists()


def test_export_of_a_corrupt_checkpoint_is_a_message(tmp_path):
    bad = tmp_path / "ep0-ba1-rank0.pt"
    bad.write_bytes(b"not a torch.save archive")
    done = run_python(["-m", "shearing.export", "--checkpoint", bad, "--output", tmp_path / "hf"], TIMEOUT)
    refused(done, "the export", f"--checkpoint {bad} is corrupt or truncated", "give an earlier checkpoint")


def test_export_of_a_non_finite_checkpoint_is_a_message(tmp_path):
    """The hard check inside the one export function (``export_model_state``) is a refusal of the input."""
    file = save_checkpoint(tmp_path / "ep0-ba1-rank0.pt", {"model.w": torch.tensor([1.0, math.nan])})
    done = run_python(["-m", "shearing.export", "--checkpoint", file, "--output", tmp_path / "hf"], TIMEOUT)
    refused(done, "the export", "export refused:", "model.w (1 of 2 values non-finite)", "batch 1")


def test_export_over_a_previous_export_without_overwrite_is_a_message(tmp_path):
    out = tmp_path / "hf"
    out.mkdir()
    (out / export_mod.SUMMARY_NAME).write_text("{}")
    (tmp_path / "run").mkdir()
    file = save_checkpoint(tmp_path / "run" / "ep0-ba1-rank0.pt", {})
    done = run_python(["-m", "shearing.export", "--checkpoint", file, "--output", out], TIMEOUT)
    refused(done, "the export", f"{out} holds a previous export; pass --overwrite to replace it")
    assert (out / export_mod.SUMMARY_NAME).read_text() == "{}"


@pytest.mark.parametrize(
    "case",
    ["empty run folder", "not composer", "no run metadata", "data not a folder", "threshold", "gguf name"],
)
def test_export_refusals_in_process(case, tmp_path, capsys):
    run = tmp_path / "run"
    run.mkdir()
    argv = ["--checkpoint", str(run), "--output", str(tmp_path / "hf")]
    if case == "empty run folder":
        needles = [f"no Composer checkpoint (*.pt) in {run}"]
    elif case == "not composer":
        torch.save({"weights": torch.zeros(2)}, run / "ep0-ba1-rank0.pt")
        needles = [f"{run / 'ep0-ba1-rank0.pt'} is not a Composer checkpoint (no state.model)"]
    elif case == "no run metadata":
        save_checkpoint(run / "ep0-ba1-rank0.pt", {"model.w": torch.zeros(2)})
        needles = ["the checkpoint carries no shearing run metadata"]
    elif case == "data not a folder":
        argv += ["--data", str(tmp_path / "eval")]
        needles = [f"--data {tmp_path / 'eval'} is not a folder: give DATA_DIR/eval"]
    elif case == "threshold":
        argv += ["--max-sparsity-gap", "-1"]
        needles = ["export.max_sparsity_gap (--max-sparsity-gap) must be a non-negative number, got -1.0"]
    else:
        argv += ["--gguf", "sub/model.bin"]
        needles = ["--gguf 'sub/model.bin' must be a file name ending in .gguf"]
    refused_in_process(export_mod.main, argv, capsys, "the export", *needles)
    assert not (tmp_path / "hf").exists()


def test_an_error_during_the_export_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    """Past the checks, a ValueError is a failure of the work, not a refused input: it propagates."""
    file = save_checkpoint(tmp_path / "ep0-ba1-rank0.pt", {})

    def broken(*args, **kwargs):
        raise ValueError("something broke while exporting")

    monkeypatch.setattr(export_mod, "export_model_state", broken)
    with pytest.raises(ValueError, match="something broke while exporting") as info:
        export_mod.main(["--checkpoint", file, "--output", str(tmp_path / "hf"), "--no-data"])
    assert not getattr(info.value, "shearing_refusal", False)
    assert "refused" not in capsys.readouterr().err


# ---------------------------------------------------------------------------------- evaluate
def test_evaluate_of_a_missing_model_is_a_message(tmp_path):
    missing = tmp_path / "nope"
    args = [
        "-m",
        "shearing.evaluate",
        "--model",
        missing,
        "--data",
        tmp_path,
        "--output",
        tmp_path / "r.json",
    ]
    refused(
        run_python(args, TIMEOUT), "the evaluation", f"--model {missing} is not a folder", "shearing.export"
    )
    assert not (tmp_path / "r.json").exists()


def test_evaluate_into_a_folder_is_a_message(tmp_path):
    args = ["-m", "shearing.evaluate", "--model", tmp_path, "--data", tmp_path, "--output", tmp_path]
    refused(run_python(args, TIMEOUT), "the evaluation", f"--output {tmp_path} is a folder: give a file path")


def test_evaluate_with_nothing_to_do_is_a_message(tmp_path, capsys):
    argv = ["--model", str(tmp_path), "--output", str(tmp_path / "r.json")]
    refused_in_process(evaluate_mod.main, argv, capsys, "the evaluation", "nothing to evaluate: give --data")


def test_an_error_during_the_evaluation_keeps_its_traceback(tiny_gqa_dir, tmp_path, monkeypatch):
    from shearing.evaluation import speed

    def broken(*args, **kwargs):
        raise ValueError("something broke while timing")

    monkeypatch.setattr(speed, "compare_speed", broken)
    argv = ["--model", str(tiny_gqa_dir), "--speed-baseline", str(tiny_gqa_dir)]
    with pytest.raises(ValueError, match="something broke while timing") as info:
        evaluate_mod.main([*argv, "--output", str(tmp_path / "r.json")])
    assert not getattr(info.value, "shearing_refusal", False)
    assert not (tmp_path / "r.json").exists()


# ------------------------------------------------------------------------------------ report
def test_report_of_a_missing_run_is_a_message(tmp_path):
    missing = tmp_path / "nope"
    done = run_python(["-m", "shearing.report", missing, "--output", tmp_path / "report"], TIMEOUT)
    refused(done, "the report", f"run folder {missing} does not exist")
    assert not (tmp_path / "report").exists()


def test_report_of_an_empty_folder_is_a_message(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = [str(empty), "--output", str(tmp_path / "report")]
    refused_in_process(
        report_mod.main, argv, capsys, "the report", f"{empty} holds no run, export or results"
    )
    assert not (tmp_path / "report").exists()


def test_an_error_while_drawing_the_report_keeps_its_traceback(tmp_path, monkeypatch):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss/train/total": 3.0}) + "\n")

    def broken(*args, **kwargs):
        raise ValueError("something broke while drawing")

    monkeypatch.setattr(report_mod, "build_report", broken)
    with pytest.raises(ValueError, match="something broke while drawing"):
        report_mod.main([str(run), "--output", str(tmp_path / "report")])
