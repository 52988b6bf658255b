"""The export gate on real tiny runs: an unconverged (3-step) pruning run is refused by the CLI and by the
end-of-fit callback with the numbers in the message, ``--force`` exports and records it, the converged
300-step run passes, and non-finite or wrongly shaped states are never exported."""

import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from tiny import run_overrides

from shearing.export import hf as export_mod
from shearing.export.hf import ExportRefused
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


def test_cli_without_data_measures_the_loss_on_the_runs_eval_split(short_run, tiny_data, tmp_path):
    """README step 4 has no --data: the run record's data folder gives the eval split, and the CLI says so."""
    done = cli("--checkpoint", short_run, "--output", tmp_path / "hf", "--max-seqs", 4)
    assert done.returncode == 2, done.stdout + done.stderr
    split = tiny_data.resolve() / "eval"
    assert f"on the run's eval split {split} (from {short_run / 'shearing_run.json'})" in done.stdout
    assert f"eval loss on the run's eval split {split}" in done.stderr
    assert "under expected masks" in done.stderr and "under final masks" in done.stderr
    assert "not measured" not in done.stderr


def test_no_data_skips_the_loss_and_records_it(short_run, tmp_path):
    out = tmp_path / "hf"
    done = cli("--checkpoint", short_run, "--output", out, "--no-data", "--force")
    assert done.returncode == 0, done.stderr
    assert "eval loss: not measured (skipped (--no-data))" in done.stdout
    gate = json.loads((out / export_mod.SUMMARY_NAME).read_text())["gate"]
    assert gate["eval_loss"] is None and gate["eval_source"] == "skipped (--no-data)"
    assert "skipped (--no-data)" in (out / "shearing_export.md").read_text()
    assert "skipped (--no-data)" in (out / "README.md").read_text()
    both = cli("--checkpoint", short_run, "--output", out, "--no-data", "--data", tmp_path)
    assert both.returncode == 2 and "not allowed with argument" in both.stderr


def test_a_moved_data_folder_is_a_clear_error_before_any_work(pruned_run, tmp_path):
    """The run record names a data folder that is gone: refused, naming it and both ways out."""
    _, run_dir = pruned_run
    run = tmp_path / "run"
    run.mkdir()
    shutil.copy2(run_dir / "ep0-ba300-rank0.pt", run / "ep0-ba300-rank0.pt")
    record = json.loads((run_dir / "shearing_run.json").read_text())
    record["train_data"] = str(tmp_path / "moved" / "train")
    (run / "shearing_run.json").write_text(json.dumps(record))
    out = tmp_path / "hf"
    done = cli("--checkpoint", run, "--output", out)
    assert done.returncode == 2, done.stdout + done.stderr
    err = done.stderr
    assert f"the run's eval data {tmp_path / 'moved' / 'eval'} does not exist" in err
    assert str(run / "shearing_run.json") in err and "--data DATA_DIR/eval" in err and "--no-data" in err
    assert not out.exists()


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
    assert gate["thresholds"] == {
        "max_sparsity_gap": 0.02,
        "max_loss_gap": 0.1,
        "min_kept_probability": 0.8,
        "max_dropped_probability": 0.2,
    }
    assert gate["eval_source"] == f"{tiny_data / 'eval'} (--data)"
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
    # An error of the run after training, never printed as a run "refused before it started" (train.py).
    assert not getattr(info.value, "shearing_refusal", False)
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
    assert gate["eval_source"] == "the run's eval loader (at most 16 batches)"
    # Decided masks: measured 0.91-0.99 (kept) and 0.05-0.11 (dropped) per family at 300 steps.
    for entry in gate["families"].values():
        assert entry["kept_keep_probability"] > 0.9 and entry["dropped_keep_probability"] < 0.12
        assert 0.8 < entry["kept_mask_value"] <= 1.0
    assert "Convergence gate: passed" in (run_dir / "hf" / "shearing_export.md").read_text()


