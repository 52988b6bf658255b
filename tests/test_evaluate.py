"""Evaluation: per-domain CE against a hand computation, the results.json schema and CLI, lm-eval-harness
on a local multiple-choice task (no hub), the speed comparison, and the errors for bad input."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from streaming import LocalDataset
from tiny import SEQ_LEN, make_hf_llama

from shearing.evaluate import EvalOptions, check_options, evaluate, main
from shearing.evaluation.harness import flatten_metrics, parse_tasks, run_lm_eval
from shearing.evaluation.loading import load_model
from shearing.evaluation.speed import (
    compare_speed,
    make_prompt,
    random_llama,
    run_trials,
    spread_stats,
    time_generate,
)
from shearing.models.hf_io import config_from_shape
from shearing.models.shapes import named_shape

CPU = torch.device("cpu")
DOMAIN_KEYS = {"loss", "perplexity", "tokens"}


def _small_model(root: Path, tokenizer_dir: Path | None = None, **fields) -> Path:
    """A 2-layer model next to the 4-layer ``tiny_gqa_dir``: the 'pruned' side of a comparison."""
    shape = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    return make_hf_llama(root, tokenizer_dir, head_dim=8, intermediate_size=64, **{**shape, **fields})


def _hand_ce(model_dir: Path, domain_dir: Path, max_seqs: int) -> tuple[float, int]:
    """Mean next-token CE over the first ``max_seqs`` sequences: log-softmax by hand, one sequence at a time."""
    model = load_model(model_dir, CPU, torch.float32)
    dataset = LocalDataset(local=str(domain_dir))
    nll, count = 0.0, 0
    with torch.no_grad():
        for i in range(max_seqs):
            ids = torch.from_numpy(dataset[i]["tokens"].astype(np.int64))[None]
            logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), dim=-1)
            nll -= logp.gather(1, ids[0, 1:, None]).sum().item()
            count += ids.shape[1] - 1
    return nll / count, count


def test_domain_results_match_a_hand_computed_cross_entropy(tiny_gqa_dir: Path, tiny_data: Path) -> None:
    options = EvalOptions(model=str(tiny_gqa_dir), data=str(tiny_data / "eval"), batch_size=2, max_seqs=3)
    result = evaluate(options)
    assert set(result) == {"model", "domains", "average_loss"}
    assert result["model"] == str(tiny_gqa_dir)
    assert list(result["domains"]) == ["code", "docs"]
    for row in result["domains"].values():
        assert set(row) == DOMAIN_KEYS and isinstance(row["tokens"], int)
        assert row["perplexity"] == pytest.approx(math.exp(row["loss"]), rel=1e-12)
    loss, tokens = _hand_ce(tiny_gqa_dir, tiny_data / "eval" / "code", max_seqs=3)
    assert result["domains"]["code"]["loss"] == pytest.approx(loss, rel=1e-5)
    assert result["domains"]["code"]["tokens"] == tokens == 3 * (SEQ_LEN - 1)
    losses = [row["loss"] for row in result["domains"].values()]
    assert result["average_loss"] == pytest.approx(sum(losses) / 2, rel=1e-12)


def test_cli_writes_results_json_atomically(tmp_path: Path, tiny_gqa_dir: Path, tiny_data: Path) -> None:
    out = tmp_path / "reports" / "results.json"
    argv = ["--model", str(tiny_gqa_dir), "--data", str(tiny_data / "eval"), "--output", str(out)]
    assert main([*argv, "--max-seqs", "2", "--no-progress"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"model", "domains", "average_loss"}
    assert set(result["domains"]) == {"code", "docs"}
    assert all(set(row) == DOMAIN_KEYS for row in result["domains"].values())
    assert result["domains"]["docs"]["tokens"] == 2 * (SEQ_LEN - 1)
    assert [p.name for p in out.parent.iterdir()] == ["results.json"]  # no temporary file left


# ---------------------------------------------------------------------------------------------------
# lm-eval-harness on local data


def write_local_mc_task(folder: Path, name: str = "tiny_mc", docs: int = 7) -> Path:
    """An lm-eval multiple-choice task read from a local JSONL file (``dataset_path: json``)."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "question": f"What is {i} plus {i}?",
            "choices": [str(2 * i), str(2 * i + 1), "blue"],
            "label": i % 3,
        }
        for i in range(docs)
    ]
    data = folder / f"{name}.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    (folder / f"{name}.yaml").write_text(
        f"task: {name}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        'doc_to_choice: "{{choices}}"\n'
        "doc_to_target: label\n"
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
    )
    return folder


