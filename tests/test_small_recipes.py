"""The small-model recipes (``yamls/small/``), the CPT recipes' any-shape source, and the local lm-eval task
of ``examples/lm_eval``. The whole SmolLM2 walk-through of the README runs in ``tests/test_readme.py``."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from shearing.config import load_config
from shearing.evaluate import main as evaluate_main
from shearing.models.shapes import count_params, resolve_source_shape
from shearing.plan import render_plan
from shearing.pruning.plan import PruningPlan
from shearing.train import validate_run

REPO = Path(__file__).resolve().parents[1]
PRUNE = REPO / "yamls/small/smollm2_135m_to_51m.yaml"
CPT = REPO / "yamls/small/smollm2_51m_cpt.yaml"


def test_the_smollm2_recipe_plans_against_the_real_checkpoint(smollm2_dir):
    cfg = load_config(PRUNE, [f"variables.source_model={smollm2_dir}"])
    plan = PruningPlan.from_config(cfg, need_checkpoint=True)  # model.source_shape checks config.json
    assert (count_params(plan.source), count_params(plan.target)) == (134_515_008, 51_330_432)
    assert (
        cfg.callbacks["dynamic_loading"]["reference_losses"] == "./data_smol/ref.json"
    )  # a file, not 'source'
    assert cfg.optimizer.lr == 1.0e-3 and cfg.pruning.lagrangian_warmup == "0.2dur"
    text = render_plan(str(PRUNE), [f"variables.source_model={smollm2_dir}"])
    assert "2/3 per group" in text  # 6 of 9 heads: 2 of 3 in each of the 3 KV groups


def test_the_cpt_recipes_take_a_model_of_any_shape(tiny_gqa_dir, tiny_data):
    """cpt_tiny used to pin model.source_shape to prune_tiny's shape, so any other model needed the hidden
    override model.source_shape=null; the CPT recipes now take whatever the export is."""
    for yaml in ("yamls/testing/cpt_tiny.yaml", str(CPT)):
        cfg = load_config(
            REPO / yaml,
            [
                f"variables.source_model={tiny_gqa_dir}",  # the unpruned 4-layer tiny model
                f"variables.data_local={tiny_data}",
                "variables.prune_run=null",
                "variables.reference_losses={code: 3.0, docs: 3.0}",
                "variables.max_seq_len=64",
            ],
        )
        validate_run(cfg)  # everything train.py checks before loading weights


def test_a_pinned_shape_names_the_override_that_releases_it(tiny_gqa_dir):
    with pytest.raises(ValueError, match="add the override model.source_shape=null"):
        resolve_source_shape(str(tiny_gqa_dir), "tiny_gqa_pruned")


def test_the_example_lm_eval_task_runs_offline_from_any_folder(tmp_path, tiny_gqa_dir, monkeypatch):
    """examples/lm_eval/tiny_facts.yaml reads its JSONL through utils.load (next to the yaml), so it needs
    neither the hub nor the repository as the working directory."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "tasks.json"
    argv = ["--model", str(tiny_gqa_dir), "--tasks", "lm_eval:tiny_facts", "--output", str(out)]
    argv += ["--include-path", str(REPO / "examples/lm_eval"), "--local-tasks-only", "--num-fewshot", "0"]
    assert evaluate_main([*argv, "--batch-size", "8", "--no-progress"]) == 0
    metrics = json.loads(out.read_text())["tasks"]["tiny_facts"]
    assert set(metrics) == {"acc", "acc_stderr", "acc_norm", "acc_norm_stderr"}
    rows = (REPO / "examples/lm_eval/tiny_facts.jsonl").read_text().splitlines()
    assert len(rows) == 20 and metrics["acc"] * 20 == pytest.approx(round(metrics["acc"] * 20))
