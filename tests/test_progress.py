"""A run tells the person watching it what it is doing: step, loss, tokens/s, ETA, reference losses, where
checkpoints and the export go (``shearing.progress`` + the yamls' console logging and callbacks)."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from shearing.config import load_config

REPO = Path(__file__).resolve().parents[1]
RUN_YAMLS = sorted(p for p in (REPO / "yamls").rglob("*.yaml"))


@pytest.mark.parametrize("path", RUN_YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_shows_progress_by_default(path):
    cfg = load_config(path)
    assert cfg.log_to_console or cfg.progress_bar, f"{path.name} prints nothing while it trains"
    assert "speed_monitor" in cfg.callbacks, f"{path.name}: no tokens/s (speed_monitor)"
    assert "runtime_estimator" in cfg.callbacks, f"{path.name}: no ETA (runtime_estimator)"
    if cfg.log_to_console:
        steps = int(str(cfg.max_duration).removesuffix("ba"))
        interval = int(str(cfg.console_log_interval).removesuffix("ba"))
        assert 1 < interval <= max(50, steps // 20), f"{path.name}: console_log_interval {interval}"


def test_a_tiny_run_prints_step_loss_speed_eta_reference_losses_and_the_export(
    tmp_path, tiny_gqa_dir, tiny_data
):
    run = tmp_path / "run"
    command = [
        sys.executable,
        "train.py",
        "yamls/testing/prune_tiny.yaml",
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        f"variables.save_folder={run}",
        "variables.max_duration=50ba",  # one console block at the yaml's own interval (50ba)
        "variables.save_interval=50ba",
        "variables.eval_interval=50ba",
        "export.on_fit_end=true",
        "export.force=true",  # 50 steps do not converge the masks; the gate would refuse
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-4000:]
    for expected in (
        f"[shearing] checkpoints -> {run} (every 50ba)",
        f"[shearing] export -> {run / 'hf'} (when training ends)",
        "[shearing] reference losses from the source model: {'code': ",
        "[batch=50/50]:",
        "Train loss/train/total: ",
        "Train throughput/tokens_per_sec: ",
        "Train time/remaining_estimate: ",
        "[Eval batch=4/4] Eval on eval data",  # the eval progress knows its total
        f"[shearing] exported the model to {run / 'hf'}",
    ):
        assert expected in out, f"{expected!r} not in the run's output:\n{out[-4000:]}"
    # the source-loss pass before training (reference_losses: source) shows its total too
    assert re.search(r"eval code: 100%\|.*\| (\d+)/\1 \[", out), out[:3000]
    assert (run / "hf" / "config.json").is_file()
