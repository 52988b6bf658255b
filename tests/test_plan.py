"""``python -m shearing.plan --target-params``: proposed target shapes are valid, exactly counted, near the
requested size, the least distorted per depth (checked against a brute force), and printed as overrides
that load and plan to the same count."""

from __future__ import annotations

import itertools
import math
import re
from pathlib import Path

import pytest

from shearing.config import load_config
from shearing.models.shapes import (
    PRUNABLE_FIELDS,
    count_params,
    default_multiples,
    named_shape,
    propose_targets,
    resolve_target_shape,
)
from shearing.plan import main
from shearing.pruning.plan import PruningPlan

REPO = Path(__file__).resolve().parents[1]
RECIPE = str(REPO / "yamls/small/smollm2_135m_to_51m.yaml")

CASES = [
    ("smollm2_135m", 56_000_000),
    ("llama2_7b", 2_700_000_000),  # MHA: one KV head per query head
    ("llama3_8b", 3_000_000_000),  # GQA, 8 KV groups of 4
    ("tiny_gqa", 150_000),
    ("tiny_mha", 100_000),
]


@pytest.mark.parametrize("name, wanted", CASES)
def test_every_candidate_is_a_valid_exactly_counted_target_near_the_size(name, wanted):
    source = named_shape(name)
    hidden_unit, mlp_unit = default_multiples(source)
    candidates = propose_targets(source, wanted, count=8)
    assert candidates
    layer_counts = [c.shape.num_hidden_layers for c in candidates]
    assert len(set(layer_counts)) == len(layer_counts)  # one per depth
    assert [c.distortion for c in candidates] == sorted(c.distortion for c in candidates)
    for c in candidates:
        fields = c.shape.prunable()
        assert resolve_target_shape(source, fields) == c.shape  # the run's own target check accepts it
        assert c.params == count_params(c.shape)
        assert c.deviation == pytest.approx(c.params / wanted - 1) and abs(c.deviation) <= 0.02
        assert c.shape.head_dim == source.head_dim and c.shape.vocab_size == source.vocab_size
        assert fields["hidden_size"] % hidden_unit == 0 and fields["intermediate_size"] % mlp_unit == 0
        heads, kv = fields["num_attention_heads"], fields["num_key_value_heads"]
        if source.group_size == 1:
            assert kv == heads
        else:
            assert source.num_key_value_heads % kv == 0 and heads % kv == 0
            assert heads // kv <= source.group_size


@pytest.mark.parametrize(
    "name, wanted", [("tiny_gqa", 150_000), ("tiny_mha", 100_000), ("demo_source", 700_000)]
)
def test_each_depth_gets_the_least_distorted_shape_a_brute_force_finds(name, wanted):
    """Every valid shape on the grid, counted one by one: the proposal misses none."""
    source = named_shape(name)
    hidden_unit, mlp_unit = default_multiples(source)
    best = {}
    grid = itertools.product(
        range(hidden_unit, source.hidden_size + 1, hidden_unit),
        range(1, source.num_hidden_layers + 1),
        range(1, source.num_attention_heads + 1),
        range(1, source.num_key_value_heads + 1),
        range(mlp_unit, source.intermediate_size + 1, mlp_unit),
    )
    for fields in grid:
        hidden, layers, heads, kv, mlp = fields
        if heads % kv or (source.group_size > 1 and source.num_key_value_heads % kv):
            continue
        target = dict(zip(PRUNABLE_FIELDS, fields, strict=True))
        try:
            shape = resolve_target_shape(source, target)
        except ValueError:
            continue
        params = count_params(shape)
        if shape == source or abs(params / wanted - 1) > 0.02:
            continue
        ratios = (heads * source.head_dim / hidden, mlp / hidden, heads / kv)
        own = (
            source.num_attention_heads * source.head_dim / source.hidden_size,
            source.intermediate_size / source.hidden_size,
            source.group_size,
        )
        distortion = sum(abs(math.log(t / r)) for t, r in zip(ratios, own, strict=True))
        distortion += abs(
            math.log(layers / source.num_hidden_layers) - 0.5 * math.log(hidden / source.hidden_size)
        )
        rank = (round(distortion, 9), abs(params / wanted - 1))
        if layers not in best or rank < best[layers][0]:
            best[layers] = (rank, fields)
    proposed = propose_targets(source, wanted, count=len(best))
    assert len(proposed) == len(best)
    for c in proposed:
        rank, fields = best[c.shape.num_hidden_layers]
        assert c.distortion == pytest.approx(rank[0]) and abs(c.deviation) == pytest.approx(rank[1])


