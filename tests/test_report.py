"""``python -m shearing.report``: synthetic run folders (every input the report reads) and one real tiny run.

The synthetic folders carry a few hundred steps of the metrics our runs log, a dynamic-loading history,
an export summary with the structure of a real tiny pruning (L0 final masks + ``prune_model``) and a
results file; the real one is ``yamls/testing/prune_tiny.yaml`` for 40 batches with the
``metrics_file`` logger and the export at the end.
"""

from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from shearing import report
from shearing.reporting import SECTION_TITLES, build_report

DOMAINS = ["cc", "c4", "github", "book", "wiki", "arxiv", "stackexchange"]
FAMILIES = {"hidden": 0.375, "head": 0.375, "intermediate": 0.372, "layer": 0.0}
PLOT_SECTIONS = SECTION_TITLES[:5]  # the sections that draw figures (the last two are tables)


# ------------------------------------------------------------------------------ synthetic inputs
def write_metrics(path: Path, steps: int = 300, eval_every: int = 50, pruning: bool = True, seed: int = 0):
    """A metrics.jsonl shaped like a pruning run's: several lines per step, as Composer logs them."""
    rng = random.Random(seed)
    warmup = steps // 5
    refs = {d: 2.0 + 0.1 * i for i, d in enumerate(DOMAINS)}
    with open(path, "w") as f:
        for step in range(steps + 1):
            loss = 2.2 + 2.0 * math.exp(-step / 60) + rng.gauss(0, 0.08)
            f.write(json.dumps({"step": step, "time/token": step * 8 * 64.0}) + "\n")
            f.write(
                json.dumps({"step": step, "loss/train/total": loss + 0.01, "loss/train/lm_loss": loss}) + "\n"
            )
            if pruning:
                ramp = min(1.0, step / warmup)
                stats = {}
                for k, (family, target) in enumerate(FAMILIES.items()):
                    stats[f"pruning/expected_sparsity/{family}"] = target * (
                        1 - math.exp(-step / (40 + 10 * k))
                    )
                    stats[f"pruning/target_sparsity/{family}"] = target * ramp
                    stats[f"pruning/lambda_1/{family}"] = -0.5 * math.sin(step / 40) * (k + 1)
                    stats[f"pruning/lambda_2/{family}"] = 0.02 * step * (k + 1)
                stats["pruning/expected_num_params"] = 6.7e9 - 4.0e9 * (1 - math.exp(-step / 50))
                stats["pruning/target_num_params"] = 2701560320.0
                f.write(json.dumps({"step": step, **stats}) + "\n")
            if step and step % eval_every == 0:
                evals = {
                    f"metrics/eval/{d}_LanguageCrossEntropy": refs[d] + 0.5 * math.exp(-step / 100)
                    for d in DOMAINS
                }
                evals["metrics/eval/LanguageCrossEntropy"] = sum(evals.values()) / len(DOMAINS)
                f.write(json.dumps({"step": step, **evals}) + "\n")
    return refs


def write_dynamic_loading(path: Path, refs: dict[str, float], steps: int = 300, eval_every: int = 50):
    weights = {d: 1.0 / len(DOMAINS) for d in DOMAINS}
    history = [{"step": 0, "effective_step": 0, "proportions": dict(weights)}]
    for step in range(eval_every, steps + 1, eval_every):
        raw = {d: w * math.exp(0.3 * (i % 3)) for i, (d, w) in enumerate(weights.items())}
        weights = {d: v / sum(raw.values()) for d, v in raw.items()}
        losses = {d: refs[d] + 0.5 * math.exp(-step / 100) for d in DOMAINS}
        history.append(
            {
                "step": step,
                "effective_step": step + 2,
                "proportions": weights,
                "losses": losses,
                "loss_gaps": {d: losses[d] - refs[d] for d in DOMAINS},
                "eval_tokens": {d: 1000 for d in DOMAINS},
            }
        )
    record = {"domains": DOMAINS, "update": "paper", "reference_losses": refs, "history": history}
    path.write_text(json.dumps(record))


