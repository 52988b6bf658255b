"""``make demo``: the whole pipeline end to end on text that ships with the machine.

    python -m shearing.demo --output demo_out [--device cpu|gpu] [--scale 1.0]

1. corpus: three real-text domains found on any Linux machine with Python — ``code`` (the standard
   library's sources), ``docs`` (Python's own documentation topics and module docstrings) and ``legal``
   (license texts under /usr/share and of the installed packages);
2. a byte-level BPE tokenizer trained on it, and ``tokenize_domains`` into MDS train/eval splits;
3. the "large" source model pre-trained from scratch (``yamls/demo/source.yaml``);
4. its per-domain eval losses as the reference losses for dynamic batch loading;
5. pruning to an exact smaller shape with dynamic batch loading (``yamls/demo/prune.yaml``), exported;
6. continued pre-training of the pruned model (``yamls/demo/cpt.yaml``), exported;
7. per-domain evaluation of source, pruned and continued models, and a report.

It checks the bar a user expects (the source learned — its loss is clearly below a random model's —,
the pruned model has exactly the target shape, continued pre-training lowered the pruned model's loss)
and exits non-zero if any fails. ``--device gpu`` runs the same recipe on a GPU with bf16 and
``--scale`` multiplies the number of training steps of every stage.
"""

from __future__ import annotations

import argparse
import ast
import json
import math
import sys
import sysconfig
import time
from pathlib import Path
from typing import Any

from shearing.io import write_json_atomic

REPO = Path(__file__).resolve().parents[2]
YAMLS = REPO / "yamls" / "demo"
VOCAB = 2048
SEQ_LEN = 128
DOMAIN_BUDGET = 1_200_000  # characters of raw text per domain


def _take(texts, budget: int, low: int = 200) -> list[str]:
    """Texts of at least ``low`` characters, in order, duplicates dropped, until ``budget`` characters (lazy:
    the sources are read only as far as needed)."""
    out, used, seen = [], 0, set()
    for text in texts:
        if text in seen:
            continue
        seen.add(text)
        if len(text) >= low:
            out.append(text)
            used += len(text)
            if used >= budget:
                break
    return out


def _code_texts():
    for path in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
        if "test" not in path.parts and "idlelib" not in path.parts:
            yield path.read_text(encoding="utf-8", errors="ignore")


