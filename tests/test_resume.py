"""Kill a run at an arbitrary point (SIGKILL), restart the same command: it continues from the last
checkpoint and the loss trace, masks and domain proportions match an uninterrupted run."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests/scripts/train_trace.py"


def read_trace(path: Path) -> dict[int, dict]:
    """Last record per step: steps redone after a resume replace the ones the killed run logged."""
    records = {}
    for line in path.read_text().splitlines():
        record = json.loads(line)
        records[record["step"]] = record
    return records


def run(out: Path, yaml: str, overrides: list[str], kill_at_step: int | None = None) -> None:
    cmd = [sys.executable, str(SCRIPT), str(out), yaml, *overrides]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    if kill_at_step is None:
        done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-3000:]
        return
    proc = subprocess.Popen(
        cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    trace = out / "trace.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if trace.exists() and max(read_trace(trace), default=0) >= kill_at_step:
            break
        time.sleep(0.02)
    assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def kill_and_resume(tmp_path: Path, yaml: str, overrides: list[str]) -> tuple[Path, Path]:
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, yaml, [*overrides, f"variables.save_folder={straight / 'run'}"])
    args = [*overrides, f"variables.save_folder={resumed / 'run'}", "callbacks.loss_trace.sleep=0.05"]
    run(resumed, yaml, args, kill_at_step=27)  # checkpoints every 10 steps: steps 21-27 are lost and redone
    assert sorted(p.name for p in (resumed / "run").glob("ep*-ba*-rank0.pt")) == [
        "ep0-ba10-rank0.pt",
        "ep0-ba20-rank0.pt",
    ]
    run(resumed, yaml, args)
    a, b = read_trace(straight / "trace.jsonl"), read_trace(resumed / "trace.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 41))
    for step in a:
        for key in a[step]:
            assert b[step][key] == pytest.approx(a[step][key], rel=0, abs=1e-6), (step, key)
    history_a = json.loads((straight / "run" / "dynamic_loading.json").read_text())["history"]
    history_b = json.loads((resumed / "run" / "dynamic_loading.json").read_text())["history"]
    assert [h["step"] for h in history_a] == [h["step"] for h in history_b] == [0, 10, 20, 30, 40]
    for x, y in zip(history_a, history_b):
        assert x["proportions"] == pytest.approx(y["proportions"], abs=1e-12)
    return straight, resumed


COMMON = ["max_duration=40ba", "save_interval=10ba", "eval_interval=10ba"]


@pytest.mark.slow
def test_pruning_survives_sigkill(tmp_path, tiny_gqa_dir, tiny_data):
    overrides = [f"variables.source_model={tiny_gqa_dir}", f"variables.data_local={tiny_data}", *COMMON]
    straight, resumed = kill_and_resume(tmp_path, "yamls/testing/prune_tiny.yaml", overrides)
    masks_a, masks_b = torch.load(straight / "final_l0.pt"), torch.load(resumed / "final_l0.pt")
    for key in masks_a:
        torch.testing.assert_close(masks_b[key], masks_a[key], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_continued_pretraining_survives_sigkill(tmp_path, pruned_run, tiny_data):
    _, prune_dir = pruned_run
    overrides = [
        f"variables.source_model={prune_dir / 'hf'}",
        f"variables.prune_run={prune_dir}",
        f"variables.data_local={tiny_data}",
        *COMMON,
    ]
    kill_and_resume(tmp_path, "yamls/testing/cpt_tiny.yaml", overrides)


def test_rerunning_a_finished_run_finishes_its_export(tmp_path, tiny_gqa_dir, tiny_data, capsys):
    """Export lost (a SIGKILL during it, or deleted): the same command writes it and returns; again: a no-op."""
    from shearing.train import train_from_yaml

    run_dir = tmp_path / "run"
    overrides = [
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        f"variables.save_folder={run_dir}",
        "variables.reference_losses={code: 3.0, docs: 3.0}",
        "max_duration=4ba",
        "save_interval=2ba",
        "eval_interval=100ba",
        "export.on_fit_end=true",
        "export.force=true",  # 4 steps do not converge the masks; the gate would refuse
    ]
    train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)
    summary = run_dir / "hf" / "shearing_export.json"
    assert json.loads(summary.read_text())["checkpoint_batch"] == 4
    config = json.loads((run_dir / "hf" / "config.json").read_text())
    shutil.rmtree(run_dir / "hf")
    capsys.readouterr()

    trainer = train_from_yaml(
        "yamls/testing/prune_tiny.yaml", overrides
    )  # old code: "No training would occur"
    assert int(trainer.state.timestamp.batch) == 4
    assert json.loads(summary.read_text())["checkpoint_batch"] == 4
    assert json.loads((run_dir / "hf" / "config.json").read_text()) == config
    assert f"exported it now to {run_dir / 'hf'}" in capsys.readouterr().out
    written = summary.stat().st_mtime_ns

    train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)
    out = capsys.readouterr().out
    assert (
        "the run is complete: trained to batch 4" in out
        and f"the export at {run_dir / 'hf'} is from batch 4" in out
    )
    assert summary.stat().st_mtime_ns == written  # not exported again
