"""Run a long Python script from a test so that a hang says where it hung.

``subprocess.run(..., timeout=...)`` kills only the direct child and reports the little it had flushed: a
script whose stdout is a pipe is block-buffered, so a hang shows nothing. ``run_python`` starts the
script unbuffered with faulthandler enabled, in its own process group; when the timeout passes it sends
SIGABRT (faulthandler prints every thread's Python stack to stderr), then kills the whole group (pool
workers and launcher children included, so nothing is left running into later tests) and fails with the
stack and the end of both streams.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import pytest


def run_python(args: list[str], timeout: float, **kwargs) -> subprocess.CompletedProcess:
    """``python args...`` with captured text output, like ``subprocess.run``; fails the test on timeout."""
    env = {**(kwargs.pop("env", None) or os.environ), "PYTHONUNBUFFERED": "1", "PYTHONFAULTHANDLER": "1"}
    cmd = [sys.executable, *[str(a) for a in args]]
    proc = subprocess.Popen(
        cmd,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        start_new_session=True,
        **kwargs,
    )
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _signal_group(proc, signal.SIGABRT)
        try:
            out, err = proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(proc, signal.SIGKILL)
            out, err = proc.communicate()
        _signal_group(proc, signal.SIGKILL)  # the workers it started, if they outlived it
        pytest.fail(
            f"{' '.join(cmd)} did not finish in {timeout:.0f} s; its stacks and output at that moment:\n"
            f"--- stderr (end) ---\n{err[-12000:]}\n--- stdout (end) ---\n{out[-4000:]}",
            pytrace=False,
        )
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass
