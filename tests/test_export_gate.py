"""The export gate on real tiny runs: an unconverged (3-step) pruning run is refused by the CLI and by the
end-of-fit callback with the numbers in the message, ``--force`` exports and records it, the converged
300-step run passes, and non-finite or wrongly shaped states are never exported."""

import json
import subprocess
import sys

import pytest
import torch
from tiny import run_overrides

from shearing import export as export_mod
from shearing.export import ExportRefused
from shearing.train import train_from_yaml

YAML = "yamls/testing/prune_tiny.yaml"


@pytest.fixture(scope="module")
def short_run(tmp_path_factory, tiny_gqa_dir, tiny_data):
    """A 3-step pruning run with a checkpoint after every step (ba1, ba2, ba3); no export."""
    run_dir = tmp_path_factory.mktemp("short_run")
    overrides = run_overrides(
        tiny_gqa_dir, tiny_data, run_dir, "max_duration=3ba", "save_interval=1ba", "eval_interval=3ba"
    )
    train_from_yaml(YAML, overrides)
    return run_dir


def cli(*args):
    cmd = [sys.executable, "-m", "shearing.export", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True)


def test_cli_refuses_an_unconverged_run_with_the_numbers(short_run, tiny_data, tmp_path):
    out = tmp_path / "hf"
    done = cli("--checkpoint", short_run, "--output", out, "--data", tiny_data / "eval", "--max-seqs", 8)
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr
    assert "export refused" in err and "batch 3" in err
    for family in ("hidden", "kv_group", "intermediate", "layer"):
        assert f"{family}: expected sparsity" in err
    assert "target 0.2500" in err  # layer: 3 of 4 layers kept
    assert "under expected masks" in err and "under final masks" in err
    assert "max_sparsity_gap 0.02" in err and "max_loss_gap 0.1" in err
    assert "--force" in err and "export.force=true" in err
    assert not out.exists()


def test_cli_without_data_says_the_loss_was_not_measured(short_run, tmp_path):
    done = cli("--checkpoint", short_run, "--output", tmp_path / "hf")
    assert done.returncode == 2
    assert "not measured" in done.stderr and "expected sparsity" in done.stderr


def test_force_exports_and_records_it(short_run, tiny_data, tmp_path):
    out = tmp_path / "hf"
    done = cli("--checkpoint", short_run, "--output", out, "--force", "--data", tiny_data / "eval")
    assert done.returncode == 0, done.stderr
    assert "FAILED, exported because of --force" in done.stdout
    summary = json.loads((out / export_mod.SUMMARY_NAME).read_text())
    gate = summary["gate"]
    assert gate["passed"] is False and gate["forced"] is True
    assert summary["checkpoint_batch"] == 3
    assert set(gate["families"]) == {"hidden", "kv_group", "intermediate", "layer"}
    assert gate["families"]["layer"]["target_sparsity"] == pytest.approx(0.25)
    assert gate["families"]["layer"]["expected_sparsity"] < 0.05  # 3 steps: the masks are still all on
    loss = gate["eval_loss"]
    # Both measured; the tiny source is random-init (loss ~ ln 512), so the cut costs little here and it is
    # the sparsity half that refuses.
    assert loss["final_masks"] > loss["expected_masks"]
    assert gate["thresholds"] == {"max_sparsity_gap": 0.02, "max_loss_gap": 0.1}
    assert "FAILED" in (out / "shearing_export.md").read_text()


def test_callback_refuses_at_fit_end_and_keeps_the_checkpoints(tiny_gqa_dir, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = run_overrides(
        tiny_gqa_dir, tiny_data, run_dir, "max_duration=3ba", "save_interval=3ba", "export.on_fit_end=true"
    )
    with pytest.raises(ExportRefused, match="expected sparsity") as info:
        train_from_yaml(YAML, overrides)
    message = str(info.value)
    assert "under expected masks" in message and "under final masks" in message  # measured on the eval loader
    assert "export.force=true" in message
    assert (run_dir / "ep0-ba3-rank0.pt").is_file() and (run_dir / "metrics.jsonl").is_file()
    assert not (run_dir / "hf").exists()


def test_callback_force_exports(tiny_gqa_dir, tiny_data, tmp_path):
    run_dir = tmp_path / "run"
    overrides = run_overrides(
        tiny_gqa_dir,
        tiny_data,
        run_dir,
        "max_duration=3ba",
        "save_interval=3ba",
        "export.on_fit_end=true",
        "export.force=true",
    )
    train_from_yaml(YAML, overrides)
    gate = json.loads((run_dir / "hf" / export_mod.SUMMARY_NAME).read_text())["gate"]
    assert gate["forced"] is True and gate["eval_loss"] is not None


def test_converged_run_passes_the_gate(pruned_run):
    _, run_dir = pruned_run
    summary = json.loads((run_dir / "hf" / export_mod.SUMMARY_NAME).read_text())
    gate = summary["gate"]
    print("\n300-step gate:", json.dumps(gate, indent=1))
    assert gate["passed"] is True and gate["forced"] is False
    assert summary["checkpoint_batch"] == 300
    for entry in gate["families"].values():
        assert abs(entry["expected_sparsity"] - entry["target_sparsity"]) < 0.005
    assert gate["eval_loss"] is not None
    assert gate["eval_loss"]["final_masks"] - gate["eval_loss"]["expected_masks"] < 0.05
    assert "Convergence gate: passed" in (run_dir / "hf" / "shearing_export.md").read_text()


def test_converged_run_passes_the_cli_gate_with_data(pruned_run, tiny_data, tmp_path):
    _, run_dir = pruned_run
    done = cli("--checkpoint", run_dir, "--output", tmp_path / "hf", "--data", tiny_data / "eval")
    assert done.returncode == 0, done.stderr
    assert "convergence gate passed" in done.stdout


# ------------------------------------------------------------------------------- hard checks
def test_non_finite_weights_and_mask_logits_are_refused_even_forced(short_run, tmp_path):
    state = dict(export_mod.load_model_state(short_run / "ep0-ba3-rank0.pt"))
    up = "model.model.layers.1.mlp.up_proj.weight"
    state[up] = state[up].clone()
    state[up][0, 0] = float("nan")
    state["l0.log_alphas.kv_group"] = torch.full_like(state["l0.log_alphas.kv_group"], float("nan"))
    with pytest.raises(ExportRefused) as info:
        export_mod.export_model_state(state, tmp_path / "hf", step=3, force=True)
    message = str(info.value)
    assert up in message and "l0.log_alphas.kv_group" in message and "batch 3" in message
    assert "--force does not override" in message
    assert not (tmp_path / "hf").exists()


def test_final_masks_that_keep_everything_are_refused(pruned_run, tmp_path, monkeypatch):
    """The NaN top-k bug kept every unit: an export of the source shape must never pass as the target."""
    _, run_dir = pruned_run
    state = export_mod.load_model_state(run_dir)
    monkeypatch.setattr(
        export_mod.L0Module,
        "forward",
        lambda self: {f"{n}_z": torch.ones(s.shape) for n, s in self.specs.items()},
    )
    with pytest.raises(ExportRefused, match=r"wrong shape: hidden_size 64 \(target 48\)"):
        export_mod.export_model_state(state, tmp_path / "hf", step=300)
    assert not (tmp_path / "hf").exists()
