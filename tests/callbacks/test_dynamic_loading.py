"""DynamicLoading with a real Composer Trainer: exact resume, lag, logging, files, and up-front errors."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from callbacks.mixture_run import REFERENCE_LOSSES, make_trainer, uninterrupted_and_resumed
from data.conftest_mixture import DOMAINS, make_data_root

from shearing.composer.callbacks.dynamic_loading import DynamicLoading
from shearing.data.mixture import Mixture

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_data_root(tmp_path_factory.mktemp("dl_data"))


@pytest.mark.parametrize("workers", [0, 2])
def test_resume_matches_uninterrupted_run(root, tmp_path, workers):
    result = uninterrupted_and_resumed(root, tmp_path, workers)
    full, resumed = result["full"], result["resumed"]
    assert len(full["batches"]) == 10
    assert resumed["batches"] == full["batches"]  # the same samples, in the same order
    assert resumed["losses"] == full["losses"]  # and so the same losses, bit for bit
    assert resumed["history"] == full["history"]

    # An update after every "eval" evaluation (steps 2..10), none from the "other" evaluator.
    history = full["history"]
    lag = 0  # the next batch, with the trainer's real loader and 2 reader "workers" too
    assert [h["step"] for h in history] == [0, 2, 4, 6, 8, 10]
    assert [h["effective_step"] for h in history[1:]] == [s + lag for s in (2, 4, 6, 8, 10)]
    assert history[1]["proportions"] != history[0]["proportions"]
    gaps = history[1]["loss_gaps"]
    assert gaps == {d: history[1]["losses"][d] - REFERENCE_LOSSES[d] for d in gaps}

    # The trained batches are the pure allocation with each update in effect from its step + lag on,
    # and the updates did change them within these 10 steps.
    def replay(updates):
        mix = Mixture(
            list(DOMAINS),
            [n for n, _ in DOMAINS.values()],
            2,
            5,
            proportions=list(history[0]["proportions"].values()),
        )
        for h in updates:
            mix.schedule(h["effective_step"], list(h["proportions"].values()))
        return [list(zip(*(x.tolist() for x in mix.rank_slots(mix.next_batch(), 0, 1)))) for _ in range(10)]

    assert replay(history[1:]) == full["batches"]
    assert replay([]) != full["batches"]
    assert result["logged"] == sorted(
        f"metrics/dynamic_loading/{kind}/{d}" for kind in ("loss_gap", "proportion") for d in REFERENCE_LOSSES
    )
    record = json.loads((tmp_path / "full" / "dynamic" / "dynamic_loading.json").read_text())
    assert record["history"] == history and record["update"] == "paper"
    with open(tmp_path / "full" / "dynamic" / "dynamic_loading.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [0, 2, 4, 6, 8, 10]
    assert float(rows[-1]["proportion/wiki"]) == history[-1]["proportions"]["wiki"]


def _fails_before_training(trainer, recorder, message):
    with pytest.raises(ValueError, match=message):
        trainer.fit()
    assert recorder.batches == []  # nothing was trained
    trainer.close()


def test_missing_reference_loss_fails_at_fit_start(root, tmp_path):
    callback = DynamicLoading({"cc": 1.0, "code": 1.0}, output_dir=tmp_path)
    trainer, recorder, _, _ = make_trainer(root, tmp_path, "4ba", callback=callback)
    _fails_before_training(trainer, recorder, "missing domain 'wiki'")


def test_wrong_evaluator_fails_at_fit_start(root, tmp_path):
    callback = DynamicLoading(REFERENCE_LOSSES, eval_label="validation", output_dir=tmp_path)
    trainer, recorder, _, _ = make_trainer(root, tmp_path, "4ba", callback=callback)
    _fails_before_training(trainer, recorder, "evaluator 'validation'")


def test_eval_domains_in_another_order_fail_at_fit_start(root, tmp_path):
    trainer, recorder, _, _ = make_trainer(root, tmp_path, "4ba", eval_domains=["wiki", "code", "cc"])
    _fails_before_training(trainer, recorder, "differ from the train loader")


def test_eval_without_a_domain_is_an_error(root, tmp_path):
    trainer, _, _, _ = make_trainer(root, tmp_path, "4ba", eval_subset_num_batches=1)
    with pytest.raises(ValueError, match=r"domains \['wiki'\] had no tokens"):
        trainer.fit()
    trainer.close()


def test_constant_mode_logs_but_never_updates(root, tmp_path):
    start = tmp_path / "previous.json"
    start.write_text(json.dumps({"history": [{"proportions": {"cc": 0.2, "code": 0.3, "wiki": 0.5}}]}))
    callback = DynamicLoading(
        REFERENCE_LOSSES, update="constant", initial_proportions=start, output_dir=tmp_path
    )
    trainer, recorder, _, _ = make_trainer(root, tmp_path, "4ba", callback=callback)
    trainer.fit()
    dataset = trainer.state.train_dataloader.dataset
    assert dataset.proportions == [0.2, 0.3, 0.5]
    assert [h["effective_step"] for h in callback.history] == [0, None, None]
    assert all(h["proportions"] == {"cc": 0.2, "code": 0.3, "wiki": 0.5} for h in callback.history)
    assert "losses" in callback.history[-1]
    trainer.close()


@pytest.mark.multiprocess
def test_resume_matches_uninterrupted_run_on_two_ranks(root, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    composer = Path(sys.executable).parent / "composer"
    script = REPO / "tests" / "callbacks" / "mixture_run.py"
    proc = subprocess.run(
        [
            str(composer),
            "-n",
            "2",
            "--stdout",
            str(tmp_path / "out{rank}.txt"),
            "--stderr",
            str(tmp_path / "err{rank}.txt"),
            str(script),
            str(root),
            str(tmp_path),
            "2",
        ],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    logs = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("err*.txt")))
    assert proc.returncode == 0, proc.stderr[-3000:] + logs
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["world_size"] == 2
    for rank in result["ranks"]:
        assert rank["resumed"]["batches"] == rank["full"]["batches"]
        assert rank["resumed"]["losses"] == rank["full"]["losses"]
        assert rank["resumed"]["history"] == rank["full"]["history"]
        assert len(rank["full"]["history"]) == 6
    a, b = (r["full"]["batches"] for r in result["ranks"])
    for step_a, step_b in zip(a, b):  # each sample of a global batch is read by exactly one rank
        assert not set(map(tuple, step_a)) & set(map(tuple, step_b))
    for name, value in result["single_process_eval"].items():  # per-domain CE reduced over ranks
        assert value == pytest.approx(result["eval_values"][name], rel=1e-5)
    assert result["ranks"][0]["full"]["history"] == result["ranks"][1]["full"]["history"]  # rank-consistent
