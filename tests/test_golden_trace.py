"""Refactors must not change the numbers: prune_tiny's per-step losses are bit-identical to the golden trace.

``tests/golden/prune_tiny_trace.json`` was recorded before the model-family/mask seam redesign; the run is
rebuilt from seeds in a fresh one-thread process (``tests/golden/prune_tiny_trace.py``).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

GOLDEN_DIR = Path(__file__).parent / "golden"


def test_prune_tiny_loss_trace_is_bit_identical_to_golden(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(GOLDEN_DIR / "prune_tiny_trace.py"), str(tmp_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    trace = json.loads(done.stdout.strip().splitlines()[-1])
    golden = json.loads((GOLDEN_DIR / "prune_tiny_trace.json").read_text())
    assert len(trace) == len(golden) == 301
    for got, want in zip(trace, golden, strict=True):
        assert got == want, f"step {want['step']}: got {got}, golden {want}"