def tiny_export_summary(seed: int = 0) -> dict:
    """The summary ``shearing.export`` writes, with the kept indices of a real tiny pruning."""
    from shearing.models.hf_io import load_source_model
    from shearing.models.shapes import count_params, named_shape, resolve_target_shape
    from shearing.pruning.l0 import L0Module
    from shearing.pruning.surgery import prune_model

    source = named_shape("tiny_gqa")
    target = resolve_target_shape(source, "tiny_gqa_pruned")
    model, _ = load_source_model("tiny_gqa", seed=seed)
    l0 = L0Module(source, target)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for log_alpha in l0.log_alphas.values():
            log_alpha.copy_(torch.rand(log_alpha.shape, generator=generator) * 6 - 2)
    l0.eval()
    l0.use_final_masks = True
    result = prune_model(model.eval(), l0())
    return {
        "source": {**source.to_dict(), "num_params": count_params(source)},
        "target": {**result.shape.to_dict(), "num_params": count_params(result.shape)},
        "dtype": "float32",
        "pruned": True,
        "families": list(l0.specs),
        "kept": result.kept,
    }


def write_results(path: Path, model: str, shift: float = 0.0):
    record = {
        "model": model,
        "domains": {
            d: {"loss": 2.0 + 0.1 * i + shift, "perplexity": math.exp(2.0 + 0.1 * i + shift), "tokens": 4096}
            for i, d in enumerate(DOMAINS)
        },
        "average_loss": 2.3 + shift,
        "tasks": {"hellaswag": {"acc": 0.41 - shift, "acc_norm": 0.52 - shift}, "piqa": {"acc": 0.70}},
        "speed": {"tokens_per_s": 12345.0, "batch_size": 8},
    }
    path.write_text(json.dumps(record))


@pytest.fixture(scope="module")
def synthetic_runs(tmp_path_factory) -> list[Path]:
    root = tmp_path_factory.mktemp("synthetic")
    prune, cpt = root / "prune_2.7b", root / "cpt_2.7b"
    (prune / "hf").mkdir(parents=True)
    refs = write_metrics(prune / "metrics.jsonl")
    write_dynamic_loading(prune / "dynamic_loading.json", refs)
    (prune / "hf" / "shearing_export.json").write_text(json.dumps(tiny_export_summary()))
    write_results(prune / "results.json", "prune_2.7b/hf")
    cpt.mkdir()
    write_metrics(cpt / "metrics.jsonl", steps=240, eval_every=40, pruning=False, seed=1)
    write_dynamic_loading(cpt / "dynamic_loading.json", refs, steps=240, eval_every=40)
    (cpt / "eval").mkdir()
    write_results(cpt / "eval" / "final_results.json", "cpt_2.7b/hf", shift=-0.1)
    return [prune, cpt]


# ------------------------------------------------------------------------------------- checks
def section_html(html: str, title: str) -> str:
    """The HTML between ``<h2>title</h2>`` and the next ``<h2>``."""
    start = html.index(f"<h2>{title}</h2>")
    end = html.find("<h2>", start + 1)
    return html[start : end if end >= 0 else len(html)]


def assert_png_is_a_real_plot(path: Path) -> None:
    assert path.stat().st_size > 10_000, path
    with Image.open(path) as image:
        width, height = image.size
        assert width >= 600 and height >= 250, (path, image.size)
        colors = image.convert("RGB").resize((64, 64)).getcolors(64 * 64)
        assert colors is not None and len(colors) > 20, f"{path} looks blank"


