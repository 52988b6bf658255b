"""A real tiny pruning run on CPU: convergence to the target, export, and parity (b)+(c) end to end."""

import json
import subprocess
import sys

import pytest
import torch
from tiny import TINY_TARGET
from transformers import AutoModelForCausalLM, AutoTokenizer

from shearing.export import hf as export_mod
from shearing.models.shapes import count_params, resolve_target_shape, shape_from_hf_config
from shearing.pruning.surgery import prune_model

TARGET = TINY_TARGET


def test_expected_sparsity_reaches_target(pruned_run):
    trainer, _ = pruned_run
    l0 = trainer.state.model.l0
    targets = l0.target_sparsity(1.0)
    for name, sparsity in l0.expected_sparsity().items():
        assert abs(float(sparsity.mean()) - targets[name]) < 0.05, name
        # The quadratic multiplier only ever ascends ((s - t)^2 >= 0): the constraint was enforced.
        assert float(l0.lambdas[f"{name}_2"]) > 0.1, name


def test_export_at_fit_end_loads_strictly_with_exact_shape(pruned_run, tiny_gqa_dir):
    _, run_dir = pruned_run
    out = run_dir / "hf"
    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    config = json.loads((out / "config.json").read_text())
    for name, value in TARGET.items():
        assert config[name] == value
    assert config["head_dim"] == 16
    target_shape = resolve_target_shape(
        shape_from_hf_config(json.loads((tiny_gqa_dir / "config.json").read_text())), TARGET
    )
    assert sum(p.numel() for p in model.parameters()) == count_params(target_shape)
    summary = json.loads((out / export_mod.SUMMARY_NAME).read_text())
    assert summary["target"]["num_params"] == count_params(target_shape)
    assert len(summary["kept"]["layers"]) == 3
    assert (
        AutoTokenizer.from_pretrained(out).vocab_size
        == AutoTokenizer.from_pretrained(tiny_gqa_dir).vocab_size
    )


def test_masked_pruned_and_exported_logits_agree(pruned_run):
    trainer, run_dir = pruned_run
    composer_model = trainer.state.model
    composer_model.eval()
    l0 = composer_model.l0
    l0.use_final_masks = True
    input_ids = torch.randint(0, 512, (2, 32))
    with torch.no_grad():
        masks = l0()
        masked = composer_model.model(input_ids, masks=masks)
        pruned = prune_model(composer_model.model, masks).model.eval()(input_ids)
        hf = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()(input_ids).logits
    torch.testing.assert_close(pruned, masked)
    torch.testing.assert_close(hf, masked)


def test_export_cli_from_run_folder(pruned_run, tmp_path):
    _, run_dir = pruned_run
    out = tmp_path / "cli_export"
    cmd = [sys.executable, "-m", "shearing.export", "--checkpoint", str(run_dir), "--output", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "wrote" in done.stdout
    a = AutoModelForCausalLM.from_pretrained(out).eval()
    b = AutoModelForCausalLM.from_pretrained(run_dir / "hf").eval()
    input_ids = torch.randint(0, 512, (1, 16))
    with torch.no_grad():
        torch.testing.assert_close(a(input_ids).logits, b(input_ids).logits)
    again = subprocess.run(cmd, capture_output=True, text=True)
    assert again.returncode == 2 and "--overwrite" in again.stderr


def test_failed_export_leaves_nothing_that_looks_complete(pruned_run, tmp_path, monkeypatch):
    _, run_dir = pruned_run
    state = export_mod.load_model_state(run_dir)

    def crash(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(export_mod, "save_torch_state_dict", crash)
    with pytest.raises(OSError, match="disk full"):
        export_mod.export_model_state(state, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []
    # An existing export survives a failed overwrite untouched (only a previous export may be replaced).
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "marker").write_text("old")
    (tmp_path / "out" / export_mod.SUMMARY_NAME).write_text("{}")
    with pytest.raises(OSError):
        export_mod.export_model_state(state, tmp_path / "out", overwrite=True)
    assert (tmp_path / "out" / "marker").read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_export_rejects_checkpoint_with_foreign_keys(pruned_run):
    _, run_dir = pruned_run
    state = dict(export_mod.load_model_state(run_dir))
    state["model.model.layers.0.self_attn.q_proj.bias"] = torch.zeros(4)
    with pytest.raises(ValueError, match="unexpected keys"):
        export_mod.rebuild(state)


def test_dynamic_batch_loading_ran_with_per_domain_metrics(pruned_run):
    trainer, run_dir = pruned_run
    history = json.loads((run_dir / "dynamic_loading.json").read_text())
    assert history["domains"] == ["code", "docs"]
    # reference_losses: source -> the source model's own eval losses, computed before training.
    assert set(history["reference_losses"]) == {"code", "docs"}
    assert [entry["step"] for entry in history["history"]] == [0, 100, 200, 300]
    metrics = trainer.state.eval_metrics["eval"]
    for domain in ("code", "docs"):
        value = float(metrics[f"{domain}_LanguageCrossEntropy"].compute())
        assert 0 < value < float(history["reference_losses"][domain]) + 1
