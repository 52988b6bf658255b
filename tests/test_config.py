"""Run yamls: every committed yaml loads and validates; bad keys and bad targets fail before any work."""

from pathlib import Path

import pytest

from shearing.config import load_config
from shearing.models.shapes import count_params, named_shape
from shearing.plan import render_plan
from shearing.train import validate_run

REPO = Path(__file__).resolve().parents[1]
YAMLS = sorted((REPO / "yamls").rglob("*.yaml"))


@pytest.mark.parametrize("path", YAMLS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_yaml_loads_and_plans(path):
    cfg = load_config(path)
    assert cfg.variables["seed"] == cfg.seed
    render_plan(str(path))  # shapes and mask families validate without weights or data


def test_plan_of_the_reference_recipes():
    text = render_plan(str(REPO / "yamls/pruning/llama2_7b_to_2.7b.yaml"))
    assert "6,738,415,616" in text and "2,701,560,320" in text
    assert "1,345,423,360" in render_plan(str(REPO / "yamls/pruning/llama2_7b_to_1.3b.yaml"))


def test_target_from_the_command_line():
    cfg = load_config(
        REPO / "yamls/testing/prune_tiny.yaml",
        [
            "variables.target_model={hidden_size: 32, num_hidden_layers: 2, num_attention_heads: 4, "
            "num_key_value_heads: 4, intermediate_size: 64}"
        ],
    )
    assert cfg.pruning.target["hidden_size"] == 32
    text = render_plan(
        str(REPO / "yamls/testing/prune_tiny.yaml"), ["variables.target_model=tiny_gqa_pruned"]
    )
    assert f"{count_params(named_shape('tiny_gqa_pruned')):,}" in text


def test_unknown_key_names_the_key_and_a_suggestion():
    with pytest.raises(ValueError, match=r"'lagrangian_warmpu' \(did you mean 'lagrangian_warmup'\?\)"):
        load_config(REPO / "yamls/testing/prune_tiny.yaml", ["pruning.lagrangian_warmpu=10ba"])


def test_missing_required_variable(tmp_path):
    text = (REPO / "yamls/testing/prune_tiny.yaml").read_text().replace("  seed: 17\n", "")
    (tmp_path / "run.yaml").write_text(text.replace("${variables.seed}", "17"))
    with pytest.raises(ValueError, match=r"variables is missing \['seed'\]"):
        load_config(tmp_path / "run.yaml")


def test_wrong_type_is_rejected():
    with pytest.raises(ValueError, match="global_train_batch_size must be an integer"):
        load_config(REPO / "yamls/testing/prune_tiny.yaml", ["global_train_batch_size=eight"])


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "variables.target_model={hidden_size: 128, num_hidden_layers: 3, num_attention_heads: 4, "
            "num_key_value_heads: 2, intermediate_size: 96}",
            "larger than the source",
        ),
        (
            "variables.target_model={hidden_size: 48, num_hidden_layers: 3, num_attention_heads: 6, "
            "num_key_value_heads: 4, intermediate_size: 96}",
            "divisible",
        ),
        ("variables.data_local=/nonexistent/data", "does not exist"),
        ("variables.source_model=/nonexistent/model", "not an existing directory"),
        ("pruning.families=[head,intermediate,layer]", "add 'hidden'"),
    ],
)
def test_bad_runs_fail_validation(override, message, tiny_data):
    cfg = load_config(REPO / "yamls/testing/prune_tiny.yaml", [f"variables.data_local={tiny_data}", override])
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        validate_run(cfg)


def test_sequence_length_must_match_the_data(tiny_data):
    cfg = load_config(
        REPO / "yamls/testing/prune_tiny.yaml", [f"variables.data_local={tiny_data}", "max_seq_len=128"]
    )
    with pytest.raises(ValueError, match="packed into 64-token sequences"):
        validate_run(cfg)


def _foundry_yaml(tmp_path, model_block: str, tokenizer_block: str = "") -> Path:
    """prune_tiny with its ``model:`` section written the llm-foundry way."""
    text = (REPO / "yamls/testing/prune_tiny.yaml").read_text()
    start = text.index("model:\n")
    end = text.index("\npruning:")
    path = tmp_path / "foundry.yaml"
    path.write_text(text[:start] + model_block + tokenizer_block + text[end:])
    return path


def test_llm_foundry_model_and_tokenizer_spellings_are_accepted(tmp_path, tiny_gqa_dir, tiny_data):
    path = _foundry_yaml(
        tmp_path,
        "model:\n  name: hf_causal_lm\n  pretrained: true\n"
        "  pretrained_model_name_or_path: ${variables.source_model}\n",
        "\ntokenizer:\n  name: ${variables.source_model}\n  kwargs:\n    model_max_length: ${max_seq_len}\n",
    )
    cfg = load_config(path, [f"variables.source_model={tiny_gqa_dir}", f"variables.data_local={tiny_data}"])
    assert cfg.model.source == str(tiny_gqa_dir) and cfg.model.tokenizer == str(tiny_gqa_dir)
    validate_run(cfg)  # the translated config is a complete, valid run


@pytest.mark.parametrize(
    "model_block, tokenizer_block, message",
    [
        (
            "model:\n  source: tiny_gqa\n  pretrained_model_name_or_path: other\n",
            "",
            r"model.pretrained_model_name_or_path='other' and model.source='tiny_gqa' disagree.*keep model.source",
        ),
        (
            "model:\n  name: mpt_causal_lm\n  source: tiny_gqa\n",
            "",
            r"model.name='mpt_causal_lm'.*drop model.name",
        ),
        ("model:\n  pretrained: false\n  source: tiny_gqa\n", "", r"model.pretrained=False.*named shape"),
        (
            "model:\n  source: tiny_gqa\n",
            "\ntokenizer:\n  name: tok\n  kwargs: {padding_side: left}\n",
            r"tokenizer.kwargs \['padding_side'\] are not supported.*model.tokenizer",
        ),
        (
            "model:\n  source: tiny_gqa\n",
            "\ntokenizer:\n  name: tok\n  kwargs: {model_max_length: 4096}\n",
            r"model_max_length=4096 but max_seq_len=64",
        ),
        (
            "model:\n  source: tiny_gqa\n  tokenizer: a\n",
            "\ntokenizer:\n  name: b\n",
            r"tokenizer.name='b' and model.tokenizer='a' disagree",
        ),
        ("model:\n  source: tiny_gqa\n", "\ntokenizer: tok\n", r"spelling is model.tokenizer: PATH"),
    ],
)
def test_llm_foundry_spellings_that_do_not_map_are_refused(tmp_path, model_block, tokenizer_block, message):
    with pytest.raises(ValueError, match=message):
        load_config(_foundry_yaml(tmp_path, model_block, tokenizer_block))


def test_a_folder_given_as_the_run_config_says_so(tmp_path):
    """``composer train.py yamls/testing`` (a folder): not "does not exist", but which yaml files it holds."""
    import re

    from shearing.train import train_from_yaml

    folder = REPO / "yamls/testing"
    names = sorted(p.name for p in folder.glob("*.yaml"))
    with pytest.raises(IsADirectoryError) as raised:
        train_from_yaml(folder)
    assert str(raised.value) == (
        f"run config {folder} is a folder, not a yaml file: give the run's yaml file instead, e.g. "
        f"{folder / names[0]} (the folder holds {', '.join(names)})"
    )
    assert "prune_tiny.yaml" in names
    with pytest.raises(IsADirectoryError, match=re.escape(f"{tmp_path} is a folder, not a yaml file: ")):
        load_config(tmp_path)  # no yaml inside: "(it holds none)"