def test_report_of_synthetic_runs_has_every_section_and_plot(synthetic_runs, tmp_path):
    paths = build_report(synthetic_runs, tmp_path / "report")
    html = paths["html"].read_text()
    markdown = paths["markdown"].read_text()
    pngs = sorted((tmp_path / "report" / "figures").glob("*.png"))
    for title in SECTION_TITLES:
        assert f"<h2>{title}</h2>" in html and f"## {title}" in markdown
    for title in PLOT_SECTIONS:
        assert "<img " in section_html(html, title), f"section {title!r} has no plot"
    assert html.count("<img ") == len(pngs) >= len(PLOT_SECTIONS)
    assert 'src="data:image/png;base64,' in html and "figures/" not in html  # self-contained
    for png in pngs:
        assert f"(figures/{png.name})" in markdown
        assert_png_is_a_real_plot(png)
    # Both runs are in the overlays and the tables; the evaluation tables carry both results files.
    for name in ("prune_2.7b", "cpt_2.7b"):
        assert name in section_html(html, "Loss curves")
        assert name in section_html(html, "Evaluation tables")
    evaluation = section_html(html, "Evaluation tables")
    for needle in ("hellaswag / acc_norm", "stackexchange", "tokens_per_s", "average loss"):
        assert needle in evaluation
    params = section_html(html, "Parameter counts")
    assert "299,584" in params and "118,608" in params  # tiny_gqa -> tiny_gqa_pruned, exact counts


def test_sections_without_data_say_so_in_one_line(tmp_path):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    (empty / "metrics.jsonl").write_text(
        '{"step": 1, "time/token": 512.0}\n{"step": 2, "time/tok'
    )  # killed mid-line
    paths = build_report([empty], tmp_path / "report")
    html = paths["html"].read_text()
    assert "<img " not in html and not list((tmp_path / "report" / "figures").glob("*.png"))
    for title in SECTION_TITLES:
        body = re.sub(r"<h2>.*?</h2>", "", section_html(html, title))
        assert body.strip().count("<p>") == 1 and body.strip().startswith("<p>No"), (title, body)
    assert "skipped 1 unreadable lines" in html


