"""`composer -n 2` on CPU (gloo): a pruning run whose ranks end with identical mask parameters."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import run_two_ranks

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.multiprocess
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp2"])
def test_two_ranks_end_with_identical_masks(tmp_path, tiny_gqa_dir, tiny_data, parallelism):
    extra = [f"variables.save_folder={tmp_path / 'run'}"]  # checkpoints and dynamic_loading.json stay in tmp
    # No FSDP_VERSION (run_two_ranks): the recipes' default path, shearing.composer.parallelism builds the FSDP2 config.
    if parallelism == "fsdp2":
        # The recipes' fsdp_config (FSDP2 by default) with a full-state-dict export at the end.
        # 12 steps cannot converge: the gate measures both eval losses on both ranks, then is forced.
        extra += [
            "fsdp_config={sharding_strategy: FULL_SHARD, mixed_precision: DEFAULT, activation_checkpointing: true,"
            " state_dict_type: full, use_orig_params: true, limit_all_gathers: true}",
            "export.on_fit_end=true",
            "export.force=true",
        ]
    run_two_ranks(
        tmp_path,
        REPO / "tests/scripts/prune_ddp.py",
        str(tmp_path),
        str(REPO / "yamls/testing/prune_tiny.yaml"),
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        "max_duration=12ba",
        "eval_interval=6ba",
        *extra,
    )
    rank0, rank1 = (torch.load(tmp_path / f"l0_rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    moved = False
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
        moved |= key.startswith("lambdas.") and float(rank0[key].abs()) > 0
    assert moved, "the multipliers never moved: the run did not prune"
    for key in (k for k in rank0 if k.startswith("log_alphas.")):
        # Stored logits stay clamped on every shard (before the fix, FSDP ranks reached ~17 after 20 steps).
        assert float(rank0[key].max()) <= math.log(100.0) + 1e-6, key
        assert float(rank0[key].min()) >= math.log(0.01) - 1e-6, key
    if parallelism == "fsdp2":
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 3
        gate = json.loads((tmp_path / "run" / "hf" / "shearing_export.json").read_text())["gate"]
        assert gate["forced"] is True and gate["eval_loss"] is not None


@pytest.mark.multiprocess
def test_plain_fsdp1_full_shard_prunes_and_keeps_stored_logits_in_range(tmp_path):
    # Composer's FSDP1 needs CUDA; plain torch FSDP1 on gloo reproduces what the recipes ran: the in-place
    # clamp inside forward raised "a view ... is being modified inplace" at step 1.
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tests/scripts/fsdp1_prune.py"), str(tmp_path), "true", "6"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    errors = "".join(p.read_text() for p in sorted(tmp_path.glob("fsdp1_rank*.err")))
    assert done.returncode == 0 and not errors, errors or done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"fsdp1_rank{r}.pt") for r in (0, 1))
    for rank in (rank0, rank1):
        # After every step, on every rank's shard, and in the gathered logits at the end.
        assert max(rank["stored_max"]) <= math.log(100.0) + 1e-6, rank["stored_max"]
        for name, log_alpha in rank["log_alphas"].items():
            assert float(log_alpha.max()) <= math.log(100.0) + 1e-6, name
            assert float(log_alpha.min()) >= math.log(0.01) - 1e-6, name
    for name in rank0["log_alphas"]:
        torch.testing.assert_close(rank0["log_alphas"][name], rank1["log_alphas"][name], rtol=0, atol=0)


@pytest.mark.multiprocess
def test_fsdp2_bf16_mixed_precision_keeps_the_l0_module_in_fp32(tmp_path):
    # Composer's FSDP2 wrapping with amp_bf16 + mixed_precision DEFAULT (2 ranks, gloo): the decoder layers
    # compute in bf16, the L0 forward sees its fp32 logits and multipliers unrounded (bf16 spacing near
    # ln 100 is 0.03, which erased the 0.01 init noise: the forward saw values up to 0.015 off).
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, str(REPO / "tests/scripts/fsdp2_l0_precision.py"), str(tmp_path), "3"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    errors = "".join(p.read_text() for p in sorted(tmp_path.glob("fsdp2_mp_rank*.err")))
    assert done.returncode == 0 and not errors, errors or done.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"fsdp2_mp_rank{r}.pt") for r in (0, 1))
    for rank in (rank0, rank1):
        assert len(rank["seen"]) == 3
        for record in rank["seen"]:
            assert record["decoder_weight_dtype"] == "torch.bfloat16", record  # the model's policy holds
            assert set(record["log_alpha_dtype"].values()) == {"torch.float32"}, record
            assert set(record["lambda_dtype"].values()) == {"torch.float32"}, record
            assert max(record["log_alpha_diff"].values()) == 0.0, record  # exactly the stored values
            assert set(record["mask_dtype"].values()) == {"torch.float32"}, record
            assert record["lagrangian_dtype"] == "torch.float32", record
        assert "before its first forward" in rank["late_error"] and "torch.bfloat16" in rank["late_error"]
    for key in rank0["final"]:
        torch.testing.assert_close(rank0["final"][key], rank1["final"][key], rtol=0, atol=0)
        assert rank0["final"][key].dtype == torch.float32, key
    # The init noise (std 0.01 below ln 100) survives: fp32 logits take many distinct values per family.
    for key in (k for k in rank0["final"] if k.startswith("log_alphas.")):
        assert rank0["final"][key].unique().numel() > rank0["final"][key].numel() // 2, key


@pytest.mark.multiprocess
def test_composer_fsdp2_run_with_bf16_params_keeps_the_l0_module_in_fp32(tmp_path, tiny_gqa_dir, tiny_data):
    # The real Trainer path (parallelize_composer_model) on CPU: Composer allows only precision fp32 there,
    # so the bf16 parameter policy comes from a mixed_precision dict (what DEFAULT + amp_bf16 gives on GPU).
    run_two_ranks(
        tmp_path,
        REPO / "tests/scripts/prune_ddp.py",
        str(tmp_path),
        str(REPO / "yamls/testing/prune_tiny.yaml"),
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        f"variables.save_folder={tmp_path / 'run'}",
        "max_duration=4ba",
        "eval_interval=4ba",
        "fsdp_config={sharding_strategy: FULL_SHARD, activation_checkpointing: true, state_dict_type: full,"
        " mixed_precision: {param_dtype: bf16, reduce_dtype: fp32, buffer_dtype: bf16}}",
    )
    for rank in (0, 1):
        seen = json.loads((tmp_path / f"forward_dtypes_rank{rank}.json").read_text())
        assert seen.pop("decoder_layer") == "torch.bfloat16", seen  # the model's policy holds
        assert seen.pop("lagrangian") == "torch.float32"
        assert any(k.startswith("l0.log_alphas.") for k in seen) and any(
            k.startswith("l0.lambdas.") for k in seen
        )
        assert set(seen.values()) == {"torch.float32"}, seen
    rank0, rank1 = (torch.load(tmp_path / f"l0_rank{r}.pt") for r in (0, 1))
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
