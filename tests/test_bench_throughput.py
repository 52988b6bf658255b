"""bench/throughput.py: a CPU smoke run of every section (numbers come from GPU runs; this checks that it runs
and reports every row), the non-uniform model it compares against, and its FLOP and eval-share arithmetic."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from shearing.evaluation.loading import count_parameters
from shearing.evaluation.speed import (
    nonuniform_layer_widths,
    nonuniform_param_count,
    random_llama,
    time_generate,
)
from shearing.models.hf_io import config_from_shape
from shearing.models.shapes import LlamaShape, count_params, named_shape, resolve_target_shape

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
try:
    import throughput
finally:
    sys.path.pop(0)

TINY = [
    *("--device", "cpu", "--shape", "tiny_gqa", "--target", "tiny_gqa_pruned", "--layers", "2"),
    *("--seq-len", "32", "--batch", "2", "--steps", "2", "--warmup", "1", "--attn", "sdpa,flash"),
    *("--cpt-shapes", "tiny_gqa_pruned", "--loader-domain-scale", "0.02"),
    *("--infer-source", "tiny_mha", "--infer-targets", "tiny_mha_pruned"),
    *("--prompt-len", "16", "--new-tokens", "8", "--repeats", "1"),
]


def _numbers(row: dict) -> list[float]:
    out = []
    for value in row.values():
        if isinstance(value, list):
            out += value
        elif isinstance(value, int | float) and not isinstance(value, bool):
            out.append(value)
    return out


def test_every_section_reports_every_row(tmp_path):
    out = tmp_path / "throughput.json"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}  # tiny ops on busy cores: threads only add barrier waits
    cmd = [sys.executable, str(REPO / "bench/throughput.py"), *TINY, "--json", str(out)]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    for table in ("[train]", "[cpt]", "[loader]", "[eval]", "[infer]"):
        assert table in done.stdout
    record = json.loads(out.read_text())
    assert record["command"].startswith("python ") and "--infer-source tiny_mha" in record["command"]
    assert record["device"].startswith("cpu") and record["versions"]["torch"] == torch.__version__
    assert record["versions"]["transformers"]
    sections = record["sections"]
    assert list(sections) == ["train", "cpt", "loader", "infer"]
    for name, section in sections.items():
        assert section["seconds"] > 0, name
        for row in section["rows"]:
            assert all(math.isfinite(x) for x in _numbers(row)), row

    train = sections["train"]["rows"]
    assert [(r["attn"], r.get("step")) for r in train] == [
        ("sdpa", "plain"),
        ("sdpa", "pruning"),
        ("flash", None),
    ]
    assert "not installed" in train[2]["skipped"]  # no flash-attn on CPU
    plain, pruning = train[:2]
    assert pruning["overhead"] == pytest.approx(pruning["step_s"] / plain["step_s"])
    cpt = sections["cpt"]["rows"]
    assert [(r["shape"], r["attn"]) for r in cpt] == [
        ("tiny_gqa_pruned", "sdpa"),
        ("tiny_gqa_pruned", "flash"),
    ]
    for row in (plain, pruning, cpt[0]):
        assert row["step_s"] > 0 and row["tokens_per_s"] == pytest.approx(2 * 32 / row["step_s"])
        assert row["batch"] == 2 and row["mfu"] is None  # no peak FLOP/s for a CPU

    loader = [r for r in sections["loader"]["rows"] if r["table"] == "loader"]
    assert [(r["loader"], r["proportion_update"]) for r in loader] == [
        ("plain StreamingDataset", "none"),
        ("domain mixture", "none"),
        ("domain mixture", "every step"),
    ]
    for row in loader:
        assert row["step_s"] > 0 and row["blocked_s"] > 0 and row["overhead_pct"] > 0
    assert loader[0]["update_s"] is None and loader[2]["update_s"] > 0
    evals = [r for r in sections["loader"]["rows"] if r["table"] == "eval"]
    assert [(r["phase"], r["shape"]) for r in evals] == [("cpt", "tiny_gqa_pruned"), ("pruning", "tiny_gqa")]
    for row in evals:
        assert row["eval_sequences"] == 3500 and row["amortized_pct"] > 0

    infer = sections["infer"]["rows"]
    assert [r["model"] for r in infer] == ["tiny_mha", "tiny_mha_pruned", "non-uniform ~ tiny_mha_pruned"]
    for row in infer:
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
    assert infer[1]["params"] == count_params(named_shape("tiny_mha_pruned"))
    assert infer[2]["params"] == pytest.approx(infer[1]["params"], rel=0.01)
    assert infer[2]["layers"] == 4 and infer[2]["hidden"] == 64  # the source's depth and width


def _plan(source: str, target: str) -> tuple[LlamaShape, int, list]:
    src = named_shape(source)
    goal = count_params(resolve_target_shape(src, target))
    return src, goal, nonuniform_layer_widths(src, goal)


def test_nonuniform_plan_has_the_2p7b_parameter_count_and_ragged_layers():
    source, goal, widths = _plan("llama2_7b", "llama2_2.7b")
    assert len(widths) == 32
    assert nonuniform_param_count(source, widths) == pytest.approx(goal, rel=0.01)
    dense = (32, 32, 11008)
    assert widths[:4] == [dense] * 4 and widths[-2:] == [dense] * 2  # LLM-Pruner keeps these layers
    middle = widths[4:-2]
    assert dense not in middle
    assert len({w[0] for w in middle}) > 1 and len({w[2] for w in middle}) > 1  # widths vary by layer
    assert all(w[2] % 64 for w in middle)  # no MLP width is a multiple of 64
    assert all(w[0] == w[1] for w in widths)  # multi-head attention stays multi-head


@pytest.mark.parametrize("source,target", [("tiny_mha", "tiny_mha_pruned"), ("tiny_gqa", "tiny_gqa_pruned")])
def test_nonuniform_model_builds_runs_and_generates(source, target):
    shape, goal, widths = _plan(source, target)
    model = random_llama(config_from_shape(shape), torch.device("cpu"), torch.float32, widths)
    assert count_parameters(model) == nonuniform_param_count(shape, widths)
    assert count_parameters(model) == pytest.approx(goal, rel=0.01)
    assert len({(w[0], w[2]) for w in widths}) > 1
    for layer, (heads, kv_heads, channels) in zip(model.model.layers, widths):
        assert layer.self_attn.q_proj.out_features == heads * shape.head_dim
        assert layer.self_attn.k_proj.out_features == kv_heads * shape.head_dim
        assert layer.mlp.down_proj.in_features == channels
    calls = []
    for layer in model.model.layers:
        layer.register_forward_hook(lambda module, args, out: calls.append(module))
    ids = torch.randint(0, shape.vocab_size, (2, 12))
    with torch.no_grad():
        logits = model(ids).logits
    assert logits.shape == (2, 12, shape.vocab_size) and torch.isfinite(logits).all()
    assert calls == list(model.model.layers)  # every planned layer runs, once
    assert time_generate(model, ids, 5) > 0  # asserts 5 new tokens per row


def test_nonuniform_plan_refuses_an_unreachable_size():
    with pytest.raises(ValueError, match="no non-uniform model"):
        nonuniform_layer_widths(named_shape("tiny_mha"), 10**9)


def test_flops_per_token_by_hand():
    # tiny_gqa: D 64, L 4, H 8 (G 4), K 16, F 176, V 512, untied. Per layer: q and o 2*64*128, k and v
    # 2*64*64, MLP 3*64*176, norms 2*64 = 58,496; with the final norm and the LM head (the input embedding
    # is a lookup): 4*58,496 + 64 + 512*64 = 266,816 weights, 6 FLOPs each per token. Causal attention at
    # T = 32: 6 * L * T * H * K = 6 * 4 * 32 * 128 = 98,304.
    assert throughput.flops_per_token(named_shape("tiny_gqa"), 32) == 6 * 266_816 + 98_304
    tied = LlamaShape(64, 2, 4, 4, 100, 300, 16, tie_word_embeddings=True)
    # Per layer 4*64*64 + 3*64*100 + 128 = 35,712; the shared matrix is counted once, as the LM head.
    assert throughput.flops_per_token(tied, 10) == 6 * (2 * 35_712 + 64 + 300 * 64) + 6 * 2 * 10 * 64


def test_eval_share_and_out_of_memory_fallback():
    # Pruning: 3,500 eval sequences against 50 x 32 trained ones, a forward a third of a training step.
    assert throughput.eval_share("pruning", forward_s=1.0, step_s=3.0) == pytest.approx(3500 / (1600 * 3))
    assert throughput.eval_share("cpt", forward_s=1.0, step_s=3.0) == pytest.approx(3500 / (400 * 256 * 3))
    tried = []

    def measure(batch):
        tried.append(batch)
        if batch > 2:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory")
        return "ok"

    assert throughput.largest_fitting(measure, 8, torch.device("cpu")) == ("ok", 2)
    assert tried == [8, 4, 2]
    with pytest.raises(torch.cuda.OutOfMemoryError):
        throughput.largest_fitting(lambda batch: measure(batch + 8), 2, torch.device("cpu"))