def test_known_answers():
    """SmolLM2-135M at 56M keeps its proportions (hidden 384 = 6 heads x 64, MLP 8/3 of hidden) at 23
    layers; LLaMA2-7B at Sheared-LLaMA-1.3B's count proposes the paper's 24 layers, hidden 2048, 16 heads."""
    first = propose_targets(named_shape("smollm2_135m"), 56_000_000)[0]
    assert first.shape.prunable() == {
        "hidden_size": 384,
        "num_hidden_layers": 23,
        "num_attention_heads": 6,
        "num_key_value_heads": 3,
        "intermediate_size": 1024,
    }
    assert first.params == 56_198_784
    paper = named_shape("llama2_1.3b")
    first = propose_targets(named_shape("llama2_7b"), count_params(paper))[0].shape
    assert (first.num_hidden_layers, first.hidden_size, first.num_attention_heads) == (24, 2048, 16)


def test_bad_requests_say_what_to_change():
    source = named_shape("smollm2_135m")
    with pytest.raises(ValueError, match="fewer than the source's 134,515,008"):
        propose_targets(source, 200_000_000)
    with pytest.raises(ValueError, match=r"no uniform target shape within 0\.0% .*the closest is"):
        propose_targets(source, 56_000_001, tolerance=1e-9)
    with pytest.raises(ValueError, match="tolerance must be a fraction"):
        propose_targets(source, 56_000_000, tolerance=2)
    with pytest.raises(ValueError, match="exceed the source's hidden"):
        propose_targets(source, 56_000_000, hidden_multiple=1024)


def override_of(text: str) -> str:
    line = next(
        line.strip() for line in text.splitlines() if line.strip().startswith("variables.target_model=")
    )
    key, value = line.split("=", 1)
    return f"{key}={value.strip(chr(34))}"  # the shell would drop the quotes


def test_cli_with_a_named_source_prints_candidates_and_an_override(capsys):
    assert main(["--source", "smollm2_135m", "--target-params", "56M", "--candidates", "3"]) == 0
    text = capsys.readouterr().out
    rows = [line for line in text.splitlines() if re.match(r"^\s+\d+\s+\d+\s+[\d,]+\s", line)]
    assert len(rows) == 3
    assert "56,198,784" in rows[0] and "+0.35%" in rows[0]
    assert "134,515,008 parameters" in text
    cfg = load_config(RECIPE, [override_of(text)])  # the printed override plans the printed count
    assert count_params(PruningPlan.from_config(cfg).target) == 56_198_784


def test_cli_with_a_recipe_checks_its_override_and_takes_an_hf_folder(tmp_path, capsys):
    from transformers import LlamaConfig

    assert main([RECIPE, "--target-params", "60M"]) == 0  # the recipe's source: SmolLM2 by its named shape
    text = capsys.readouterr().out
    assert f"as an override of {RECIPE} (loaded and planned with it:" in text
    first = propose_targets(named_shape("smollm2_135m"), 60_000_000)[0]
    assert f"{first.params:,} parameters" in text
    tiny = named_shape("tiny_gqa")  # an HF folder: only its config.json is read
    fields = {name: getattr(tiny, name) for name in (*PRUNABLE_FIELDS, "vocab_size", "head_dim")}
    LlamaConfig(**fields).save_pretrained(tmp_path / "hf")
    assert main(["--source", str(tmp_path / "hf"), "--target-params", "0.15M"]) == 0
    text = capsys.readouterr().out
    assert "KV groups dividing 4" in text and f"{count_params(tiny):,} parameters" in text


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["--source", "smollm2_135m", "--target-params", "lots"],
            "'lots' is not a positive whole number of parameters",
        ),
        (["--source", "smollm2_135m", "--target-params", "1B"], "fewer than the source's"),
        (["--source", "/no/such/model", "--target-params", "1M"], "--source: source model '/no/such/model'"),
        (["yamls/small/smollm2_51m_cpt.yaml", "--target-params", "30M"], "has no pruning section"),
    ],
)
def test_cli_errors(argv, message, capsys):
    assert main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        ([RECIPE, "--source", "smollm2_135m", "--target-params", "56M"], "not both"),
        (["--source", "smollm2_135m"], "--source needs --target-params"),
        ([], "give a run yaml"),
    ],
)
def test_cli_usage_errors(argv, message, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2 and message in capsys.readouterr().err


def test_the_plan_of_a_yaml_is_unchanged(capsys):
    assert main([RECIPE]) == 0
    text = capsys.readouterr().out
    assert "134,515,008" in text and "51,330,432" in text and "2/3 per group" in text
