"""CPU smoke run of bench/reproduce.py at a tiny scale: every run is trained, evaluated and reported."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
RUNS = ("source", "sheared", "scratch_matched", "scratch_long", "sheared_constant", "oneshot")


def _reproduce():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import reproduce
    finally:
        sys.path.pop(0)
    return reproduce


def test_tokens_to_reach():
    tokens_to_reach = _reproduce().tokens_to_reach
    curve = [(0, 8.0), (100, 6.0), (200, 5.0)]
    assert tokens_to_reach(curve, 7.0) == 50.0
    assert tokens_to_reach(curve, 5.0) == 200.0
    assert tokens_to_reach(curve, 4.0) is None


@pytest.mark.slow
def test_reproduce_smoke(tmp_path):
    out = tmp_path / "bench"
    cmd = [sys.executable, str(REPO / "bench" / "reproduce.py"), "--output", str(out), "--scale", "0.003"]
    cmd += ["--corpus-chars", "200000", "--eval-seqs", "16", "--seq-len", "64", "--batch", "8"]
    # The named demo source pruned to a target given as a mapping (vocabulary and head_dim from the source).
    target = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    target |= {"num_key_value_heads": 1, "intermediate_size": 192}
    cmd += ["--target-shape", json.dumps(target)]
    cmd += ["--extra-seeds", "5"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "reproduce.json").read_text())
    assert set(summary["runs"]) == set(RUNS)
    for name, run in summary["runs"].items():
        assert math.isfinite(run["average_loss"]), name
        assert set(run["domains"]) == {"code", "docs", "prose", "legal"}
        assert run["seconds"] > 0
        assert len(run["curve"]) >= 2, name
    assert summary["tokens_per_step"] == 8 * 64
    for run in ("sheared_cpt", "scratch_matched", "scratch_long", "constant_cpt", "oneshot_cpt"):
        config = json.loads((out / "runs" / run / "hf" / "config.json").read_text())
        assert {k: config[k] for k in target} == target, run
        assert config["vocab_size"] == 2048 and config["head_dim"] == 32, run
    assert summary["runs"]["sheared"]["tokens"] == summary["runs"]["scratch_matched"]["tokens"]
    assert summary["runs"]["oneshot"]["tokens"] == summary["runs"]["scratch_matched"]["tokens"]
    assert "token_ratio" in summary
    seeds = summary["seeds"]
    assert seeds["seeds"] == [17, 5]
    assert set(seeds["runs"]) == {"sheared", "scratch_matched", "sheared_constant", "oneshot"}
    for name, r in seeds["runs"].items():
        assert r["average_loss"][0] == summary["runs"][name]["average_loss"]
        assert r["average_loss"][1] != r["average_loss"][0], name  # another seed, another run
    assert (out / "reproduce.md").is_file()
    assert (out / "reproduce.png").stat().st_size > 10_000
    # Resumable: a second call skips every run and rewrites the same table.
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "done before, skipped" in proc.stdout
    again = json.loads((out / "reproduce.json").read_text())
    assert again["runs"]["sheared"]["average_loss"] == summary["runs"]["sheared"]["average_loss"]

    # --data: a prepared folder (this run's) is used as is, its tokenizer from the manifest.
    reproduce = _reproduce()
    bench = reproduce.Bench(
        tmp_path / "other", 1.0, "demo_source", 0, 16, "cpu", seq_len=64, data=out / "data"
    )
    bench.prepare_data()
    assert bench.data == (out / "data").resolve() and bench.tokenizer == out / "tokenizer"
    assert not (tmp_path / "other" / "raw").exists()
    wrong = reproduce.Bench(
        tmp_path / "other", 1.0, "demo_source", 0, 16, "cpu", seq_len=128, data=out / "data"
    )
    with pytest.raises(SystemExit, match="pass --seq-len 64"):
        wrong.prepare_data()
