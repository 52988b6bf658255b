"""Evaluate a Hugging Face checkpoint: per-domain loss, lm-eval-harness tasks, inference speed.

    python -m shearing.evaluate --model HF_DIR --data DATA_DIR/eval --output results.json [--max-seqs N]
    python -m shearing.evaluate --model HF_DIR --tasks lm_eval:hellaswag,arc_easy [--num-fewshot K] \
        [--limit N] [--include-path TASK_YAMLS] --output results.json
    python -m shearing.evaluate --model PRUNED_DIR --speed-baseline SOURCE_DIR --output speed.json \
        [--prompt-len 512 --new-tokens 128 --batch-size 1 --repeats 5 --speed-tolerance 0.1 \
         --speed-max-seconds 300]

Any combination of ``--data``, ``--tasks`` and ``--speed-baseline`` runs in one call on one loaded model.
``results.json`` (written atomically: a temporary file renamed into place):

    {"model": str,
     "domains": {name: {"loss": float, "perplexity": float, "tokens": int}},   # with --data
     "average_loss": float,                                                    # with --data
     "tasks": {task: {metric: value}},                                         # with --tasks
     "speed": {...}}                                                           # with --speed-baseline

``speed`` (``shearing.evaluation.speed.compare_speed``): model and baseline are timed in interleaved
trials until every rate's IQR / median is within ``--speed-tolerance`` (after at least ``--repeats``
trials) or ``--speed-max-seconds`` pass; it holds ``model``/``baseline`` (median tokens/s and, under
``prefill``/``decode``, median, min, max, quartiles, spread and trials), ``prefill_speedup`` /
``decode_speedup`` (median per-trial ratio) with ``*_speedup_stats``, ``trials``, ``stopped``,
``spread_ok`` and ``warning`` (a sentence when the numbers stayed noisy, else null). Progress lines
(``speed trial k: model prefill x tok/s decode y tok/s``) go to stderr.

``average_loss`` is the unweighted mean over domains; ``tokens`` counts predicted positions. The pieces
are plain functions in ``shearing.evaluation`` (``domains``, ``harness``, ``speed``); this module is the
command line and the orchestration.

Everything the request names is checked before a model loads (``check_options``, and ``--output``), and
each model as it loads (``load_model``: a folder that does not load, or holds non-finite weights): a refused
input is one message naming the flag or path and the fix, and exit 2 (``shearing.refusals``); an error
during the evaluation itself keeps its traceback.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shearing.checkpoints import check_writable_output
from shearing.evaluation.harness import parse_tasks
from shearing.evaluation.loading import check_hf_dir
from shearing.io import write_json_atomic
from shearing.refusals import exit_on_refusal, refusing

DEFAULT_BATCH = 8  # sequences per forward for --data and --tasks
DEFAULT_SPEED_BATCH = 1  # prompts per generate for --speed-baseline


@dataclass
class EvalOptions:
    """What to evaluate; mirrors the command line (``None`` batch size: the per-mode default)."""

    model: str
    data: str | None = None
    tasks: str | None = None
    speed_baseline: str | None = None
    tokenizer: str | None = None
    batch_size: int | None = None
    max_seqs: int | None = None
    num_fewshot: int | None = None
    limit: int | float | None = None
    include_path: str | None = None
    local_tasks_only: bool = False
    prompt_len: int = 512
    new_tokens: int = 128
    repeats: int = 5
    speed_tolerance: float = 0.1
    speed_max_seconds: float = 300.0
    dtype: str = "auto"
    device: str | None = None
    progress: bool = True


def check_options(options: EvalOptions) -> dict[str, list[str]]:
    """Validate the request before any model is loaded; returns the parsed ``--tasks``."""
    if not (options.data or options.tasks or options.speed_baseline):
        raise ValueError(
            "nothing to evaluate: give --data DATA_DIR/eval, --tasks lm_eval:TASK,... or --speed-baseline HF_DIR"
        )
    if options.batch_size is not None and options.batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {options.batch_size}")
    check_hf_dir(options.model, "--model")
    if options.speed_baseline:
        check_hf_dir(options.speed_baseline, "--speed-baseline")
    if options.data and not Path(options.data).is_dir():
        raise ValueError(f"--data {options.data} is not a folder: point it at DATA_DIR/eval")
    if options.data:
        from shearing.data.compat import check_model_dir_data

        check_model_dir_data(options.data, options.model, options.tokenizer)  # data tokenizer == model's
    if options.speed_baseline:
        if options.repeats < 1:
            raise ValueError(f"--repeats must be at least 1 (minimum speed trials), got {options.repeats}")
        if not options.speed_tolerance > 0:
            raise ValueError(
                f"--speed-tolerance must be > 0 (e.g. 0.1 = 10% spread), got {options.speed_tolerance}"
            )
        if not options.speed_max_seconds > 0:
            raise ValueError(f"--speed-max-seconds must be > 0, got {options.speed_max_seconds}")
        if options.new_tokens < 2:
            raise ValueError(f"--new-tokens must be at least 2 to time decoding, got {options.new_tokens}")
    return parse_tasks(options.tasks) if options.tasks else {}


def evaluate(options: EvalOptions) -> dict[str, Any]:
    """Run everything ``options`` asks for on one loaded model; the results.json mapping."""
    import torch

    from shearing.evaluation.loading import default_device, load_model, load_tokenizer, resolve_dtype

    with refusing():  # the request before any model loads, then the model (a non-finite one is refused)
        tasks = check_options(options)
        device = torch.device(options.device) if options.device else default_device()
        dtype = resolve_dtype(options.dtype, device)
        model = load_model(options.model, device, dtype, "--model")
    result: dict[str, Any] = {"model": str(options.model)}
    if options.data:
        from shearing.evaluation.domains import domain_results

        result["domains"], result["average_loss"] = domain_results(
            model, options.data, options.batch_size or DEFAULT_BATCH, options.max_seqs, options.progress
        )
    if tasks:
        from shearing.evaluation.harness import run_lm_eval

        tokenizer = load_tokenizer(options.tokenizer or options.model)
        result["tasks"] = run_lm_eval(
            model,
            tokenizer,
            tasks["lm_eval"],
            num_fewshot=options.num_fewshot,
            limit=options.limit,
            batch_size=options.batch_size or DEFAULT_BATCH,
            include_path=options.include_path,
            include_defaults=not options.local_tasks_only,
        )
    if options.speed_baseline:
        from shearing.evaluation.speed import compare_speed

        with refusing():
            baseline = load_model(options.speed_baseline, device, dtype, "--speed-baseline")
        speed = compare_speed(
            model,
            baseline,
            prompt_len=options.prompt_len,
            new_tokens=options.new_tokens,
            batch_size=options.batch_size or DEFAULT_SPEED_BATCH,
            repeats=options.repeats,
            tolerance=options.speed_tolerance,
            max_seconds=options.speed_max_seconds,
            progress=(lambda line: print(line, file=sys.stderr, flush=True)) if options.progress else None,
        )
        if speed["warning"]:
            print(f"warning: {speed['warning']}", file=sys.stderr)
        result["speed"] = {"baseline_model": str(options.speed_baseline), **speed}
        del baseline
    return result


def _columns(rows: list[list[str]]) -> list[str]:
    """Rows of cells as lines: the first column left-aligned, the others right-aligned, every column as
    wide as its widest cell plus two spaces (so large numbers never run into each other)."""
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(max(map(len, rows)))]
    lines = []
    for row in rows:
        cells = [c.ljust(widths[0]) if i == 0 else c.rjust(widths[i] + 2) for i, c in enumerate(row)]
        lines.append("".join(cells).rstrip())
    return lines


def _rate(stats: dict[str, Any] | None, median: float) -> str:
    if not stats or stats.get("trials", 1) < 2:
        return f"{median:,.1f}"
    return f"{median:,.1f} ±{stats['spread']:.0%}"


def format_summary(result: dict[str, Any]) -> str:
    """A short human-readable table of ``result`` (column widths follow the values)."""
    lines = []
    if "domains" in result:
        rows = [["domain", "loss", "ppl", "tokens"]]
        for name, row in result["domains"].items():
            rows.append([name, f"{row['loss']:.4f}", f"{row['perplexity']:,.2f}", f"{row['tokens']:,}"])
        rows.append(["average", f"{result['average_loss']:.4f}"])
        lines += _columns(rows)
    for task, metrics in result.get("tasks", {}).items():
        lines.append(f"{task}: " + ", ".join(f"{k}={v:.4f}" for k, v in metrics.items()))
    if "speed" in result:
        speed = result["speed"]
        rows = [["speed (median ±IQR/median)", "prefill tok/s", "decode tok/s"]]
        for who in ("model", "baseline"):
            row = speed[who]
            rows.append(
                [
                    who,
                    _rate(row.get("prefill"), row["prefill_tokens_per_s"]),
                    _rate(row.get("decode"), row["decode_tokens_per_s"]),
                ]
            )
        ratio = []
        for phase in ("prefill", "decode"):
            stats = speed.get(f"{phase}_speedup_stats")
            text = f"{speed[f'{phase}_speedup']:.2f}x"
            if stats and stats.get("trials", 1) > 1:
                text += f" [{stats['min']:.2f}-{stats['max']:.2f}]"
            ratio.append(text)
        rows.append(["speedup [min-max]", *ratio])
        lines += _columns(rows)
        if "trials" in speed:
            lines.append(f"{speed['trials']} interleaved trials per model, stopped: {speed['stopped']}")
        if speed.get("warning"):
            lines.append(f"warning: {speed['warning']}")
    return "\n".join(lines)


def _limit(text: str) -> int | float:
    value = float(text)
    return int(value) if value >= 1 and value.is_integer() else value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m shearing.evaluate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True, help="HF model folder to evaluate")
    parser.add_argument("--output", required=True, type=Path, help="results.json to write")
    parser.add_argument("--data", help="DATA_DIR/eval: per-domain loss and perplexity")
    parser.add_argument("--tasks", help="lm-eval-harness tasks: lm_eval:hellaswag,arc_easy,...")
    parser.add_argument("--speed-baseline", help="HF model folder to compare inference speed against")
    parser.add_argument("--tokenizer", help="tokenizer folder for --tasks (default: the --model folder)")
    parser.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help=f"sequences per forward ({DEFAULT_BATCH}) for --data/--tasks; prompts per generate "
        f"({DEFAULT_SPEED_BATCH}) for --speed-baseline",
    )
    parser.add_argument("--max-seqs", type=int, default=None, help="at most this many sequences per domain")
    parser.add_argument("--num-fewshot", type=int, default=None, help="few-shot examples (task default)")
    parser.add_argument("--limit", type=_limit, default=None, help="examples per task (a fraction if < 1)")
    parser.add_argument("--include-path", help="folder of extra lm-eval task yamls (local data)")
    parser.add_argument(
        "--local-tasks-only",
        action="store_true",
        help="index only --include-path tasks, not lm-eval's bundled ones (faster start)",
    )
    parser.add_argument("--prompt-len", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument(
        "--repeats", type=int, default=5, help="speed: at least this many interleaved trials per model"
    )
    parser.add_argument(
        "--speed-tolerance",
        type=float,
        default=0.1,
        help="speed: stop once every rate's IQR / median is at most this (default 0.1)",
    )
    parser.add_argument(
        "--speed-max-seconds",
        type=float,
        default=300.0,
        help="speed: stop the trials after this many seconds even if still noisy (default 300)",
    )
    parser.add_argument("--dtype", default="auto", help="auto (bfloat16 on CUDA, else float32), float32, ...")
    parser.add_argument("--device", default=None, help="cuda, cpu, cuda:1 ... (default: cuda if available)")
    parser.add_argument("--no-progress", action="store_true")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    options = EvalOptions(
        model=args.model,
        data=args.data,
        tasks=args.tasks,
        speed_baseline=args.speed_baseline,
        tokenizer=args.tokenizer,
        batch_size=args.batch_size,
        max_seqs=args.max_seqs,
        num_fewshot=args.num_fewshot,
        limit=args.limit,
        include_path=args.include_path,
        local_tasks_only=args.local_tasks_only,
        prompt_len=args.prompt_len,
        new_tokens=args.new_tokens,
        repeats=args.repeats,
        speed_tolerance=args.speed_tolerance,
        speed_max_seconds=args.speed_max_seconds,
        dtype=args.dtype,
        device=args.device,
        progress=not args.no_progress,
    )
    with exit_on_refusal("the evaluation"):
        with refusing():  # before the model loads: a bad --output must not cost the whole evaluation
            check_writable_output(args.output, "--output")
        result = evaluate(options)  # checks the rest of the request first (check_options)
    write_json_atomic(args.output, result)
    print(format_summary(result))
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
