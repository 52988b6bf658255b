"""``MetricsFileLogger`` with a real (tiny) Composer ``Trainer``: what it writes, where, and resuming.

The model is a 4 -> 2 linear classifier, so each run takes a fraction of a second; the resume cases
use Composer's own autoresume from the checkpoints the run saved.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from composer import Callback, Trainer
from composer.models import ComposerClassifier
from torch.utils.data import DataLoader, TensorDataset

from shearing.composer import loggers as loggers_mod
from shearing.composer.loggers import MetricsFileLogger, to_json_value


class Probe(Callback):
    """Logs a tensor and a numpy scalar every batch, as our callbacks do."""

    def batch_end(self, state, logger):
        step = int(state.timestamp.batch)
        logger.log_metrics({"probe/tensor": torch.tensor(step * 0.5), "probe/numpy": np.float32(step)})


def make_trainer(save_folder: Path | None, duration: str = "10ba", **logger_kwargs) -> Trainer:
    torch.manual_seed(0)
    data = TensorDataset(torch.randn(80, 4), torch.randint(0, 2, (80,)))
    model = ComposerClassifier(torch.nn.Linear(4, 2), num_classes=2)
    return Trainer(
        model=model,
        train_dataloader=DataLoader(data, batch_size=4),
        optimizers=torch.optim.SGD(model.parameters(), lr=0.1),
        max_duration=duration,
        run_name="tiny",
        save_folder=None if save_folder is None else str(save_folder),
        save_interval="5ba",
        save_overwrite=True,
        autoresume=save_folder is not None,
        loggers=[MetricsFileLogger(**logger_kwargs)],
        callbacks=[Probe()],
        progress_bar=False,
        log_to_console=False,
        device="cpu",
    )


def read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def pairs(records: list[dict]) -> list[tuple[int, str]]:
    return [(r["step"], name) for r in records for name in r if name != "step"]


def test_every_logged_metric_lands_in_the_save_folder_as_json_lines(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    trainer.fit()
    trainer.close()
    records = read(tmp_path / "run" / "metrics.jsonl")
    names = {name for _, name in pairs(records)}
    assert {"loss/train/total", "time/batch", "probe/tensor", "probe/numpy"} <= names
    assert all(isinstance(r["step"], int) for r in records)
    assert len(pairs(records)) == len(set(pairs(records)))
    probe = {r["step"]: r["probe/tensor"] for r in records if "probe/tensor" in r}
    assert probe == {step: step * 0.5 for step in range(1, 11)}
    assert all(type(v) is float for r in records for k, v in r.items() if k != "step")


def test_folder_argument_and_run_name_fallback(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    trainer = make_trainer(None, folder=str(tmp_path / "logs" / "{run_name}"), filename="m.jsonl")
    trainer.fit()
    trainer.close()
    assert read(tmp_path / "logs" / "tiny" / "m.jsonl")
    trainer = make_trainer(None, duration="2ba")
    trainer.fit()
    trainer.close()
    assert max(r["step"] for r in read(tmp_path / "tiny" / "metrics.jsonl")) == 2
    with pytest.raises(ValueError, match="plain file name"):
        MetricsFileLogger(filename="sub/metrics.jsonl")


def test_resume_after_a_kill_logs_every_step_once(tmp_path):
    """Killed after batch 10 with the last checkpoint at batch 5: resuming must rebuild the same file."""
    run = tmp_path / "run"
    trainer = make_trainer(run)
    trainer.fit()
    trainer.close()
    uninterrupted = read(run / "metrics.jsonl")
    # The kill: the batch-10 checkpoint never made it, and the process died mid-line.
    (run / "ep0-ba10-rank0.pt").unlink()
    (run / "latest-rank0.pt").unlink()
    os.symlink("ep0-ba5-rank0.pt", run / "latest-rank0.pt")
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 11, "loss/tra')
    trainer = make_trainer(run)
    assert int(trainer.state.timestamp.batch) == 5
    trainer.fit()
    trainer.close()
    resumed = read(run / "metrics.jsonl")
    assert len(pairs(resumed)) == len(set(pairs(resumed)))
    assert sorted(pairs(resumed)) == sorted(pairs(uninterrupted))
    assert resumed[: len(resumed) // 3] == uninterrupted[: len(resumed) // 3]  # the kept part is untouched
    assert not (run / "metrics.jsonl.tmp").exists()


def test_a_file_the_checkpoint_does_not_recognise_is_cut_by_step(tmp_path):
    """Without a matching byte mark (file rewritten, weights-only load): keep steps <= the resume batch.

    Only the resume batch itself may then repeat a metric (Composer logs some of it again on resume).
    """
    run = tmp_path / "run"
    trainer = make_trainer(run)
    trainer.fit()
    trainer.close()
    records = read(run / "metrics.jsonl")
    compact = "".join(json.dumps(r, separators=(",", ":")) + "\n" for r in records)
    (run / "metrics.jsonl").write_text(compact + '{"step": 11, "from_the_killed_process": 1.0}\n')
    trainer = make_trainer(run, duration="15ba")  # resumes from batch 10 and goes on to 15
    trainer.fit()
    trainer.close()
    resumed = read(run / "metrics.jsonl")
    counts = Counter(pairs(resumed))
    assert [pair for pair, n in counts.items() if n > 1 and pair[0] != 10] == []
    assert resumed[: len(records) // 2] == records[: len(records) // 2]
    assert not any("from_the_killed_process" in r for r in resumed)
    assert max(r["step"] for r in resumed) == 15


def test_a_fresh_run_replaces_what_an_earlier_attempt_left(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 0, "stale": 1.0}\n{"step": 7, "stale": 2.0}\n')
    trainer = make_trainer(run, duration="3ba")
    trainer.fit()
    trainer.close()
    records = read(run / "metrics.jsonl")
    assert records and not any("stale" in r for r in records)


def test_a_half_written_last_line_is_cut_before_anything_is_appended(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"step": 3, "loss/train/total": 1.5}\n{"step": 4, "loss/tr')
    destination = MetricsFileLogger(folder=str(tmp_path))
    state = SimpleNamespace(run_name="tiny", callbacks=[])
    destination.log_metrics({"metrics/eval/LanguageCrossEntropy": 1.25}, step=4)  # before INIT: held back
    destination.init(state, None)
    destination.close(state, None)
    assert read(tmp_path / "metrics.jsonl") == [
        {"step": 3, "loss/train/total": 1.5},
        {"step": 4, "metrics/eval/LanguageCrossEntropy": 1.25},
    ]


def test_only_global_rank_zero_writes(tmp_path, monkeypatch):
    monkeypatch.setattr(loggers_mod.dist, "get_global_rank", lambda: 1)
    destination = MetricsFileLogger(folder=str(tmp_path / "out"))
    state = SimpleNamespace(run_name="tiny", callbacks=[])
    destination.init(state, None)
    destination.log_metrics({"loss/train/total": 1.0}, step=1)
    destination.close(state, None)
    assert not (tmp_path / "out").exists()


def test_values_become_plain_json():
    assert to_json_value(torch.tensor(2.5)) == 2.5 and type(to_json_value(torch.tensor(3))) is float
    assert to_json_value(torch.tensor([1.0, 2.0])) == [1.0, 2.0]
    assert to_json_value(np.float32(0.25)) == 0.25 and type(to_json_value(np.int64(4))) is float
    assert to_json_value(7) == 7.0 and to_json_value(True) is True and to_json_value("x") == "x"


# ------------------------------------------------------------------ W&B / MLflow with autoresume


def prune_tiny(run_dir: Path, steps: int, tiny_gqa_dir: Path, tiny_data: Path, loggers: str):
    """``prune_tiny`` for ``steps`` batches (checkpoints every 10) with the given ``loggers`` override."""
    from shearing.train import train_from_yaml

    overrides = [
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        f"variables.save_folder={run_dir}",
        f"variables.max_duration={steps}ba",
        "variables.save_interval=10ba",
        "variables.eval_interval=10ba",
        "variables.reference_losses={code: 3.0, docs: 3.0}",
        loggers,
    ]
    trainer = train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)
    trainer.close()
    return trainer


def test_wandb_offline_with_autoresume_starts_and_resumes(tmp_path, monkeypatch, tiny_gqa_dir, tiny_data):
    """Composer's autoresume asked the W&B logger for a checkpoint on the first start; offline that died."""
    pytest.importorskip("wandb", reason="W&B is not installed: pip install -e '.[dev]'")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    run = tmp_path / "run"
    loggers = "loggers={metrics_file: {}, wandb: {project: shearing-test}}"
    first = prune_tiny(run, 20, tiny_gqa_dir, tiny_data, loggers)
    assert int(first.state.timestamp.batch) == 20
    second = prune_tiny(run, 30, tiny_gqa_dir, tiny_data, loggers)  # resumes from ep0-ba20
    assert int(second.state.timestamp.batch) == 30
    steps = [r["step"] for r in read(run / "metrics.jsonl") if "loss/train/total" in r]
    assert steps == list(range(30))  # 20 from the first process, 10 from the resumed one
    offline_runs = list((tmp_path / "wandb" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(offline_runs) == 2 and all(p.stat().st_size > 0 for p in offline_runs)


def test_mlflow_with_autoresume_continues_its_run_without_duplicate_steps(tmp_path, tiny_gqa_dir, tiny_data):
    pytest.importorskip("mlflow", reason="MLflow is not installed: pip install -e '.[dev]'")
    from mlflow.tracking import MlflowClient

    uri = f"file://{tmp_path / 'mlruns'}"
    loggers = (
        "loggers={metrics_file: {}, mlflow: {tracking_uri: '" + uri + "', experiment_name: shearing-test, "
        "log_system_metrics: false}}"
    )
    run = tmp_path / "run"
    prune_tiny(run, 20, tiny_gqa_dir, tiny_data, loggers)
    second = prune_tiny(run, 30, tiny_gqa_dir, tiny_data, loggers)
    assert int(second.state.timestamp.batch) == 30
    client = MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name("shearing-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 1, [r.info.run_name for r in runs]  # the resumed process logged into the same run
    run_id = runs[0].info.run_id
    losses = client.get_metric_history(run_id, "loss/train/total")
    assert sorted(m.step for m in losses) == list(range(30))  # every step once: 0-19, then 20-29
    for key in ("metrics/eval/code_LanguageCrossEntropy", "metrics/eval/docs_LanguageCrossEntropy"):
        assert sorted(m.step for m in client.get_metric_history(run_id, key)) == [10, 20, 30]
    assert all(math.isfinite(m.value) for m in losses)


def test_mlflow_resumes_only_when_a_checkpoint_will_be_loaded(tmp_path):
    """A fresh start (no latest checkpoint) opens a new MLflow run even if an old one has the run name."""
    pytest.importorskip("mlflow", reason="MLflow is not installed: pip install -e '.[dev]'")
    pytest.importorskip("wandb", reason="W&B is not installed: pip install -e '.[dev]'")
    cfg = {"mlflow": {"tracking_uri": f"file://{tmp_path / 'mlruns'}"}, "wandb": {"project": "p"}}
    folder = str(tmp_path / "{run_name}")
    kwargs = dict(save_folder=folder, run_name="r", autoresume=True)
    mlflow_logger, wandb_logger = loggers_mod.build_loggers(cfg, **kwargs)
    assert mlflow_logger.resume is False
    (tmp_path / "r").mkdir()
    os.symlink("ep0-ba10-rank0.pt", tmp_path / "r" / "latest-rank0.pt")
    assert loggers_mod.build_loggers(cfg, **kwargs)[0].resume is False  # dangling: Composer would not load it
    (tmp_path / "r" / "ep0-ba10-rank0.pt").write_bytes(b"")
    assert loggers_mod.build_loggers(cfg, **kwargs)[0].resume is True
    assert (
        loggers_mod.build_loggers({"mlflow": {**cfg["mlflow"], "resume": False}}, **kwargs)[0].resume is False
    )
    with pytest.raises(FileNotFoundError, match="does not upload checkpoints"):
        wandb_logger.download_file("latest-rank0.pt", str(tmp_path / "x.pt"))
