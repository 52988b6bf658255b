"""Issue 10's acceptance test: the README's pipeline, command by command, on the tiny fixtures.

plan -> prune (``composer train.py yamls/testing/prune_tiny.yaml``, 300 steps so the gate passes on its
own) -> export (as README step 4 writes it, without ``--data``: the loss half of the gate runs on the run's
own eval split; ``--gguf``) -> evaluate (per-domain loss on the held-out split) -> report over the run, the
export and the results. Every step is a subprocess, as a
person would type it; the report must show the export's shape and parameter count and the evaluation's
numbers, read back from the files the earlier steps wrote.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def _run(line: str, timeout: int = 600) -> str:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
    }
    proc = subprocess.run(
        shlex.split(line), cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{line}\n{output[-4000:]}"
    return output


def test_readme_pipeline_plan_prune_export_evaluate_report(tmp_path, tiny_gqa_dir, tiny_data):
    run, out, report = tmp_path / "run", tmp_path / "out", tmp_path / "report"
    variables = f"variables.source_model={tiny_gqa_dir} variables.data_local={tiny_data}"

    plan = _run(f"python -m shearing.plan yamls/testing/prune_tiny.yaml {variables}")
    assert "parameters" in plan

    _run(f"composer train.py yamls/testing/prune_tiny.yaml {variables} variables.save_folder={run}")
    assert (run / "latest-rank0.pt").exists()

    exported = _run(f"python -m shearing.export --checkpoint {run} --output {out / 'x'} --gguf")
    assert "convergence gate passed" in exported
    assert f"on the run's eval split {tiny_data.resolve() / 'eval'}" in exported
    summary = json.loads((out / "x" / "shearing_export.json").read_text())
    assert summary["gate"]["eval_loss"] is not None
    target = summary["target"]
    assert target["hidden_size"] == 48 and target["num_hidden_layers"] == 3
    assert (out / "x" / "model.gguf").is_file() and (out / "x" / "README.md").is_file()

    _run(
        f"python -m shearing.evaluate --model {out / 'x'} --data {tiny_data / 'eval'} "
        f"--output {out / 'results.json'} --no-progress"
    )
    results = json.loads((out / "results.json").read_text())

    _run(f"python -m shearing.report {run} {out / 'x'} {out / 'results.json'} --output {report}")
    text = (report / "report.md").read_text()
    assert "| x (export) | export |" in text
    assert f"x (export) ({out / 'x' / 'shearing_export.json'}): gate passed" in text  # its gate section
    source = summary["source"]
    for field in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "num_params",
    ):
        assert f"| {field} | {source[field]:,} | {target[field]:,} |" in text, field
    assert set(results["domains"]) == {"code", "docs"}
    for domain, numbers in results["domains"].items():
        assert f"| {domain} | {numbers['loss']:.4f} (ppl {numbers['perplexity']:.2f}) |" in text, domain
    assert f"| average loss | {results['average_loss']:.4f} |" in text
