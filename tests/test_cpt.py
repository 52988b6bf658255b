"""Continued pre-training of a pruned export: starts from the pruning run's final proportions, lowers the
loss, and any checkpoint exports as a stock HF model."""

import json
import subprocess
import sys

import pytest
import torch
from transformers import AutoModelForCausalLM

from shearing.train import train_from_yaml


@pytest.fixture(scope="module")
def cpt_run(tmp_path_factory, pruned_run, tiny_data):
    _, prune_dir = pruned_run
    run_dir = tmp_path_factory.mktemp("cpt_run")
    overrides = [
        f"variables.source_model={prune_dir / 'hf'}",
        f"variables.prune_run={prune_dir}",
        f"variables.data_local={tiny_data}",
        f"variables.save_folder={run_dir}",
        "export.on_fit_end=true",
    ]
    return train_from_yaml("yamls/testing/cpt_tiny.yaml", overrides), run_dir, prune_dir


def test_starts_from_the_pruning_runs_final_proportions(cpt_run):
    _, run_dir, prune_dir = cpt_run
    pruned = json.loads((prune_dir / "dynamic_loading.json").read_text())["history"][-1]["proportions"]
    started = json.loads((run_dir / "dynamic_loading.json").read_text())["history"][0]["proportions"]
    assert started == pytest.approx(pruned, abs=1e-12)


def test_lowers_the_pruned_models_loss(cpt_run):
    trainer, run_dir, _ = cpt_run
    # reference_losses: source -> the pruned model's own eval loss per domain, measured before CPT.
    before = json.loads((run_dir / "dynamic_loading.json").read_text())["reference_losses"]
    metrics = trainer.state.eval_metrics["eval"]
    for domain, loss in before.items():
        assert float(metrics[f"{domain}_LanguageCrossEntropy"].compute()) < loss - 0.05, domain


def test_mid_run_checkpoint_exports_as_stock_hf(cpt_run, tmp_path):
    _, run_dir, prune_dir = cpt_run
    out = tmp_path / "mid"
    cmd = [
        sys.executable,
        "-m",
        "shearing.export",
        "--checkpoint",
        str(run_dir / "ep0-ba50-rank0.pt"),
        "--output",
        str(out),
    ]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    mid, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    pruned = AutoModelForCausalLM.from_pretrained(prune_dir / "hf")
    final = AutoModelForCausalLM.from_pretrained(run_dir / "hf")
    assert mid.config.to_dict()["hidden_size"] == pruned.config.hidden_size == final.config.hidden_size
    # Training moved the weights: mid-run, final and starting models all differ.
    ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        logits = [m.eval()(ids).logits for m in (pruned, mid, final)]
    assert not torch.allclose(logits[0], logits[1]) and not torch.allclose(logits[1], logits[2])