def docstrings(paths):
    """The module, class and function docstrings longer than 200 characters of Python files, in order."""
    for path in paths:
        try:
            tree = ast.parse(path.read_text(encoding="utf-8", errors="ignore"))
        except (SyntaxError, ValueError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 200:
                    yield doc


def _docs_texts():
    try:
        from pydoc_data.topics import topics

        yield from topics.values()
    except ImportError:
        pass
    yield from docstrings(sorted(Path(sysconfig.get_paths()["stdlib"]).glob("*.py")))


def _legal_texts():
    roots = [
        Path("/usr/share/common-licenses"),
        Path("/usr/share/doc"),
        Path(sysconfig.get_paths()["purelib"]),
    ]
    for root in roots:
        if not root.is_dir():
            continue
        for path in sorted(root.rglob("*")):
            name = path.name.upper()
            if path.is_file() and (
                name.startswith(("LICENSE", "COPYING", "COPYRIGHT")) or root.name == "common-licenses"
            ):
                try:
                    yield path.read_text(encoding="utf-8")
                except (UnicodeDecodeError, OSError):
                    continue


def write_jsonl(path: Path, texts: list[str]) -> None:
    """``{"text": ...}`` per line, written to a temporary file and moved into place."""
    tmp = path.with_name(f".{path.name}.tmp")
    with open(tmp, "w") as f:
        for text in texts:
            f.write(json.dumps({"text": text}) + "\n")
    tmp.replace(path)


def build_corpus(raw: Path, budget: int = DOMAIN_BUDGET) -> dict[str, int]:
    """Write ``raw/<domain>.jsonl`` for the three demo domains; returns documents per domain."""
    raw.mkdir(parents=True, exist_ok=True)
    counts = {}
    for name, texts in (("code", _code_texts()), ("docs", _docs_texts()), ("legal", _legal_texts())):
        docs = _take(texts, budget)
        if len(docs) < 20:
            raise RuntimeError(
                f"demo corpus: found only {len(docs)} documents for domain {name!r} on this machine"
            )
        write_jsonl(raw / f"{name}.jsonl", docs)
        counts[name] = len(docs)
    return counts


def _train(yaml: str, overrides: list[str]):
    from shearing.train import train_from_yaml

    return train_from_yaml(str(YAMLS / yaml), overrides)


def _evaluate(
    model_dir: Path, data: Path, device: str, run_dir: Path, speed_baseline: Path | None = None
) -> dict:
    """Per-domain eval (and, against a baseline, inference speed) of an export; writes run_dir/results.json."""
    from shearing.evaluate import EvalOptions, evaluate

    options = EvalOptions(
        model=str(model_dir),
        data=str(data / "eval"),
        speed_baseline=str(speed_baseline) if speed_baseline else None,
        prompt_len=64,
        new_tokens=32,
        batch_size=16,
        speed_max_seconds=60.0,  # the demo's models are tiny: a minute of interleaved trials is plenty
        device="cuda" if device == "gpu" else "cpu",
        progress=False,
    )
    result = evaluate(options)
    write_json_atomic(run_dir / "results.json", result)
    return result


def run_demo(output: Path, device: str = "cpu", scale: float = 1.0) -> dict[str, Any]:
    from shearing.data.prep import PrepConfig, prepare
    from shearing.data.tokenizer import train_bpe_tokenizer
    from shearing.models.shapes import named_shape

    start = time.time()
    output = output.resolve()
    raw, data, runs = output / "raw", output / "data", output / "runs"
    timings: dict[str, float] = {}

    def lap(name: str, t0: float) -> None:
        timings[name] = round(time.time() - t0, 1)
        print(f"[demo] {name}: {timings[name]:.0f} s", flush=True)

    t0 = time.time()
    documents = build_corpus(raw)
    tokenizer = output / "tokenizer"
    if not (tokenizer / "tokenizer.json").is_file():
        train_bpe_tokenizer(raw, VOCAB, tokenizer, progress=False)
    prepare(
        PrepConfig(input=raw, tokenizer=str(tokenizer), output=data, seq_len=SEQ_LEN, eval_seqs=32, workers=2)
    )
    lap("data", t0)

    common = [f"variables.data_local={data}"]
    if device == "gpu":
        common += ["device=gpu", "precision=amp_bf16"]

    def steps(n: int) -> str:
        return f"variables.max_duration={max(10, int(n * scale))}ba"

    t0 = time.time()
    _train(
        "source.yaml",
        [*common, f"variables.tokenizer={tokenizer}", f"variables.save_folder={runs / 'source'}", steps(400)],
    )
    lap("pre-train source", t0)

    t0 = time.time()
    source_eval = _evaluate(runs / "source" / "hf", data, device, runs / "source")
    reference = {name: d["loss"] for name, d in source_eval["domains"].items()}
    ref_file = output / "reference_losses.json"
    write_json_atomic(ref_file, {"reference_losses": reference, "source": "demo source model"})
    lap("reference losses", t0)

    t0 = time.time()
    _train(
        "prune.yaml",
        [
            *common,
            f"variables.source_model={runs / 'source' / 'hf'}",
            f"variables.save_folder={runs / 'prune'}",
            f"variables.reference_losses={ref_file}",
            steps(200),
        ],
    )
    lap("prune", t0)

    t0 = time.time()
    pruned_eval = _evaluate(runs / "prune" / "hf", data, device, runs / "prune")
    pruned_losses = {name: d["loss"] for name, d in pruned_eval["domains"].items()}
    _train(
        "cpt.yaml",
        [
            *common,
            f"variables.source_model={runs / 'prune' / 'hf'}",
            f"variables.prune_run={runs / 'prune'}",
            f"variables.save_folder={runs / 'cpt'}",
            f"variables.reference_losses={ref_file}",
            steps(300),
        ],
    )
    lap("continued pre-training", t0)

    t0 = time.time()
    cpt_eval = _evaluate(
        runs / "cpt" / "hf", data, device, runs / "cpt", speed_baseline=runs / "source" / "hf"
    )
    cpt_losses = {name: d["loss"] for name, d in cpt_eval["domains"].items()}
    report_dir = output / "report"
    from shearing.report import main as report_main

    report_main([str(runs / "source"), str(runs / "prune"), str(runs / "cpt"), "--output", str(report_dir)])
    lap("evaluate and report", t0)

    export = json.loads((runs / "prune" / "hf" / "shearing_export.json").read_text())
    target = named_shape("demo_pruned").prunable()
    summary = {
        "documents": documents,
        "losses": {"source": reference, "pruned": pruned_losses, "continued": cpt_losses},
        "random_model_loss": math.log(VOCAB),
        "shapes": {"source": export["source"], "pruned": export["target"]},
        "target": target,
        "timings_s": timings,
        "speed": cpt_eval.get("speed", {}),
        "report": str(report_dir / "report.html"),
    }
    checks = {
        "source learned (loss < 0.7 x random)": all(v < 0.7 * math.log(VOCAB) for v in reference.values()),
        "pruned model has exactly the target shape": all(export["target"][k] == v for k, v in target.items()),
        "continued pre-training lowered the loss": all(cpt_losses[d] < pruned_losses[d] for d in cpt_losses),
    }
    summary["checks"] = checks
    summary["wall_time_s"] = round(time.time() - start, 1)
    write_json_atomic(output / "demo_summary.json", summary)
    return summary


def speed_line(speed: dict[str, Any]) -> str:
    """``prefill 1.93x [1.80-2.05], decode 2.10x [1.95-2.31] (median [min-max] over 7 trials)``."""
    parts = []
    for phase in ("prefill", "decode"):
        text = f"{phase} {speed[f'{phase}_speedup']:.2f}x"
        stats = speed.get(f"{phase}_speedup_stats")
        if stats:
            text += f" [{stats['min']:.2f}-{stats['max']:.2f}]"
        parts.append(text)
    trials = speed.get("trials")
    return ", ".join(parts) + (f" (median [min-max] over {trials} trials)" if trials else "")


def print_summary(summary: dict[str, Any], output: Path) -> None:
    losses = summary["losses"]
    print("\nper-domain eval loss (random model: {:.2f})".format(summary["random_model_loss"]))
    print(f"{'domain':<10}{'source':>10}{'pruned':>10}{'continued':>11}")
    for domain in losses["source"]:
        print(
            f"{domain:<10}{losses['source'][domain]:>10.3f}{losses['pruned'][domain]:>10.3f}{losses['continued'][domain]:>11.3f}"
        )
    src, dst = summary["shapes"]["source"], summary["shapes"]["pruned"]
    print(f"\nparameters: source {src['num_params']:,} -> pruned {dst['num_params']:,}")
    for check, ok in summary["checks"].items():
        print(f"[{'PASS' if ok else 'FAIL'}] {check}")
    speed = summary.get("speed") or {}
    if speed:
        print(f"inference, pruned+continued vs source: {speed_line(speed)}")
        if speed.get("warning"):
            print(f"  warning: {speed['warning']}")
    print(f"\nwall time {summary['wall_time_s']:.0f} s")
    print(f"final model: {output / 'runs' / 'cpt' / 'hf'}")
    print(f"report:      {summary['report']}")
    print(f"summary: {output / 'demo_summary.json'}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shearing.demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--output", default="demo_out", type=Path)
    parser.add_argument("--device", default="cpu", choices=["cpu", "gpu"])
    parser.add_argument("--scale", default=1.0, type=float, help="multiply every stage's training steps")
    args = parser.parse_args(argv)
    summary = run_demo(args.output, device=args.device, scale=args.scale)
    print_summary(summary, args.output)
    return 0 if all(summary["checks"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
