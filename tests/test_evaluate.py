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

from shearing.evaluate import EvalOptions, evaluate, main
from shearing.evaluation.harness import flatten_metrics, parse_tasks, run_lm_eval
from shearing.evaluation.loading import load_model
from shearing.evaluation.speed import compare_speed, make_prompt, time_generate

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


def test_speed_comparison_of_two_tiny_models(tmp_path: Path, tokenizer_dir: Path, tiny_gqa_dir: Path) -> None:
    small = _small_model(tmp_path / "small", tokenizer_dir)
    out = tmp_path / "speed.json"
    argv = ["--model", str(small), "--speed-baseline", str(tiny_gqa_dir), "--output", str(out)]
    assert (
        main([*argv, "--prompt-len", "32", "--new-tokens", "12", "--repeats", "2", "--batch-size", "2"]) == 0
    )
    result = json.loads(out.read_text())
    assert set(result) == {"model", "speed"}
    speed = result["speed"]
    assert (speed["prompt_len"], speed["new_tokens"], speed["batch_size"]) == (32, 12, 2)
    assert speed["baseline_model"] == str(tiny_gqa_dir) and speed["device"] == "cpu"
    for who in ("model", "baseline"):
        assert speed[who]["prefill_tokens_per_s"] > 0 and speed[who]["decode_tokens_per_s"] > 0
        assert speed[who]["prefill_tokens_per_s"] == pytest.approx(2 * 32 / speed[who]["prefill_s"])
        assert speed[who]["decode_tokens_per_s"] == pytest.approx(2 * 11 / speed[who]["decode_s"])
    assert speed["model"]["parameters"] < speed["baseline"]["parameters"]
    for phase in ("prefill", "decode"):
        ratio = speed["model"][f"{phase}_tokens_per_s"] / speed["baseline"][f"{phase}_tokens_per_s"]
        assert speed[f"{phase}_speedup"] == pytest.approx(ratio) and speed[f"{phase}_speedup"] > 0


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
    with pytest.raises(ValueError, match="vocabulary has 128: the data was tokenized with another tokenizer"):
        evaluate(EvalOptions(model=str(other_vocab), data=data, max_seqs=2, progress=False))

    for spec in ("hellaswag", "helm:hellaswag"):
        with pytest.raises(ValueError, match="must start with a known prefix \\(lm_eval:\\)"):
            parse_tasks(spec)
    with pytest.raises(ValueError, match="names no task"):
        parse_tasks("lm_eval: ,")
    assert parse_tasks("lm_eval:hellaswag, arc_easy") == {"lm_eval": ["hellaswag", "arc_easy"]}
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate(EvalOptions(model=str(tiny_gqa_dir)))

    out = tmp_path / "results.json"
    assert main(["--model", str(tiny_gqa_dir), "--tasks", "arc_easy", "--output", str(out)]) == 2
    assert "error: --tasks 'arc_easy' must start with a known prefix" in capsys.readouterr().err
    assert not out.exists()
