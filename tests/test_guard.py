"""A diverged run stops at the bad step with a non-zero exit, before it writes a checkpoint; the last good
checkpoint stays resumable and finite."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from composer.core import Callback
from llmfoundry import registry
from tiny import composer_two_ranks, run_overrides

from shearing.train import train_from_yaml

REPO = Path(__file__).resolve().parents[1]
YAML = "yamls/testing/prune_tiny.yaml"


def overrides(tiny_gqa_dir, tiny_data, run_dir, *extra):
    return run_overrides(
        tiny_gqa_dir,
        tiny_data,
        run_dir,
        "variables.reference_losses={code: 3.0, docs: 3.0}",  # skip the source-model eval pass
        "max_duration=6ba",
        "save_interval=1ba",
        "eval_interval=100ba",
        *extra,
    )


def checkpoints(run_dir: Path) -> list[str]:
    return sorted(p.name for p in run_dir.glob("ep*-ba*-rank0.pt"))


def assert_finite_checkpoint(path: Path) -> None:
    model = torch.load(path, map_location="cpu", weights_only=False)["state"]["model"]
    for name, value in model.items():
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            assert torch.isfinite(value).all(), name


def test_nan_loss_exits_non_zero_before_the_bad_checkpoint(tmp_path, tiny_gqa_dir, tiny_data):
    """lr 1e20: the step-2 loss is NaN (and every weight with it); without the guard the run trains to the end."""
    run_dir = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        YAML,
        *overrides(tiny_gqa_dir, tiny_data, run_dir, "optimizer.lr=1e20"),
    ]
    done = subprocess.run(
        cmd, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600
    )
    assert done.returncode != 0, done.stderr[-2000:]
    assert "TrainingDiverged: training stopped at step 2: non-finite loss" in done.stderr
    assert f"The last good checkpoint is {run_dir / 'latest-rank0.pt'} -> ep0-ba1-rank0.pt" in done.stderr
    assert "learning rate too high" in done.stderr and "bad data" in done.stderr
    assert checkpoints(run_dir) == ["ep0-ba1-rank0.pt"]  # step 2 (non-finite) was never written
    assert_finite_checkpoint(run_dir / "latest-rank0.pt")


def test_exploding_finite_loss_stops_too(tmp_path, tiny_gqa_dir, tiny_data):
    """lr 1e3: the loss jumps to ~2e7 (finite) and the model collapses; the guard's max_loss bound catches it."""
    run_dir = tmp_path / "run"
    with pytest.raises(RuntimeError, match=r"training stopped at step 2: LM loss .* above 62\.38") as info:
        train_from_yaml(YAML, overrides(tiny_gqa_dir, tiny_data, run_dir, "optimizer.lr=1e3"))
    assert type(info.value).__name__ == "TrainingDiverged"
    assert checkpoints(run_dir) == ["ep0-ba1-rank0.pt"]
    assert 10 * math.log(512) == pytest.approx(62.383, abs=1e-3)


class PoisonWeight(Callback):
    """After the optimizer step of ``step`` (the loss of that step was finite), a NaN in one weight."""

    def __init__(self, step: int):
        self.step = step

    def after_train_batch(self, state, logger):
        if int(state.timestamp.batch) + 1 == self.step:  # the timestamp moves on just before BATCH_END
            with torch.no_grad():
                state.model.model.model.norm.weight[0] = float("nan")


def test_non_finite_weights_are_caught_before_the_checkpoint(tmp_path, tiny_gqa_dir, tiny_data):
    if "poison_weight" not in registry.callbacks:
        registry.callbacks.register("poison_weight", func=PoisonWeight)
    run_dir = tmp_path / "run"
    args = overrides(tiny_gqa_dir, tiny_data, run_dir, "save_interval=2ba", "callbacks.poison_weight.step=4")
    with pytest.raises(
        RuntimeError, match=r"step 4: 1 non-finite weight / mask-logit values before writing a ch"
    ):
        train_from_yaml(YAML, args)
    assert checkpoints(run_dir) == ["ep0-ba2-rank0.pt"]
    assert_finite_checkpoint(run_dir / "latest-rank0.pt")


@pytest.mark.multiprocess
def test_two_ranks_stop_together(tmp_path, tiny_gqa_dir, tiny_data):
    """`composer -n 2`: both ranks stop at step 2 with the same message (no rank left waiting), exit non-zero."""
    run_dir = tmp_path / "run"
    cmd = [
        *composer_two_ranks(tmp_path, REPO / "train.py"),
        str(REPO / YAML),
        *overrides(tiny_gqa_dir, tiny_data, run_dir, "optimizer.lr=1e20"),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode != 0
    for rank in (0, 1):  # the launcher prints local rank 0 itself and writes the others to the files
        err = done.stderr if rank == 0 else (tmp_path / f"rank{rank}.err").read_text()
        assert "TrainingDiverged: training stopped at step 2: non-finite loss" in err, (rank, err[-2000:])
    assert checkpoints(run_dir) == ["ep0-ba1-rank0.pt"]
    assert_finite_checkpoint(run_dir / "latest-rank0.pt")