def test_cli_prints_where_it_wrote_and_rejects_missing_folders(synthetic_runs, tmp_path, capsys):
    out = tmp_path / "cli_report"
    assert report.main([str(synthetic_runs[0]), "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert str(out / "report.html") in printed and (out / "report.md").exists()
    with pytest.raises(SystemExit, match="2"):
        report.main([str(tmp_path / "no_such_run"), "--output", str(out)])
    assert "does not exist" in capsys.readouterr().err


# ------------------------------------------------------------------------------------- real run
def train_tiny(run: Path, tiny_gqa_dir: Path, tiny_data: Path, duration: str) -> None:
    from llmfoundry import registry

    from shearing.composer.loggers import MetricsFileLogger
    from shearing.config import RunConfig
    from shearing.train import train_from_yaml

    if "metrics_file" not in registry.loggers:
        registry.loggers.register("metrics_file", func=MetricsFileLogger)
    # The export switch is moving from pruning.export_on_fit_end to export.on_fit_end.
    fields = {f.name for f in dataclasses.fields(RunConfig)}
    export = "export.on_fit_end=true" if "export" in fields else "pruning.export_on_fit_end=true"
    # 40-60 batches do not converge the masks: force past the export gate (recorded in the summary),
    # since these runs test what the report reads, not convergence.
    forced = ["export.force=true"] if "export" in fields else []
    overrides = [
        f"variables.source_model={tiny_gqa_dir}",
        f"variables.data_local={tiny_data}",
        f"variables.save_folder={run}",
        export,
        *forced,
        f"max_duration={duration}",
        "eval_interval=20ba",
        "loggers={metrics_file: {}}",
    ]
    train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)


@pytest.fixture(scope="module")
def real_run(tmp_path_factory, tiny_gqa_dir, tiny_data) -> Path:
    run = tmp_path_factory.mktemp("real") / "prune_tiny"
    train_tiny(run, tiny_gqa_dir, tiny_data, "40ba")
    write_results(run / "results.json", str(run / "hf"))
    return run


def test_real_run_logs_the_metrics_the_report_reads(real_run):
    records = [json.loads(line) for line in (real_run / "metrics.jsonl").read_text().splitlines()]
    names = set().union(*records)
    for name in (
        "loss/train/total",
        "loss/train/lm_loss",
        "loss/train/lagrangian",
        "metrics/eval/LanguageCrossEntropy",
        "metrics/eval/code_LanguageCrossEntropy",
        "metrics/eval/docs_LanguageCrossEntropy",
        "pruning/expected_sparsity/hidden",
        "pruning/target_sparsity/layer",
        "pruning/lambda_1/intermediate",
        "pruning/lambda_2/hidden",
        "pruning/expected_num_params",
        "metrics/dynamic_loading/proportion/code",
        "time/token",
    ):
        assert name in names, name
    pairs = [(r["step"], name) for r in records for name in r if name != "step"]
    assert len(pairs) == len(set(pairs))
    assert max(r["step"] for r in records) == 40
    assert all(isinstance(v, float) for r in records for k, v in r.items() if k != "step")


def test_real_run_report_renders_every_plot(real_run, tmp_path):
    paths = build_report([real_run], tmp_path / "report")
    html = paths["html"].read_text()
    for title in PLOT_SECTIONS:
        assert "<img " in section_html(html, title), f"section {title!r} has no plot"
    for png in (tmp_path / "report" / "figures").glob("*.png"):
        assert_png_is_a_real_plot(png)
    assert "0 (dropped)" in html or "dropped source layers" in html
    assert "hellaswag" in section_html(html, "Evaluation tables")


def test_real_run_resumed_in_a_moved_folder_logs_every_step_once(real_run, tiny_gqa_dir, tiny_data, tmp_path):
    moved = tmp_path / "prune_tiny"
    shutil.copytree(real_run, moved, symlinks=True)
    before = (moved / "metrics.jsonl").read_text().splitlines()
    train_tiny(moved, tiny_gqa_dir, tiny_data, "60ba")  # autoresume from the batch-40 checkpoint
    lines = (moved / "metrics.jsonl").read_text().splitlines()
    # Everything up to the checkpoint is kept as it was (the end-of-fit export line came after it).
    kept = [line for line in before if json.loads(line)["step"] < 40]
    assert lines[: len(kept)] == kept
    records = [json.loads(line) for line in lines]
    pairs = [(r["step"], name) for r in records for name in r if name != "step"]
    assert len(pairs) == len(set(pairs))
    assert {s for s, name in pairs if name == "metrics/eval/LanguageCrossEntropy"} == {20, 40, 60}
    assert {s for s, name in pairs if name == "loss/train/lm_loss"} == set(range(60))


# ------------------------------------------------------------------------ README-style pipeline paths
def test_report_joins_an_outside_export_and_results_files_to_the_run(
    pruned_run, tiny_data, tmp_path, monkeypatch, capsys
):
    """The README's paths: a pruned run folder, ``shearing.export`` to ``out/x``, ``shearing.evaluate``
    writing ``results.json`` (the export, --data) and ``tasks.json`` (the run's hf/, --tasks) in the
    working folder, none of them inside the run folder. The report shows the export's shapes and the
    task rows, each attached to the entry holding the evaluated model."""
    from test_evaluate import write_local_mc_task

    from shearing import evaluate
    from shearing.export import hf as export

    _, run = pruned_run
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert export.main(["--checkpoint", str(run), "--output", "out/x"]) == 0
    evals = ["--model", "out/x", "--data", str(tiny_data / "eval"), "--max-seqs", "2", "--no-progress"]
    assert evaluate.main([*evals, "--output", "results.json"]) == 0
    tasks = write_local_mc_task(tmp_path / "task_yamls")
    argv = ["--model", str(run / "hf"), "--tasks", "lm_eval:tiny_mc", "--include-path", str(tasks)]
    argv += ["--local-tasks-only", "--limit", "3", "--num-fewshot", "0", "--batch-size", "2"]
    assert evaluate.main([*argv, "--output", "tasks.json"]) == 0
    exported = json.loads(Path("out/x/shearing_export.json").read_text())
    capsys.readouterr()

    for inputs in (
        [str(run), "out/x", "tasks.json", "results.json"],  # positional, recognised by content
        [str(run), "--export", "out/x", "--results", "tasks.json", "--results", "results.json"],
    ):
        assert report.main([*inputs, "--output", "report"]) == 0, capsys.readouterr().err
        html = Path("report/report.html").read_text()
        runs = section_html(html, "Runs")
        assert "x (export)" in runs and "tasks.json" in runs and "results.json" in runs
        params = section_html(html, "Parameter counts")
        assert "x (export)" in params and f"{exported['target']['num_params']:,}" in params
        assert "x (export)" in section_html(html, "Kept structure heat map")
        evaluation = section_html(html, "Evaluation tables")
        assert "tiny_mc / acc" in evaluation  # the task rows, from tasks.json
        assert "code" in evaluation and "docs" in evaluation  # the domain rows, from results.json
        # tasks.json evaluated run/hf -> the run's column; results.json evaluated out/x -> the export's.
        assert f"{run.name}: hf" in evaluation and "x (export): x" in evaluation
        assert "(results)" not in html  # every file found its entry

    # A results file whose model is none of the inputs is an entry of its own; bad inputs are refused.
    Path("other.json").write_text(json.dumps({"model": "/elsewhere/m", "tasks": {"t": {"acc": 0.5}}}))
    assert report.main([str(run), "other.json", "--output", "report"]) == 0
    assert "other.json (results)" in section_html(Path("report/report.html").read_text(), "Evaluation tables")
    Path("notes.json").write_text(json.dumps({"hello": 1}))
    with pytest.raises(SystemExit, match="2"):
        report.main([str(run), "--results", "notes.json", "--output", "report"])
    assert "not a shearing.evaluate results file: it has ['hello']" in capsys.readouterr().err
    with pytest.raises(SystemExit, match="2"):
        report.main([str(run), "--export", str(run), "--output", "report"])
    assert "has no shearing_export.json: give the --output folder of python -m shearing.export" in (
        capsys.readouterr().err
    )


def test_speed_table_shows_the_spread_and_the_noise_warning(tmp_path):
    """A results file with the speed record ``compare_speed`` writes (its statistics from ``run_trials`` on
    scripted timings): the report shows median ±spread [min–max], the trial count and the warning."""
    from shearing.evaluation.speed import run_trials

    times = iter([(0.5, 2.5), (1.0, 5.0), (1.0, 5.0), (1.0, 5.0)] * 10)  # the model alternates 2x: noisy
    speed = run_trials(lambda name: next(times), 1, 100, 11, min_trials=3, max_trials=6)
    assert not speed["spread_ok"]
    run = tmp_path / "cpt"
    run.mkdir()
    (run / "results.json").write_text(json.dumps({"model": str(run / "hf"), "speed": speed}))
    html = build_report([run], tmp_path / "report")["html"].read_text()
    evaluation = section_html(html, "Evaluation tables")
    model = speed["model"]["decode"]
    cell = f"{model['median']:,.1f} ±{model['spread']:.0%} [{model['min']:,.1f}–{model['max']:,.1f}]"
    assert f"<td>model decode tok/s</td><td>{cell}</td>" in evaluation
    ratio = speed["decode_speedup_stats"]
    assert (
        f"{ratio['median']:.2f}x ±{ratio['spread']:.0%} [{ratio['min']:.2f}–{ratio['max']:.2f}]" in evaluation
    )
    assert "<td>6 (max trials, " in evaluation and "NO, see warning (worst " in evaluation
    assert "warning: speed numbers are noisy: the " in evaluation
    assert "model.prefill.q1" not in evaluation  # the statistics are in the cells, not as raw rows


class RecordingWriter:
    """A ``FigureWriter`` that keeps what each figure's axes show before saving it."""

    def __init__(self, output: Path):
        from shearing.reporting.figures import FigureWriter

        self.writer, self.axes = FigureWriter(output), {}

    def save(self, fig, name, caption):
        self.axes[name] = [
            {
                "title": ax.get_title(),
                "ylim": ax.get_ylim(),
                "yscale": ax.get_yscale(),
                "lines": len(ax.get_lines()),
                "texts": [t.get_text() for t in ax.texts],
            }
            for ax in fig.axes
        ]
        return self.writer.save(fig, name, caption)


def test_gap_panels_per_run_and_proportion_lines_show_small_shifts(tmp_path):
    """A source run compared with a random-model reference (gap ≈ -8) next to a pruned run (gap 0.18):
    each run gets its own gap panel and scale, the loss axis is not stretched to the far reference (it is
    written as a number), and the proportions get one line per domain on a log axis beside the stack."""
    from shearing.reporting.runs import load_runs
    from shearing.reporting.training import per_domain, proportions

    source, prune = tmp_path / "source", tmp_path / "prune"
    for run in (source, prune):
        run.mkdir()
        refs = write_metrics(run / "metrics.jsonl", steps=100, eval_every=50, pruning=False)
        if run is source:
            refs = {d: math.log(32000) for d in DOMAINS}
        write_dynamic_loading(run / "dynamic_loading.json", refs, steps=100, eval_every=50)
    writer = RecordingWriter(tmp_path / "report")
    runs = load_runs([source, prune])
    per_domain(runs, writer)
    proportions(runs, writer)
    loss, *gaps = writer.axes["domain_loss_vs_reference"]
    assert [g["title"] for g in gaps] == ["source: loss minus reference", "prune: loss minus reference"]
    src_lo, (pr_lo, pr_hi) = gaps[0]["ylim"][0], gaps[1]["ylim"]
    assert src_lo < -7 and pr_hi - pr_lo < 0.3  # the pruned run's 0.18 gap fills its own panel
    assert loss["ylim"][1] < 4 and loss["texts"].count(f"ref {math.log(32000):.2f}↑") == len(DOMAINS)
    stacked, lines = writer.axes["domain_proportions"][:2]
    assert lines["yscale"] == "log" and lines["lines"] >= len(DOMAINS) and "per domain" in lines["title"]
    assert stacked["ylim"] == (0.0, 1.0)


# ------------------------------------------------------------------------------------ export gate
def gate_record(forced: bool) -> dict:
    """The ``gate`` of ``shearing_export.json``: undecided masks exported with --force, or a clean pass."""
    from shearing.pruning.gate import GateThresholds, evaluate_gate

    kept, dropped = (0.62, 0.61) if forced else (0.97, 0.06)
    families = {
        name: {
            "expected_sparsity": target + (0.0 if forced else 0.003),
            "target_sparsity": target,
            "kept_keep_probability": kept,
            "dropped_keep_probability": dropped,
            "kept_mask_value": 0.21 if forced else 0.95,
        }
        for name, target in (("hidden", 0.25), ("intermediate", 0.4545))
    }
    loss = {"expected_masks": 4.8, "final_masks": 4.95 if forced else 4.81}
    return {
        **evaluate_gate(families, loss, GateThresholds(), force=forced),
        "eval_source": "data/eval (--data)",
    }


def write_exports(root: Path) -> dict[str, Path]:
    """Two export folders, ``forced`` (undecided masks, --force) and ``clean`` (passed), with gate records."""
    exports = {}
    for name, forced in (("forced", True), ("clean", False)):
        folder = root / name
        folder.mkdir(parents=True)
        summary = {**tiny_export_summary(), "gate": gate_record(forced), "checkpoint_batch": 40}
        (folder / "shearing_export.json").write_text(json.dumps(summary))
        exports[name] = folder
    return exports


def test_report_shows_the_gate_of_every_export(synthetic_runs, tmp_path):
    """Issue 18 §4: a forced export is flagged in the report (runs table and its own section, markdown and
    HTML) with every number of its gate."""
    exports = write_exports(tmp_path / "out")
    paths = build_report([synthetic_runs[0], exports["forced"], exports["clean"]], tmp_path / "report")
    html, markdown = paths["html"].read_text(), paths["markdown"].read_text()

    runs = section_html(html, "Runs")
    assert "<td>forced (export)</td>" in runs and "FAILED, forced" in runs and "<td>passed</td>" in runs
    assert "not recorded" in runs  # the synthetic run's export predates the gate
    gate = section_html(html, "Export gate")
    assert (
        "forced (export)" in gate and "gate FAILED, forced (exported anyway: --force / export.force)" in gate
    )
    assert "checkpoint trained to batch 40" in gate and "clean (export)" in gate and "gate passed" in gate
    assert (
        "<td>hidden</td><td>0.2500</td><td>0.2500</td><td>0.0000</td><td>0.6200</td><td>0.6100</td><td>0.2100</td>"
        in gate
    )
    assert (
        "Eval loss on data/eval (--data): 4.8000 under expected masks, 4.9500 under final masks, gap +0.1500"
        in gate
    )
    assert "min_kept_probability 0.8000" in gate and "max_dropped_probability 0.2000" in gate
    assert "forced (export): 5 failed check(s):" in gate and "clean (export): no failed check(s)." in gate
    assert "hidden: undecided masks: the units the final masks keep have a mean keep probability" in gate
    assert "gap 0.1500 &gt; max_loss_gap 0.1" in gate
    md_gate = markdown[markdown.index("## Export gate") : markdown.index("## Evaluation tables")]
    assert "| hidden | 0.2500 | 0.2500 | 0.0000 | 0.6200 | 0.6100 | 0.2100 |" in md_gate
    assert "- intermediate: undecided masks: the units the final masks drop" in md_gate
    assert "gate FAILED, forced" in md_gate and "gate passed" in md_gate


def test_results_inside_an_export_folder_join_it_without_being_named(tmp_path):
    """``shearing.evaluate --output EXPORT/results.json``: the report of EXPORT shows those results."""
    exports = write_exports(tmp_path / "out")
    write_results(exports["forced"] / "results.json", "/somewhere/else", shift=0.3)
    html = build_report([exports["forced"], exports["clean"]], tmp_path / "report")["html"].read_text()
    assert "<td>results.json</td>" in section_html(html, "Runs")
    evaluation = section_html(html, "Evaluation tables")
    assert "forced (export): else" in evaluation and "(results)" not in html
    assert f"<td>average loss</td><td>{2.3 + 0.3:.4f}</td>" in evaluation


def test_a_folder_that_holds_nothing_to_report_is_refused(tmp_path, capsys):
    empty = tmp_path / "runs" / "typo"
    empty.mkdir(parents=True)
    out = tmp_path / "report"
    with pytest.raises(SystemExit, match="2"):
        report.main([str(empty), "--output", str(out)])
    err = capsys.readouterr().err
    assert f"{empty} holds no run, export or results (it is empty)" in err
    assert "metrics.jsonl" in err and "shearing_export.json" in err and "*results*.json" in err
    assert not out.exists()
    (empty / "notes.txt").write_text("x")
    (empty / "config.yaml").write_text("x")
    with pytest.raises(SystemExit, match="2"):
        report.main([str(empty), "--output", str(out)])
    assert "(it holds config.yaml, notes.txt)" in capsys.readouterr().err
    (empty / "shearing_run.json").write_text("{}")  # a run that has not logged anything yet: still a run
    assert report.main([str(empty), "--output", str(out)]) == 0