def test_the_cli_and_the_callback_measure_the_gate_loss_alike(pruned_run, tiny_data, tmp_path):
    """One measurement (``gate.mask_eval_losses``): the run's eval loader reads the first 16 sequences of
    each domain in batches of 8, as ``--max-seqs 16`` does, so the loss the CLI measures on the final
    checkpoint is the one the fit-end callback recorded."""
    _, run_dir = pruned_run
    recorded = json.loads((run_dir / "hf" / export_mod.SUMMARY_NAME).read_text())["gate"]["eval_loss"]
    state, step, _ = export_mod.load_checkpoint(run_dir)
    eval_data = tiny_data / "eval"
    summary = export_mod.export_model_state(
        state, tmp_path / "hf", step=step, eval_data=eval_data, max_seqs=16
    )
    measured = summary["gate"]["eval_loss"]
    assert set(measured) == set(recorded) == {"expected_masks", "final_masks"}
    for key, value in recorded.items():
        assert measured[key] == pytest.approx(value, rel=1e-5, abs=0), key


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


# ------------------------------------------------------------------------------- decidedness
def undecided(state, l0_specs, seed=0):
    """``state`` with every keep probability p = 1 - target sparsity (plus a little noise to break ties):
    the expected sparsity meets the target exactly, and nothing is decided."""
    from shearing.pruning.hard_concrete import KEEP_SHIFT

    state = dict(state)
    generator = torch.Generator().manual_seed(seed)
    for name, spec in l0_specs.items():
        key = f"l0.log_alphas.{name}"
        keep = 1.0 - spec.target_sparsity
        noise = 1e-3 * torch.randn(state[key].shape, generator=generator)
        state[key] = torch.full_like(state[key], math.log(keep / (1 - keep)) + KEEP_SHIFT) + noise
    return state


def test_undecided_masks_that_meet_the_target_are_refused_and_forced_exports_record_it(pruned_run, tmp_path):
    """Issue 18 §4: masks at the target sparsity whose keep probabilities all sit at the keep fraction
    pass the sparsity and loss halves (both deterministic evals fold the same soft values), but cut a model
    scaled down by v ~ 0.1-0.4 everywhere: refused, with the numbers; a forced export records them."""
    _, run_dir = pruned_run
    state = export_mod.load_model_state(run_dir)
    _, l0, _ = export_mod.rebuild(state)
    state = undecided(state, l0.specs)
    with pytest.raises(ExportRefused) as info:
        export_mod.export_model_state(state, tmp_path / "hf", step=300)
    message = str(info.value)
    assert "undecided masks" in message and "min_kept_probability 0.8" in message
    assert "max_dropped_probability 0.2" in message
    for family in l0.specs:
        assert f"{family}: decidedness: mean keep probability" in message
    assert not (tmp_path / "hf").exists()

    summary = export_mod.export_model_state(state, tmp_path / "hf", step=300, force=True)
    gate = summary["gate"]
    assert gate["forced"] is True and not gate["passed"]
    for name, spec in l0.specs.items():
        entry = gate["families"][name]
        keep = 1.0 - spec.target_sparsity
        assert abs(entry["expected_sparsity"] - spec.target_sparsity) < 0.01  # the sparsity half passes
        assert entry["kept_keep_probability"] == pytest.approx(keep, abs=0.01)
        assert entry["dropped_keep_probability"] == pytest.approx(keep, abs=0.01)
        assert entry["kept_mask_value"] < 0.5  # what the cut folds into the weights
    assert all("undecided" in f for f in gate["failures"])
    assert json.loads((tmp_path / "hf" / export_mod.SUMMARY_NAME).read_text())["gate"] == gate
    markdown = (tmp_path / "hf" / "shearing_export.md").read_text()
    assert "FAILED" in markdown and "Failed checks:" in markdown and "undecided masks" in markdown
    assert "kv_group: decidedness" in (tmp_path / "hf" / "README.md").read_text()


def test_decidedness_thresholds_are_checked(tmp_path, capsys):
    from shearing.pruning.gate import GateThresholds

    with pytest.raises(
        ValueError,
        match=r"export.min_kept_probability \(--min-kept-probability\) must be a probability in \[0, 1\], got 1.5",
    ):
        GateThresholds(min_kept_probability=1.5)
    argv = [
        "--checkpoint",
        str(tmp_path),
        "--output",
        str(tmp_path / "hf"),
        "--max-dropped-probability",
        "-1",
    ]
    with pytest.raises(SystemExit, match="2"):  # a refusal: one message, exit 2 (shearing.refusals)
        export_mod.main(argv)
    assert "must be a probability in [0, 1], got -1.0: e.g. export.max_dropped_probability=0.2" in (
        capsys.readouterr().err
    )


