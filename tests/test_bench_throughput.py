"""CPU smoke test of the throughput benchmark (numbers come from GPU runs; this checks it runs and reports)."""

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_throughput_bench_reports_plain_and_pruning_steps():
    cmd = [
        sys.executable,
        str(REPO / "bench/throughput.py"),
        "--shape",
        "tiny_gqa",
        "--target",
        "tiny_gqa_pruned",
        "--seq-len",
        "32",
        "--batch",
        "2",
        "--steps",
        "2",
        "--warmup",
        "1",
        "--attn",
        "sdpa,flash",
        "--device",
        "cpu",
    ]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    lines = done.stdout.splitlines()
    plain = next(line for line in lines if line.startswith("sdpa") and "plain" in line)
    pruning = next(line for line in lines if line.startswith("sdpa") and "pruning" in line)
    assert float(plain.split()[2].replace(",", "")) > 0
    assert pruning.rstrip().endswith("x")  # the overhead ratio
    assert any(line.startswith("flash") and "skipped" in line for line in lines)  # no flash-attn on CPU
