"""lm-eval-harness on an already-loaded model: ``lm_eval:task1,task2`` in, ``{task: {metric: value}}`` out.

The model goes in through lm-eval's own HF class (``HFLM(pretrained=<model>, tokenizer=<tokenizer>)``),
so prompts, few-shot sampling and scoring are the harness's, not ours. Task data comes from wherever
the task's yaml says: the harness's bundled tasks download from the Hugging Face hub on first use, and
``include_path`` adds local task yamls (e.g. ``dataset_path: json`` with ``dataset_kwargs.data_files``)
for machines without hub access. lm-eval is imported only when tasks are requested (it is slow to
import and an optional part of the workflow).

Metric keys drop lm-eval's filter suffix when it is the default ``none`` (``acc,none`` -> ``acc``,
``acc_stderr,none`` -> ``acc_stderr``); other filters are kept after a slash
(``exact_match,strict-match`` -> ``exact_match/strict-match``). Non-numeric entries are left out.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

TASK_PREFIXES = ("lm_eval",)


def parse_tasks(spec: str) -> dict[str, list[str]]:
    """``"lm_eval:hellaswag,arc_easy"`` -> ``{"lm_eval": ["hellaswag", "arc_easy"]}``."""
    prefix, sep, names = spec.partition(":")
    if not sep or prefix not in TASK_PREFIXES:
        raise ValueError(
            f"--tasks {spec!r} must start with a known prefix ({', '.join(p + ':' for p in TASK_PREFIXES)}), "
            f"e.g. lm_eval:hellaswag,arc_easy"
        )
    tasks = [name.strip() for name in names.split(",") if name.strip()]
    if not tasks:
        raise ValueError(f"--tasks {spec!r} names no task after {prefix}:")
    return {prefix: tasks}


def flatten_metrics(results: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, float]]:
    """lm-eval's ``results`` table -> ``{task: {metric: value}}`` (numeric metrics only)."""
    out: dict[str, dict[str, float]] = {}
    for task, row in results.items():
        metrics = {}
        for key, value in row.items():
            metric, sep, filter_name = key.partition(",")
            if not sep or isinstance(value, bool) or not isinstance(value, int | float):
                continue
            metrics[metric if filter_name == "none" else f"{metric}/{filter_name}"] = float(value)
        out[task] = metrics
    return out


def run_lm_eval(
    model: Any,
    tokenizer: Any,
    tasks: Sequence[str],
    num_fewshot: int | None = None,
    limit: int | float | None = None,
    batch_size: int = 8,
    include_path: str | os.PathLike | None = None,
    include_defaults: bool = True,
) -> dict[str, dict[str, float]]:
    """Run lm-eval-harness ``tasks`` on a loaded HF causal LM; ``{task: {metric: value}}``.

    ``include_path`` is a folder of extra task yamls; ``include_defaults=False`` indexes only those
    (lm-eval scans its ~14k bundled task yamls otherwise, several seconds on a small machine).
    """
    try:
        import lm_eval
        from lm_eval.models.huggingface import HFLM
        from lm_eval.tasks import TaskManager
    except ImportError as err:
        raise ValueError(
            f"--tasks lm_eval:... needs lm-eval-harness ({err}): pip install 'lm-eval[hf]'"
        ) from err
    if num_fewshot is not None and num_fewshot < 0:
        raise ValueError(f"--num-fewshot must be 0 or more, got {num_fewshot}")
    if limit is not None and limit <= 0:
        raise ValueError(f"--limit must be positive, got {limit}")
    if include_path is None and not include_defaults:
        raise ValueError("--local-tasks-only needs --include-path with the local task yamls")
    manager = TaskManager(
        include_path=str(include_path) if include_path is not None else None,
        include_defaults=include_defaults,
    )
    unknown = [task for task in tasks if task not in manager.all_tasks]
    if unknown:
        raise ValueError(
            f"unknown lm-eval task(s) {', '.join(unknown)}: see `lm_eval ls tasks`"
            + ("" if include_path else ", or pass --include-path for local task yamls")
        )
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    output = lm_eval.simple_evaluate(
        model=lm,
        tasks=list(tasks),
        num_fewshot=num_fewshot,
        limit=limit,
        task_manager=manager,
        log_samples=False,
    )
    return flatten_metrics(output["results"])