def test_lm_eval_runs_a_local_multiple_choice_task(
    tmp_path: Path, tiny_gqa_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    tasks = write_local_mc_task(tmp_path / "tasks")
    out = tmp_path / "results.json"
    argv = ["--model", str(tiny_gqa_dir), "--tasks", "lm_eval:tiny_mc", "--output", str(out)]
    argv += ["--include-path", str(tasks), "--local-tasks-only", "--limit", "3", "--num-fewshot", "0"]
    assert main([*argv, "--batch-size", "2"]) == 0
    result = json.loads(out.read_text())
    assert set(result) == {"model", "tasks"}
    metrics = result["tasks"]["tiny_mc"]
    assert set(metrics) == {"acc", "acc_stderr"}
    assert 0.0 <= metrics["acc"] <= 1.0
    assert metrics["acc"] * 3 == pytest.approx(round(metrics["acc"] * 3))  # a mean over exactly 3 docs


def test_lm_eval_errors_and_metric_names(tmp_path: Path) -> None:
    tasks = write_local_mc_task(tmp_path / "tasks")
    with pytest.raises(ValueError, match="unknown lm-eval task.*nope"):
        run_lm_eval(None, None, ["tiny_mc", "nope"], include_path=tasks, include_defaults=False)
    with pytest.raises(ValueError, match="needs --include-path"):
        run_lm_eval(None, None, ["tiny_mc"], include_defaults=False)
    raw = {"t": {"alias": "t", "sample_len": 4, "acc,none": 0.5, "acc_stderr,none": "N/A", "em,strict": 1}}
    assert flatten_metrics(raw) == {"t": {"acc": 0.5, "em/strict": 1.0}}


# ---------------------------------------------------------------------------------------------------
# Speed


def test_speed_comparison_of_two_tiny_models(
    tmp_path: Path, tokenizer_dir: Path, tiny_gqa_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    small = _small_model(tmp_path / "small", tokenizer_dir)
    out = tmp_path / "speed.json"
    argv = ["--model", str(small), "--speed-baseline", str(tiny_gqa_dir), "--output", str(out)]
    argv += ["--prompt-len", "32", "--new-tokens", "12", "--repeats", "3", "--batch-size", "2"]
    assert main([*argv, "--speed-max-seconds", "60", "--speed-tolerance", "0.5"]) == 0
    captured = capsys.readouterr()
    result = json.loads(out.read_text())
    assert set(result) == {"model", "speed"}
    speed = result["speed"]
    assert (speed["prompt_len"], speed["new_tokens"], speed["batch_size"]) == (32, 12, 2)
    assert speed["baseline_model"] == str(tiny_gqa_dir) and speed["device"] == "cpu"
    assert 3 <= speed["trials"] <= 50 and speed["stopped"] in {"converged", "time cap", "max trials"}
    assert speed["spread_ok"] == (speed["max_spread"] <= 0.5) == (speed["warning"] is None)
    for who in ("model", "baseline"):
        row = speed[who]
        assert row["prefill_tokens_per_s"] > 0 and row["decode_tokens_per_s"] > 0
        assert row["prefill_tokens_per_s"] == pytest.approx(2 * 32 / row["prefill_s"])
        assert row["decode_tokens_per_s"] == pytest.approx(2 * 11 / row["decode_s"])
        for phase in ("prefill", "decode"):
            stats = row[phase]
            assert stats["median"] == row[f"{phase}_tokens_per_s"]
            assert stats["min"] <= stats["q1"] <= stats["median"] <= stats["q3"] <= stats["max"]
            assert stats["trials"] + (row["decode_invalid"] if phase == "decode" else 0) == speed["trials"]
        # One progress line per trial and model, in A B A B order.
        assert captured.err.count(f": {who} prefill ") == speed["trials"]
    lines = [line for line in captured.err.splitlines() if line.startswith("speed trial ")]
    assert lines[0].startswith("speed trial 1: model prefill ") and " tok/s decode " in lines[0]
    assert lines[1].startswith("speed trial 1: baseline prefill ")
    assert speed["model"]["parameters"] < speed["baseline"]["parameters"]
    for phase in ("prefill", "decode"):
        stats = speed[f"{phase}_speedup_stats"]
        assert speed[f"{phase}_speedup"] == stats["median"] > 0
        assert stats["min"] <= stats["median"] <= stats["max"]
    assert "speedup [min-max]" in captured.out and "interleaved trials per model" in captured.out


def test_summary_table_columns_never_run_together() -> None:
    from shearing.evaluate import format_summary

    domains = {
        "cc": {"loss": 2.1, "perplexity": 123456.78, "tokens": 1234567890},
        "stackexchange_long": {"loss": 12.1234, "perplexity": 1.5e9, "tokens": 5},
    }
    text = format_summary({"model": "m", "domains": domains, "average_loss": 7.1})
    rows = {line.split()[0]: line.split() for line in text.splitlines()}
    assert rows["cc"] == ["cc", "2.1000", "123,456.78", "1,234,567,890"]
    assert rows["stackexchange_long"] == ["stackexchange_long", "12.1234", "1,500,000,000.00", "5"]
    lines = text.splitlines()
    assert len({len(line) for line in lines[:3]}) == 1  # right-aligned to one width per column


# Statistics of the trials, with a scripted timing function and clock: what is tested is the stopping
# rule and the aggregation, which need exactly known times.
class Script:
    """``measure(name)`` returns scripted (t1, tN) per call; the clock advances by the time 'spent'."""

    def __init__(self, times: dict[str, list[tuple[float, float]]]):
        self.times = {name: iter(seq) for name, seq in times.items()}
        self.calls: list[str] = []
        self.now = 0.0

    def measure(self, name: str) -> tuple[float, float]:
        self.calls.append(name)
        t1, tn = next(self.times[name])
        self.now += t1 + tn
        return t1, tn

    def clock(self) -> float:
        return self.now


def test_steady_timings_stop_at_the_minimum_trials_with_exact_statistics() -> None:
    script = Script({"model": [(0.5, 2.5)] * 50, "baseline": [(1.0, 5.0)] * 50})
    lines: list[str] = []
    result = run_trials(
        script.measure, 2, 100, 11, min_trials=4, clock=script.clock, progress=lines.append, max_seconds=1e9
    )
    assert result["trials"] == 4 and result["stopped"] == "converged" and result["spread_ok"]
    assert script.calls == ["model", "baseline"] * 4  # interleaved A B A B
    assert result["model"]["prefill_tokens_per_s"] == 2 * 100 / 0.5
    assert result["model"]["decode_tokens_per_s"] == 2 * 10 / 2.0
    assert result["baseline"]["decode"] == {
        "median": 5.0,
        "min": 5.0,
        "max": 5.0,
        "q1": 5.0,
        "q3": 5.0,
        "spread": 0.0,
        "trials": 4,
    }
    assert result["prefill_speedup"] == 2.0 and result["decode_speedup"] == 2.0
    assert result["warning"] is None
    assert lines[0] == "speed trial 1: model prefill 400.0 tok/s decode 10.0 tok/s"
    assert lines[1] == "speed trial 1: baseline prefill 200.0 tok/s decode 5.0 tok/s" and len(lines) == 8


def test_one_outlier_does_not_block_convergence_but_steady_noise_hits_the_time_cap() -> None:
    # A single slow trial (a GC pause) among steady ones: the IQR ignores it.
    model = [(0.5, 2.5), (5.0, 25.0), *[(0.5, 2.5)] * 48]
    script = Script({"model": model, "baseline": [(1.0, 5.0)] * 50})
    result = run_trials(script.measure, 1, 10, 5, min_trials=5, clock=script.clock, max_seconds=1e9)
    assert result["trials"] == 5 and result["stopped"] == "converged"
    assert result["model"]["prefill"]["min"] == 10 / 5.0 and result["model"]["prefill"]["median"] == 10 / 0.5
    # Timings that keep alternating by 2x never settle: the time cap stops them, with a warning.
    noisy = [(0.5, 2.5), (1.0, 5.0)] * 25
    script = Script({"model": noisy, "baseline": [(1.0, 5.0)] * 50})
    result = run_trials(script.measure, 1, 10, 5, min_trials=3, clock=script.clock, max_seconds=40.0)
    assert result["stopped"] == "time cap" and result["trials"] == 4  # rounds of 9 s and 12 s: 42 s after 4
    assert not result["spread_ok"] and result["max_spread"] > 0.1
    assert (
        "speed numbers are noisy: the " in result["warning"]
        and "after 4 trials (time cap" in result["warning"]
    )
    # Without a cap it stops at max_trials, still warning.
    script = Script({"model": noisy, "baseline": [(1.0, 5.0)] * 50})
    result = run_trials(
        script.measure, 1, 10, 5, min_trials=3, max_trials=8, clock=script.clock, max_seconds=1e9
    )
    assert (result["stopped"], result["trials"], result["spread_ok"]) == ("max trials", 8, False)


def test_speedup_pairs_trials_in_time_so_a_drift_of_the_machine_cancels() -> None:
    # The machine slows down 1.5x every round; the model is always exactly 2x faster than the baseline.
    slow = [1.5**k for k in range(6)]
    script = Script(
        {"model": [(0.5 * f, 2.5 * f) for f in slow], "baseline": [(1.0 * f, 5.0 * f) for f in slow]}
    )
    result = run_trials(
        script.measure, 1, 10, 5, min_trials=6, max_trials=6, clock=script.clock, max_seconds=1e9
    )
    assert result["model"]["prefill"]["spread"] > 0.5  # each model's own rate drifts a lot ...
    assert result["prefill_speedup_stats"]["spread"] == pytest.approx(0.0)  # ... their paired ratio does not
    assert result["prefill_speedup"] == pytest.approx(2.0) and result["decode_speedup"] == pytest.approx(2.0)


def test_a_noisy_speedup_keeps_the_trials_going_even_when_each_rate_is_steady() -> None:
    # Each model swings 9% (within the 10% tolerance) but in opposite phase: the ratio swings 18%.
    fast, slow = (0.5, 2.5), (0.545, 2.725)
    script = Script({"model": [fast, slow] * 5, "baseline": [slow, fast] * 5})
    result = run_trials(
        script.measure, 1, 10, 5, min_trials=4, max_trials=8, clock=script.clock, max_seconds=1e9
    )
    assert max(result[w][p]["spread"] for w in ("model", "baseline") for p in ("prefill", "decode")) <= 0.1
    assert result["prefill_speedup_stats"]["spread"] > 0.1
    assert (result["stopped"], result["trials"], result["spread_ok"]) == ("max trials", 8, False)
    assert "speedup still spreads" in result["warning"]


def test_spread_statistics_and_bad_trial_settings() -> None:
    stats = spread_stats([4.0, 1.0, 3.0, 2.0, 100.0])
    assert stats == {
        "median": 3.0,
        "min": 1.0,
        "max": 100.0,
        "q1": 2.0,
        "q3": 4.0,
        "spread": 2 / 3,
        "trials": 5,
    }
    assert spread_stats([7.0])["spread"] == 0.0
    # A trial whose N-token generate was not slower than the 1-token one has no decode rate.
    script = Script({"model": [(1.0, 0.9), *[(1.0, 3.0)] * 9], "baseline": [(1.0, 3.0)] * 10})
    result = run_trials(script.measure, 1, 10, 5, min_trials=3, clock=script.clock)
    assert (
        result["model"]["decode_invalid"] == 1 and result["model"]["decode"]["trials"] == result["trials"] - 1
    )
    never = Script({"model": [(1.0, 1.0)] * 60, "baseline": [(1.0, 3.0)] * 60})
    with pytest.raises(ValueError, match="no measurable time .* of the model: raise --new-tokens"):
        run_trials(never.measure, 1, 10, 5, min_trials=3, clock=never.clock)
    with pytest.raises(ValueError, match="--speed-tolerance must be > 0"):
        run_trials(never.measure, 1, 10, 5, tolerance=0.0)
    with pytest.raises(ValueError, match="--speed-max-seconds must be > 0"):
        run_trials(never.measure, 1, 10, 5, max_seconds=-1)


def test_generate_is_timed_for_every_new_token_even_past_eos(tiny_gqa_dir: Path) -> None:
    model = load_model(tiny_gqa_dir, CPU, torch.float32)
    prompt = make_prompt(model.config.vocab_size, 1, 8, CPU)
    with torch.no_grad():
        first = int(model(input_ids=prompt).logits[0, -1].argmax())
    model.generation_config.eos_token_id = first  # greedy decoding would stop after one token
    assert time_generate(model, prompt, 6) > 0  # asserts 6 tokens came out
    with pytest.raises(ValueError, match="max_position_embeddings 256"):
        compare_speed(model, model, prompt_len=250, new_tokens=10)
    with pytest.raises(ValueError, match="at least 2"):
        compare_speed(model, model, prompt_len=8, new_tokens=1)


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_inputs_raise_clear_errors(
    tmp_path: Path, tiny_gqa_dir: Path, tiny_data: Path, capsys: pytest.CaptureFixture
) -> None:
    data = str(tiny_data / "eval")
    (tmp_path / "empty").mkdir()
    no_weights = tmp_path / "no_weights"
    no_weights.mkdir()
    (no_weights / "config.json").write_text("{}")
    for folder, message in [
        (tmp_path / "empty", "no config.json, so it is not a Hugging Face model folder"),
        (tmp_path / "missing", "is not a folder"),
        (no_weights, "no \\*.safetensors or pytorch_model\\*.bin weights"),
    ]:
        with pytest.raises(ValueError, match=message):
            evaluate(EvalOptions(model=str(folder), data=data))
    with pytest.raises(ValueError, match="--speed-baseline .* not a folder"):
        evaluate(EvalOptions(model=str(tiny_gqa_dir), speed_baseline=str(tmp_path / "missing")))

    other_vocab = _small_model(tmp_path / "vocab128", vocab_size=128, num_hidden_layers=1)
    with pytest.raises(ValueError, match="model's vocab_size is 128 .*the data was tokenized with"):
        evaluate(EvalOptions(model=str(other_vocab), data=data, max_seqs=2, progress=False))

    for spec in ("hellaswag", "helm:hellaswag"):
        with pytest.raises(ValueError, match="must start with a known prefix \\(lm_eval:\\)"):
            parse_tasks(spec)
    with pytest.raises(ValueError, match="names no task"):
        parse_tasks("lm_eval: ,")
    assert parse_tasks("lm_eval:hellaswag, arc_easy") == {"lm_eval": ["hellaswag", "arc_easy"]}
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(EvalOptions(model=str(tiny_gqa_dir)))
    speed = dict(model=str(tiny_gqa_dir), speed_baseline=str(tiny_gqa_dir))
    for field, value, message in [
        ("speed_tolerance", 0.0, "--speed-tolerance must be > 0"),
        ("speed_max_seconds", -5.0, "--speed-max-seconds must be > 0, got -5.0"),
        ("repeats", 0, "--repeats must be at least 1"),
        ("new_tokens", 1, "--new-tokens must be at least 2"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_options(EvalOptions(**speed, **{field: value}))

    out = tmp_path / "results.json"
    with pytest.raises(SystemExit, match="2"):
        main(["--model", str(tiny_gqa_dir), "--tasks", "arc_easy", "--output", str(out)])
    err = capsys.readouterr().err
    assert "shearing: the evaluation was refused before it started:" in err
    assert "--tasks 'arc_easy' must start with a known prefix" in err
    assert not out.exists()


def test_random_llama_passes_its_dtype_as_the_installed_transformers_names_it(monkeypatch) -> None:
    """``_from_config`` gets ``dtype`` under transformers 5 (where ``torch_dtype`` is deprecated), ``torch_dtype``
    under 4.x (which does not know ``dtype``), and the model is built in it."""
    import transformers
    from transformers import LlamaForCausalLM

    calls = []
    build = LlamaForCausalLM._from_config.__func__

    def spy(cls, config, **kwargs):
        calls.append({k: v for k, v in kwargs.items() if "dtype" in k})
        return build(cls, config, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "_from_config", classmethod(spy))
    model = random_llama(config_from_shape(named_shape("tiny_gqa")), CPU, torch.bfloat16)
    keyword = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    assert calls == [{keyword: torch.bfloat16}]
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
