"""CPU smoke run of bench/reproduce.py at a tiny scale: every run is trained, evaluated and reported."""

import json
import math
import sys
from pathlib import Path

import pytest
from subproc import run_python

REPO = Path(__file__).resolve().parents[1]
RUNS = ("source", "sheared", "scratch_matched", "scratch_long", "sheared_constant", "oneshot")


def _reproduce():
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import reproduce
    finally:
        sys.path.pop(0)
    return reproduce


def test_tokens_to_reach():
    tokens_to_reach = _reproduce().tokens_to_reach
    curve = [(0, 8.0), (100, 6.0), (200, 5.0)]
    assert tokens_to_reach(curve, 7.0) == 50.0
    assert tokens_to_reach(curve, 5.0) == 200.0
    assert tokens_to_reach(curve, 4.0) is None


@pytest.mark.slow
def test_reproduce_smoke(tmp_path):
    out = tmp_path / "bench"
    cmd = [str(REPO / "bench" / "reproduce.py"), "--output", str(out), "--scale", "0.003"]
    cmd += ["--corpus-chars", "200000", "--eval-seqs", "16", "--seq-len", "64", "--batch", "8"]
    # The named demo source pruned to a target given as a mapping (vocabulary and head_dim from the source).
    target = {"hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 2}
    target |= {"num_key_value_heads": 1, "intermediate_size": 192}
    cmd += ["--target-shape", json.dumps(target)]
    cmd += ["--extra-seeds", "5"]
    proc = run_python(cmd, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "reproduce.json").read_text())
    assert set(summary["runs"]) == set(RUNS)
    for name, run in summary["runs"].items():
        assert math.isfinite(run["average_loss"]), name
        assert set(run["domains"]) == {"code", "docs", "prose", "legal"}
        assert run["seconds"] > 0
        assert len(run["curve"]) >= 2, name
    assert summary["tokens_per_step"] == 8 * 64
    for run in ("sheared_cpt", "scratch_matched", "scratch_long", "constant_cpt", "oneshot_cpt"):
        config = json.loads((out / "runs" / run / "hf" / "config.json").read_text())
        assert {k: config[k] for k in target} == target, run
        assert config["vocab_size"] == 2048 and config["head_dim"] == 32, run
    assert summary["runs"]["sheared"]["tokens"] == summary["runs"]["scratch_matched"]["tokens"]
    assert summary["runs"]["oneshot"]["tokens"] == summary["runs"]["scratch_matched"]["tokens"]
    assert "token_ratio" in summary
    seeds = summary["seeds"]
    assert seeds["seeds"] == [17, 5]
    assert set(seeds["runs"]) == {"sheared", "scratch_matched", "sheared_constant", "oneshot"}
    for name, r in seeds["runs"].items():
        assert r["average_loss"][0] == summary["runs"][name]["average_loss"]
        assert r["average_loss"][1] != r["average_loss"][0], name  # another seed, another run
    assert (out / "reproduce.md").is_file()
    assert (out / "reproduce.png").stat().st_size > 10_000
    # Resumable: a second call skips every run and rewrites the same table.
    proc = run_python(cmd, timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "done before, skipped" in proc.stdout
    again = json.loads((out / "reproduce.json").read_text())
    assert again["runs"]["sheared"]["average_loss"] == summary["runs"]["sheared"]["average_loss"]

    # --data: a prepared folder (this run's) is used as is, its tokenizer from the manifest.
    reproduce = _reproduce()
    bench = reproduce.Bench(
        tmp_path / "other", 1.0, "demo_source", 0, 16, "cpu", seq_len=64, data=out / "data"
    )
    bench.prepare_data()
    assert bench.data == (out / "data").resolve() and bench.tokenizer == out / "tokenizer"
    assert not (tmp_path / "other" / "raw").exists()
    wrong = reproduce.Bench(
        tmp_path / "other", 1.0, "demo_source", 0, 16, "cpu", seq_len=128, data=out / "data"
    )
    with pytest.raises(SystemExit, match="pass --seq-len 64"):
        wrong.prepare_data()


# -- --source: a real pre-trained model, four ways to cut it -----------------------------------------------
SOURCE_TARGET = {
    "hidden_size": 48,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "intermediate_size": 96,
}


def _from_source():
    _reproduce()  # puts nothing on sys.path for long: import through the same path juggling
    sys.path.insert(0, str(REPO / "bench"))
    try:
        import from_source
    finally:
        sys.path.pop(0)
    return from_source


def _source_cmd(source, out, *extra):
    cmd = [
        str(REPO / "bench" / "reproduce.py"),
        "--source",
        str(source),
        "--output",
        str(out),
    ]
    cmd += [
        "--scale",
        "0.1",
        "--corpus-chars",
        "100000",
        "--eval-seqs",
        "8",
        "--seq-len",
        "64",
        "--batch",
        "4",
    ]
    return cmd + ["--target-shape", json.dumps(SOURCE_TARGET), "--calibration-seqs", "8", *extra]


def test_source_bad_target_fails_before_any_work(tmp_path, tiny_gqa_dir):
    wide = {**SOURCE_TARGET, "hidden_size": 4096}
    cmd = _source_cmd(tiny_gqa_dir, tmp_path / "out")
    cmd[cmd.index("--target-shape") + 1] = json.dumps(wide)
    proc = run_python(cmd, timeout=400, cwd=REPO)
    assert proc.returncode != 0
    assert "--target-shape" in proc.stderr and "hidden_size" in proc.stderr, proc.stderr[-2000:]
    assert not (tmp_path / "out" / "raw").exists()  # refused before the corpus is built
    proc = run_python(_source_cmd(tmp_path, tmp_path / "out"), timeout=400, cwd=REPO)
    assert proc.returncode != 0 and "not a Hugging Face model folder" in proc.stderr


def test_source_features_and_markdown():
    fs = _from_source()
    none = fs.Features(l0_init=False, distillation=False, activation_importance=False)
    assert none.missing("oneshot") is None and none.missing("l0_constant") is None
    assert "pruning.init" in none.missing("l0_importance")
    assert "pruning.init" in none.missing("l0_importance_kd")
    no_kd = fs.Features(l0_init=True, distillation=False, activation_importance=True)
    assert no_kd.missing("l0_importance") is None and "distillation" in no_kd.missing("l0_importance_kd")
    assert fs.Features(True, True, True).missing("l0_importance_kd") is None

    losses = {"domains": {"code": 3.0, "docs": 2.0}, "average_loss": 2.5}
    ok = {"what": "(b) x", "mixture": "dynamic", "status": "ok", "gate": "forced", "notes": []}
    ok |= {"gate_failures": ["layer: expected sparsity 0.1 vs target 0.3"], "tokens": 1000, "seconds": 5}
    ok |= {"pruned": losses, "final": {"domains": {"code": 2.0, "docs": 1.0}, "average_loss": 1.5}}
    skipped = {"what": "(d) y", "mixture": "fixed", "status": "skipped: no distillation section"}
    summary = {"source": "S", "params": {"source": 10, "target": 5}, "steps": {"prune": 2, "cpt": 3}}
    summary |= {"tokens_per_step": 100, "eval_seqs_per_domain": 8, "device": "cpu", "wall_time_s": 9}
    summary |= {"source_eval": losses, "rows": {"b": ok, "d": skipped}}
    text = fs.markdown(summary)
    assert "| (b) x | dynamic | **forced** (failed: layer) | 3.000 -> 2.000 | 2.000 -> 1.000 |" in text
    assert "2.500 -> **1.500** | 1,000 | 5 |" in text
    assert "| (d) y | fixed | — |" in text and "skipped: no distillation section |" in text


@pytest.mark.slow
def test_reproduce_source_smoke(tmp_path, tiny_gqa_dir):
    fs = _from_source()
    out = tmp_path / "bench"
    proc = run_python(_source_cmd(tiny_gqa_dir, out), timeout=900, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    summary = json.loads((out / "reproduce.json").read_text())
    assert summary["mode"] == "source" and summary["tokens_per_step"] == 4 * 64
    # No source pre-training: the source is evaluated as given, the data tokenized with its tokenizer.
    assert not (out / "runs" / "source" / "hf").exists() and not (out / "tokenizer").exists()
    manifest = json.loads((out / "data" / "manifest.json").read_text())
    assert Path(manifest["tokenizer"]["path"]).resolve() == tiny_gqa_dir.resolve()
    reference = json.loads((out / "reference_losses.json").read_text())["reference_losses"]
    assert reference == summary["source_eval"]["domains"]
    features = fs.Features.detect()
    rows = summary["rows"]
    assert set(rows) == {f"{m}/{x}" for m in fs.METHODS for x in ("dynamic", "fixed")}
    budgets = set()
    for key, row in rows.items():
        missing = features.missing(row["method"])
        if missing:
            assert row["status"] == missing, key  # skipped with the reason, not crashed
            continue
        assert row["status"] == "ok", (key, row["status"])
        for stage in ("pruned", "final"):
            assert math.isfinite(row[stage]["average_loss"]), (key, stage)
            assert set(row[stage]["domains"]) == {"code", "docs", "prose", "legal"}
        assert row["final"]["average_loss"] != row["pruned"]["average_loss"], key  # CPT trained
        budgets.add(row["tokens"])
        config = json.loads((out / "runs" / row["runs"][-1] / "hf" / "config.json").read_text())
        assert {k: config[k] for k in SOURCE_TARGET} == SOURCE_TARGET, key
        export = json.loads((out / "runs" / row["runs"][0] / "hf" / "shearing_export.json").read_text())
        if row["method"] == "oneshot":
            assert row["gate"].startswith("n/a")
        else:  # 4 pruning steps cannot converge: the gate refused, the re-export is forced and says so
            assert row["gate"] == "forced" and row["gate_failures"], key
            assert export["gate"]["forced"] is True and not export["gate"]["passed"], key
    assert budgets == {(summary["steps"]["prune"] + summary["steps"]["cpt"]) * 4 * 64}  # one budget for all
    for x in ("dynamic", "fixed"):
        if features.l0_init:  # importance init moves the pruning run's start: another pruned model
            c, b = rows[f"l0_importance/{x}"], rows[f"l0_constant/{x}"]
            assert c["pruned"]["domains"] != b["pruned"]["domains"], x
        if features.l0_init and features.distillation:  # same pruned model, another CPT loss
            d, c = rows[f"l0_importance_kd/{x}"], rows[f"l0_importance/{x}"]
            assert d["pruned"] == c["pruned"] and d["final"] != c["final"], x
    # Fixed vs dynamic: the fixed runs never move the mixture, the dynamic ones do.
    fixed = json.loads((out / "runs" / "l0_constant_cpt.fixed" / "dynamic_loading.json").read_text())
    assert len({tuple(h["proportions"]) for h in fixed["history"]}) == 1
    md = (out / "reproduce.md").read_text()
    assert "**forced**" in md and "source (unpruned)" in md
    # Resumable: a second call trains nothing and writes the same numbers.
    proc = run_python(_source_cmd(tiny_gqa_dir, out), timeout=300, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "done before, skipped" in proc.stdout
    again = json.loads((out / "reproduce.json").read_text())
    assert {k: r.get("final") for k, r in again["rows"].items()} == {
        k: r.get("final") for k, r in rows.items()
    }

    # --no-force-export: the refusal stops the row, visibly; the prepared data is reused as given.
    out2 = tmp_path / "refused"
    cmd = _source_cmd(tiny_gqa_dir, out2, "--no-force-export", "--mixtures", "fixed")
    cmd += ["--methods", "l0_constant", "--data", str(out / "data")]
    proc = run_python(cmd, timeout=600, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-4000:]
    rows = json.loads((out2 / "reproduce.json").read_text())["rows"]
    assert set(rows) == {"l0_constant/fixed"}  # --methods and --mixtures pick the rows
    refused = rows["l0_constant/fixed"]
    assert refused["status"].startswith("failed: RowFailed") and "refused by the gate" in refused["status"]
    assert not (out2 / "runs" / "l0_constant_cpt.fixed").exists()
    assert not (out2 / "runs" / "l0_constant_prune.fixed" / "hf").exists()
    assert "refused by the gate" in (out2 / "reproduce.md").read_text()


def test_output_holding_other_settings_or_steps_is_refused(tmp_path, tiny_gqa_dir):
    """A resumed bench skips finished runs: it must refuse an --output made with other settings or steps."""
    fs = _from_source()
    out = tmp_path / "bench"

    def bench(**kw):
        return fs.SourceBench(out, tiny_gqa_dir, **{"batch": 4, "seq_len": 64, "eval_seqs": 8, **kw})

    bench().claim_output()
    bench().claim_output()  # same settings: a resume
    with pytest.raises(SystemExit, match=r"other settings \(batch: 4 there, 8 now\)"):
        bench(batch=8).claim_output()
    with pytest.raises(SystemExit, match=r"calibration_seqs: 32 there, 8 now"):
        bench(calibration_seqs=8).claim_output()

    explicit = bench(steps={"prune": 30, "cpt": None})
    assert explicit.steps("prune") == 30 and explicit.steps("cpt") == 8  # cpt: the CPU default x scale 1
    assert bench(device="gpu", batch=None).steps("prune") == fs.GPU_STEPS["prune"]
    with pytest.raises(SystemExit, match="--prune-steps must be a positive"):
        bench(steps={"prune": 0})

    run = out / "runs" / "l0_constant_prune"
    (run / "hf").mkdir(parents=True)
    (run / "hf" / "config.json").write_text("{}")
    (run / "bench_run.json").write_text(json.dumps({"steps": 8, "tokens": 8 * 256, "seconds": 1.0}))
    assert explicit.done("l0_constant_prune", 8)["steps"] == 8
    with pytest.raises(SystemExit, match="trained for 8 steps, this call asks for 30"):
        explicit.prune("l0_constant_prune", 30, [])


def test_source_only_flags_are_refused_without_source(tmp_path):
    proc = run_python(
        [REPO / "bench" / "reproduce.py", "--output", tmp_path / "o", "--prune-steps", "5"], timeout=120
    )
    assert proc.returncode == 2 and "--prune-steps applies only with --source" in proc.stderr
    assert not (tmp_path / "o").exists()
