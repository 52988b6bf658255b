"""bench/peer_speed.py and bench/loader_throughput.py: CPU smoke runs (the numbers come from the README's
measured runs; these check that every comparison runs side by side and reports its ratios and memory)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _run(args: list[str], timeout: int) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run(
        [sys.executable, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.slow
def test_peer_speed_runs_every_comparison_interleaved(tiny_gqa_dir, tmp_path):
    out = tmp_path / "peer.json"
    done = _run(
        [
            "bench/peer_speed.py",
            *("--model", str(tiny_gqa_dir), "--device", "cpu", "--batch", "2", "--seq-len", "32"),
            *("--pairs", "2", "--steps-per-segment", "1", "--warmup", "1", "--profile-steps", "1"),
            *("--memory-steps", "1", "--corpus-chars", "20000", "--work", str(tmp_path / "work")),
            *("--json", str(out)),
        ],
        timeout=900,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    record = json.loads(out.read_text())
    comparisons = {c["name"]: c for c in record["comparisons"]}
    assert set(comparisons) == {"cpt/foundry", "cpt/foundry_sdpa", "prune/cpt", "distill/cpt"}
    for name, comparison in comparisons.items():
        first, second = name.split("/")
        assert len(comparison["pairs"]) == 2
        # interleaved: A B, then B A
        assert [p["order"] for p in comparison["pairs"]] == [[first, second], [second, first]]
        for pair in comparison["pairs"]:
            assert pair["ratio"] == pytest.approx(pair[first]["step_s"] / pair[second]["step_s"])
        assert comparison["min"] <= comparison["median"] <= comparison["max"]
    memory = record["memory"]["trainers"]
    assert set(memory) == {"foundry", "foundry_sdpa", "cpt", "prune", "distill"}
    assert all(m["peak_rss_mb"] > 0 for m in memory.values())
    assert "cpt/foundry" in done.stdout and "median" in done.stdout


def test_loader_throughput_documented_example_is_accepted_and_interleaved(tmp_path, monkeypatch):
    """The docstring's ``--batches 300`` used to exit 2; the largest domain now grows to fit. Interleaved
    rounds: the order reverses every other round and each round gives its own ratio."""
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import loader_throughput as bench
    finally:
        sys.path.pop(0)
    calls = []

    def fake_measure(kind, root, workers, batches, warmup):
        calls.append(kind)
        return {"plain": 100.0, "plain_long": 50.0, "mixture": 45.0, "lag": 0.0}[kind]

    built = {}
    monkeypatch.setattr(bench, "measure", fake_measure)
    monkeypatch.setattr(bench, "build_root", lambda root, domains: built.update(domains))
    out = tmp_path / "loader.json"
    argv = [
        "loader_throughput.py",
        "--batches",
        "300",
        "--workers",
        "0",
        "--repeats",
        "2",
        "--json",
        str(out),
    ]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    assert built["cc"] >= (300 + 10) * bench.BATCH
    assert calls == ["plain", "plain_long", "mixture", "mixture", "plain_long", "plain", "lag"]
    cell = json.loads(out.read_text())["cells"][0]
    assert cell["ratios"]["mixture/plain_long"]["rounds"] == [0.9, 0.9]
    assert cell["ratios"]["mixture/plain"]["median"] == pytest.approx(0.45)
