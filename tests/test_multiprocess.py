"""`composer -n 2` on CPU (gloo): a pruning run whose ranks end with identical mask parameters."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
COMPOSER = Path(sys.executable).parent / "composer"


@pytest.mark.multiprocess
@pytest.mark.parametrize("parallelism", ["ddp", "fsdp2"])
def test_two_ranks_end_with_identical_masks(tmp_path, tiny_gqa_dir, tiny_data, parallelism):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    extra = [f"variables.save_folder={tmp_path / 'run'}"]  # checkpoints and dynamic_loading.json stay in tmp
    if parallelism == "fsdp2":
        # FSDP2 (the CPU-capable one) with activation checkpointing and a full-state-dict export at the end.
        env["FSDP_VERSION"] = "2"
        extra += [
            "fsdp_config={state_dict_type: full, activation_checkpointing: true}",
            "export.on_fit_end=true",
        ]
    cmd = [
        str(COMPOSER),
        "-n",
        "2",
        "--stdout",
        str(tmp_path / "rank{rank}.out"),
        "--stderr",
        str(tmp_path / "rank{rank}.err"),
        str(REPO / "tests/scripts/prune_ddp.py"),
        str(tmp_path),
        str(REPO / "yamls/testing/prune_tiny.yaml"),
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        "max_duration=12ba",
        "eval_interval=6ba",
        *extra,
    ]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    logs = "".join(p.read_text()[-3000:] for p in sorted(tmp_path.glob("rank*.err")))
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:] + logs
    rank0, rank1 = (torch.load(tmp_path / f"l0_rank{r}.pt") for r in (0, 1))
    assert rank0.keys() == rank1.keys()
    moved = False
    for key in rank0:
        torch.testing.assert_close(rank0[key], rank1[key], rtol=0, atol=0)
        moved |= key.startswith("lambdas.") and float(rank0[key].abs()) > 0
    assert moved, "the multipliers never moved: the run did not prune"
    if parallelism == "fsdp2":
        from transformers import AutoModelForCausalLM

        model, info = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf", output_loading_info=True)
        assert not info["missing_keys"] and not info["unexpected_keys"]
        assert model.config.hidden_size == 48 and model.config.num_hidden_layers == 3
