"""The export's ``README.md`` (a Hugging Face model card) and its ``generation_config.json``.

The card answers what a person finding the folder needs to know without the run folder: where the
model came from (source path and shape), what it is now (target shape, parameter counts before and
after), how it was made (the data folder, the steps and tokens the checkpoint was trained to, the
command that wrote the export), how good it was at that point (the run's last evaluation from
``metrics.jsonl``: per-domain and average eval loss, at its step) and what the convergence gate
measured (per family sparsity and decidedness, the loss gap and where it was measured, each failed check
of a forced export). A fact that is not known is written as "not recorded", never guessed.

Run facts (``run_facts``) come from the run folder: ``shearing_run.json`` (the training data folder,
the source), ``metrics.jsonl`` (the last step with ``metrics/eval/*`` values) and the checkpoint's
timestamp (batches and tokens). The card is written from ``shearing_export.json``'s summary plus those
facts, so both say the same thing.

``generation_config.json``: the source's own file when the source folder has one (sampling defaults,
stop tokens such as an instruct model's ``<|im_end|>``); otherwise one built from the config's
bos/eos/pad ids, as ``save_pretrained`` would write it.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

from shearing.folders import RUN_RECORD
from shearing.models.shapes import PRUNABLE_FIELDS

log = logging.getLogger(__name__)

EVAL_PREFIX = "metrics/eval/"
METRICS_FILE = "metrics.jsonl"


def last_eval(metrics_file: str | os.PathLike) -> tuple[int | None, dict[str, float]]:
    """``(step, {metric name without the prefix: value})`` of the last evaluation in ``metrics.jsonl``."""
    path = Path(metrics_file)
    if not path.is_file():
        return None, {}
    step, values = None, {}
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue  # a half-written last line of a killed run
        found = {k[len(EVAL_PREFIX) :]: v for k, v in record.items() if k.startswith(EVAL_PREFIX)}
        if not found:
            continue
        if record.get("step") != step:
            step, values = record.get("step"), {}
        values.update({k: float(v) for k, v in found.items() if isinstance(v, int | float)})
    return step, values


def run_facts(
    run_folder: str | os.PathLike | None, step: int | None = None, tokens: int | None = None
) -> dict[str, Any]:
    """What the card says about the run: data folder, steps, tokens seen, last evaluation."""
    facts: dict[str, Any] = {
        "steps": step,
        "tokens": tokens,
        "train_data": None,
        "eval_step": None,
        "eval": {},
    }
    if run_folder is None:
        return facts
    folder = Path(run_folder)
    facts["run_folder"] = str(folder.absolute())
    record_file = folder / RUN_RECORD
    if record_file.is_file():
        try:
            record = json.loads(record_file.read_text())
            facts["train_data"] = record.get("train_data")
        except (json.JSONDecodeError, OSError) as e:
            log.warning("could not read %s for the model card: %s", record_file, e)
    facts["eval_step"], facts["eval"] = last_eval(folder / METRICS_FILE)
    return facts


def write_generation_config(source: str | None, config: Any, dest: Path) -> str:
    """Write ``dest/generation_config.json``; returns where it came from ("source" or "config")."""
    from transformers import GenerationConfig

    if source and (Path(source) / "generation_config.json").is_file():
        GenerationConfig.from_pretrained(source).save_pretrained(dest)
        return "source"
    GenerationConfig.from_model_config(config).save_pretrained(dest)
    return "config"


def _fmt(value: Any) -> str:
    if value is None:
        return "not recorded"
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def model_card(summary: dict[str, Any], facts: dict[str, Any], command: str | None) -> str:
    """The README.md of an export folder (markdown with HF front matter)."""
    from shearing.pruning.gate import describe_gate

    source, target = summary["source"], summary["target"]
    what = "pruned" if summary.get("pruned") else "exported"
    lines = [
        "---",
        "library_name: transformers",
        "tags: [shearing, llama, structured-pruning]" if summary.get("pruned") else "tags: [shearing, llama]",
        "---",
        "",
        f"# LLaMA {what} with shearing: {target['num_params']:,} parameters",
        "",
        f"Source model: `{summary.get('source_path') or 'not recorded'}` ({source['num_params']:,} parameters).",
        "",
        "## Shape",
        "",
        "| | source | target |",
        "|---|---|---|",
    ]
    for name in (*PRUNABLE_FIELDS, "num_params"):
        lines.append(f"| {name} | {source[name]:,} | {target[name]:,} |")
    ratio = target["num_params"] / source["num_params"] if source["num_params"] else float("nan")
    lines += [
        "",
        f"Parameters: {source['num_params']:,} -> {target['num_params']:,} ({ratio:.1%} of the source). "
        f"Weights stored as {summary['dtype']}.",
        "",
        "## Training",
        "",
        f"- data: `{_fmt(facts.get('train_data'))}`",
        f"- steps (batches): {_fmt(facts.get('steps'))}",
        f"- tokens seen: {_fmt(facts.get('tokens'))}",
    ]
    if facts.get("run_folder"):
        lines.append(f"- run folder: `{facts['run_folder']}`")
    lines += ["", "## Evaluation", ""]
    if facts.get("eval"):
        lines += [f"Last evaluation of the run, at step {_fmt(facts.get('eval_step'))}:", ""]
        lines += ["| metric | value |", "|---|---|"]
        lines += [f"| {name} | {value:.4f} |" for name, value in sorted(facts["eval"].items())]
    else:
        lines.append("No evaluation recorded in the run (no `metrics/eval/*` in metrics.jsonl).")
    gate = summary.get("gate")
    if gate is not None:
        verdict = "passed" if gate["passed"] else "FAILED (exported anyway: --force / export.force)"
        lines += ["", f"## Convergence gate: {verdict}", ""]
        lines += [f"- {line}" for line in describe_gate(gate)]
        if gate.get("failures"):
            lines += ["", "Failed checks:", ""] + [f"- {failure}" for failure in gate["failures"]]
    files = ["`config.json`, `model.safetensors`, the tokenizer, `generation_config.json`"]
    if summary.get("gguf"):
        files.append(f"`{summary['gguf']['file']}` (GGUF, {summary['gguf']['file_type']}, for llama.cpp)")
    files.append("`shearing_export.json` (kept indices, gate numbers)")
    lines += ["", "## Files", "", "- " + "\n- ".join(files), "", "## How it was made", ""]
    lines += ["```", command or "not recorded", "```", "", "## Use", "", "```python"]
    lines += [
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        'model = AutoModelForCausalLM.from_pretrained("THIS_FOLDER")',
        'tokenizer = AutoTokenizer.from_pretrained("THIS_FOLDER")',
        "```",
    ]
    return "\n".join(lines) + "\n"
