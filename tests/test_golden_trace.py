"""Refactors must not change the numbers: prune_tiny's per-step losses are bit-identical to the golden trace.

``tests/golden/prune_tiny_trace.json`` is the trace of the code *before* the model-family/mask seam redesign
(commit 43784f5), recorded with the kernels pinned so that it holds on any x86-64 CPU; the run is rebuilt from
seeds in a fresh one-thread process (``tests/golden/prune_tiny_trace.py``, whose docstring says why the pins).
"""

import json
import platform
from pathlib import Path

import pytest
from subproc import run_python

GOLDEN_DIR = Path(__file__).parent / "golden"


@pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"), reason="the golden trace is recorded for x86-64 kernels"
)
def test_prune_tiny_loss_trace_is_bit_identical_to_golden(tmp_path):
    done = run_python([GOLDEN_DIR / "prune_tiny_trace.py", tmp_path], timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    trace = json.loads(done.stdout.strip().splitlines()[-1])
    golden = json.loads((GOLDEN_DIR / "prune_tiny_trace.json").read_text())
    assert len(trace) == len(golden) == 301
    for got, want in zip(trace, golden, strict=True):
        assert got == want, f"step {want['step']}: got {got}, golden {want}"