def test_decidedness_thresholds_come_from_the_yaml(tmp_path):
    """``export.min_kept_probability`` / ``export.max_dropped_probability`` reach the fit-end export and are
    checked with the other export keys, before training."""
    from tiny import run_overrides

    from shearing.composer.callbacks.export import build_export_callback
    from shearing.config import load_config

    def cfg(*extra):
        overrides = [*run_overrides("SRC", "DATA", tmp_path / "run"), "export.on_fit_end=true", *extra]
        return load_config("yamls/testing/prune_tiny.yaml", overrides)

    callback = build_export_callback(
        cfg("export.min_kept_probability=0.9", "export.max_dropped_probability=0.1")
    )
    assert (callback.thresholds.min_kept_probability, callback.thresholds.max_dropped_probability) == (
        0.9,
        0.1,
    )
    with pytest.raises(
        ValueError, match=r"export.max_dropped_probability \(--max-dropped-probability\) must"
    ):
        build_export_callback(cfg("export.max_dropped_probability=2"))


# ------------------------------------------------------------------------------- float16 range
def test_float16_export_of_a_weight_beyond_its_range_is_refused_by_name(pruned_run, tmp_path, capsys):
    """|w| > 65504 becomes inf in float16: refused after the cast, naming the tensor and its max |value|,
    suggesting bfloat16; nothing written. bfloat16 (float32's range) exports the same checkpoint."""
    _, run_dir = pruned_run
    raw = torch.load(run_dir / "ep0-ba300-rank0.pt", map_location="cpu", weights_only=False)
    norm = "model.model.norm.weight"
    raw["state"]["model"][norm] = torch.full_like(raw["state"]["model"][norm], 70000.0)
    checkpoint = tmp_path / "run" / "ep0-ba300-rank0.pt"
    checkpoint.parent.mkdir()
    torch.save(raw, checkpoint)
    out = tmp_path / "hf"
    with pytest.raises(SystemExit, match="2"):
        export_mod.main(["--checkpoint", str(checkpoint), "--output", str(out), "--dtype", "float16"])
    err = capsys.readouterr().err
    assert "export refused: float16 cannot hold the model's weights" in err
    assert "model.norm.weight (max |value| 70000, 48 values overflow)" in err
    assert "largest value 65504" in err and "--dtype bfloat16" in err
    assert not out.exists() and not list(tmp_path.glob(".hf.*"))
    assert (
        export_mod.main(["--checkpoint", str(checkpoint), "--output", str(out), "--dtype", "bfloat16"]) == 0
    )
    assert (out / "model.safetensors").is_file()


def test_callback_refuses_a_float16_export_of_a_weight_beyond_its_range(tiny_data, tokenizer_dir, tmp_path):
    """The fit-end export shares the writer: ``export.dtype=float16`` refuses too, and writes nothing."""
    from safetensors.torch import load_file, save_file
    from tiny import make_hf_llama

    source = make_hf_llama(tmp_path / "source", tokenizer_dir)
    weights = load_file(source / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    weights[name][0, 0] = 1.0e5  # sharpens one attention pattern; the loss stays finite
    save_file(weights, source / "model.safetensors", metadata={"format": "pt"})
    run_dir = tmp_path / "run"
    overrides = run_overrides(
        source,
        tiny_data,
        run_dir,
        "model.source_shape=null",
        "max_duration=1ba",
        "save_interval=1ba",
        "eval_interval=1ba",
        "export.on_fit_end=true",
        "export.dtype=float16",
    )
    with pytest.raises(ExportRefused, match=rf"{name} \(max \|value\| 100000, 1 values overflow\)") as info:
        train_from_yaml("yamls/testing/cpt_tiny.yaml", overrides)
    assert "--dtype bfloat16" in str(info.value) and "export.dtype=bfloat16" in str(info.value)
    assert (run_dir / "ep0-ba1-rank0.pt").is_file() and not (run_dir / "hf").exists()
