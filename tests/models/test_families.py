"""Model families (Qwen2, Mistral) at the three parity levels, their parameter counts, and refused configs.

(a) our model with no masks / unit masks == the stock HF class; (b) the masked model under exact-target
final masks (random soft values) == ``prune_model``'s output; (c) that cut exported through
``export_model_state`` loads strictly as the stock class with the same logits and ``count_params``
parameters. Tiny random configs: Qwen2 (GQA, random q/k/v biases, tied and untied, and a distilled-style
config with ``use_sliding_window: false``) and Mistral (GQA, sliding_window null or never in effect).
The sliding-window rule is checked against what the installed transformers computes (equal logits up to
``sliding_window`` tokens, different one token past it exactly where a window applies: 4.51's eager/sdpa
Qwen2 applies it to every layer, flag or not; 5.x only with ``use_sliding_window`` to its ``layer_types``)
and on the configs that ship (``Qwen2Config()``'s defaults, DeepSeek-R1-Distill-Qwen-1.5B's); the masked
model's own guard follows the same rule. The end-to-end test prunes a Qwen2 with prune_tiny and checks the
export's tokenizer files are the source's.
"""

import json

import pytest
import torch
from tiny import TINY_TARGET, make_hf_family, run_overrides, unit_masks
from transformers import AutoModelForCausalLM, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from shearing.models.family import FAMILIES, TRANSFORMERS_5, check_sliding_window, family_of
from shearing.models.hf_io import config_from_shape, load_source_model
from shearing.models.masks import Masks, count_masked_params
from shearing.models.shapes import (
    count_params,
    named_shape,
    read_config_json,
    resolve_target_shape,
    shape_from_hf_config,
)
from shearing.pruning.l0 import L0Module
from shearing.pruning.surgery import prune_model

FAMILY_CASES = {
    "qwen2_untied": ("qwen2", dict(num_key_value_heads=4)),
    "qwen2_tied": ("qwen2", dict(num_key_value_heads=2, tie_word_embeddings=True, sliding_window=None)),
    "mistral_no_window": ("mistral", dict(num_key_value_heads=4, sliding_window=None)),
    "mistral_long_window": ("mistral", dict(num_key_value_heads=2, sliding_window=256)),  # == max positions
    # as distilled Qwen2 models ship (window unused, shorter than max positions, longer than the test's T)
    "qwen2_distilled": (
        "qwen2",
        dict(num_key_value_heads=2, use_sliding_window=False, sliding_window=64, max_window_layers=2),
    ),
}
# DeepSeek-R1-Distill-Qwen-1.5B's config.json, its window fields (the shape is the tiny one)
DISTILLED_QWEN2 = dict(
    use_sliding_window=False, sliding_window=4096, max_window_layers=21, max_position_embeddings=131072
)
# Qwen2Config()'s window fields as transformers 4.x writes them (and Qwen2 checkpoints ship them)
QWEN2_DEFAULTS_4X = dict(
    use_sliding_window=False, sliding_window=4096, max_window_layers=28, max_position_embeddings=32768
)
STOCK = {"qwen2": Qwen2ForCausalLM, "mistral": MistralForCausalLM}
FAMILIES_ALL = ["hidden", "head", "intermediate", "layer"]


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module", params=sorted(FAMILY_CASES))
def family_dir(request, tmp_path_factory):
    model_type, fields = FAMILY_CASES[request.param]
    path = make_hf_family(tmp_path_factory.mktemp(request.param), model_type, seed=3, **fields)
    return model_type, path


def _final_masks(source, target, seed=0):
    l0 = L0Module(source, target, FAMILIES_ALL)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for log_alpha in l0.log_alphas.values():
            log_alpha.copy_(torch.rand(log_alpha.shape, generator=gen) * 6 - 2)
    return l0, l0.deterministic_masks(exact=True)


def test_a_matches_stock_hf_without_and_with_unit_masks(family_dir):
    model_type, path = family_dir
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    assert type(hf) is STOCK[model_type]
    ours, config = load_source_model(path)  # strict: every HF tensor (biases included) loaded
    ours.eval()
    assert type(config) is FAMILIES[model_type].config_class
    has_bias = ours.model.layers[0].self_attn.q_proj.bias is not None
    assert has_bias == (model_type == "qwen2")
    if has_bias:
        assert float(ours.model.layers[0].self_attn.k_proj.bias.abs().sum()) > 0  # real biases, not zeros
    ids = torch.randint(0, config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(1))
    expected = _logits(hf, ids)
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), expected)
        torch.testing.assert_close(ours(ids, masks=unit_masks(config)), expected)
    shape = shape_from_hf_config(config)
    assert shape.qkv_bias == (model_type == "qwen2")
    assert sum(p.numel() for p in hf.parameters()) == count_params(shape)


def test_b_c_masked_equals_pruned_equals_exported_stock_class(family_dir, tmp_path):
    from shearing.composer.model import ComposerShearedLlama
    from shearing.export.hf import export_model_state

    model_type, path = family_dir
    model, config = load_source_model(path)
    model.eval()
    source = shape_from_hf_config(config)
    target = resolve_target_shape(source, TINY_TARGET)  # 48 hidden, 3 layers, 4 heads over 2 groups, 96 MLP
    l0, masks = _final_masks(source, target)
    soft = [z for z in masks.values() if ((z != 0) & (z != 1)).any()]
    assert soft, "the final masks should carry soft values to fold"
    ids = torch.randint(0, config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        masked = model(ids, masks=masks)

    # (b) the physical cut
    result = prune_model(model, masks)
    assert result.shape == target and result.shape.qkv_bias == (model_type == "qwen2")
    assert sum(p.numel() for p in result.model.parameters()) == count_params(target)
    kept = Masks.from_families({k: (v > 0).float() for k, v in masks.items()}, source.group_size)
    assert float(count_masked_params(source, kept)) == count_params(target)
    with torch.no_grad():
        torch.testing.assert_close(result.model.eval()(ids), masked)

    # (c) exported, loaded strictly by the stock class
    meta = {
        "hf_config": config.to_dict(),
        "target": target.prunable(),
        "families": FAMILIES_ALL,
        "tokenizer": None,
    }
    state = ComposerShearedLlama(model, l0=l0, metadata=meta).state_dict()
    summary = export_model_state(state, tmp_path / "hf", force=True)  # random logits: the gate would refuse
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert written["model_type"] == model_type
    assert written["architectures"] == [FAMILIES[model_type].architecture]
    assert written["sliding_window"] == config.sliding_window
    hf, info = AutoModelForCausalLM.from_pretrained(tmp_path / "hf", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf) is STOCK[model_type]
    n = sum(p.numel() for p in hf.parameters())
    assert n == count_params(target) == summary["target"]["num_params"]
    torch.testing.assert_close(_logits(hf.eval(), ids), masked)


def test_qwen2_bias_count_and_family_rows():
    shape = named_shape("tiny_gqa")
    qwen = shape_from_hf_config(config_from_shape(shape).to_dict() | {"model_type": "qwen2"})
    assert qwen.qkv_bias and not shape.qkv_bias
    assert count_params(qwen) - count_params(shape) == 4 * (8 + 2 * 4) * 16
    config = config_from_shape(qwen, "qwen2")
    assert isinstance(config, Qwen2Config)
    assert sum(p.numel() for p in Qwen2ForCausalLM(config).parameters()) == count_params(qwen)
    with pytest.raises(ValueError, match="qkv_bias"):
        config_from_shape(shape, "qwen2")
    assert family_of({"architectures": ["LlamaForCausalLM"]}).name == "llama"
    assert (
        named_shape("llama2_7b").qkv_bias is False and count_params(named_shape("llama2_7b")) == 6_738_415_616
    )


@pytest.mark.parametrize(
    "model_type, fields, match",
    [
        ("mistral", dict(sliding_window=0), "sliding_window=0 must be a positive integer"),
        ("llama", dict(sliding_window=4096), "sliding_window=4096 in a llama config"),
        ("gpt2", dict(), "model_type 'gpt2' is not a LLaMA-family checkpoint"),
        ("llama", dict(attention_bias=True), "attention_bias=true is not supported"),
        ("qwen2", dict(hidden_act="gelu"), "hidden_act 'gelu' is not supported"),
    ],
)
def test_refused_configs(tmp_path, model_type, fields, match):
    raw = {
        **config_from_shape(named_shape("tiny_gqa")).to_dict(),
        "max_position_embeddings": 256,
        "model_type": model_type,
        "architectures": [],
        **fields,
    }
    (tmp_path / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ValueError, match=match):
        load_source_model(tmp_path)


def _raw(model_type, **fields):
    """A tiny config.json dict of ``model_type`` (256 positions) with ``fields``."""
    base = config_from_shape(named_shape("tiny_gqa")).to_dict()
    return {**base, "max_position_embeddings": 256, "model_type": model_type, "architectures": [], **fields}


UNUSED_WINDOW = r"sliding_window=4096 with use_sliding_window=false: the model uses no window.*eager and sdpa"
UNUSED_WINDOW += (
    r'.*only flash_attention_2 reads use_sliding_window.*Set "sliding_window": null in this config.json'
)
UNUSED_WINDOW += r".*or lower max_seq_len to at most 4096"


@pytest.mark.parametrize(
    "raw, seq_len",
    [
        (Qwen2Config().to_dict(), 4096),  # 4.x: window 4096, flag false; 5.x: no window
        (Qwen2Config().to_dict(), 64),
        (_raw("qwen2", **QWEN2_DEFAULTS_4X), 4096),
        (_raw("qwen2", **DISTILLED_QWEN2), 4096),
        (_raw("mistral", sliding_window=128), 64),  # window shorter than max positions, longer than the run
        (_raw("mistral", sliding_window=64), 64),  # a position never looks 64 back in 64 tokens
        (_raw("qwen2", use_sliding_window=True, sliding_window=64, max_window_layers=2), 64),
        (_raw("mistral", sliding_window=None), 256),
    ],
    ids=[
        "qwen2_defaults",
        "qwen2_defaults_short",
        "qwen2_defaults_4x",
        "distilled_qwen2",
        "mistral_longer",
        "mistral_equal",
        "qwen2_used_window_longer",
        "mistral_none",
    ],
)
def test_windows_that_never_apply_are_accepted(tmp_path, raw, seq_len):
    """Refused before for sliding_window < max_position_embeddings, whatever the run's max_seq_len."""
    (tmp_path / "config.json").write_text(json.dumps(raw))
    assert read_config_json(tmp_path)["sliding_window"] == raw["sliding_window"]  # the folder is not refused
    check_sliding_window(raw, seq_len, "config.json")


QWEN2_LAYERS_2_3 = (
    r"layers 2\.\.3 of this Qwen2 attend within a 32-token window.*lower max_seq_len to at most 32"
)


@pytest.mark.parametrize(
    "raw, seq_len, match",
    [
        (
            _raw("mistral", sliding_window=32),
            64,
            "sliding_window=32: MistralForCausalLM attends within a 32-token window in every layer, so on "
            "max_seq_len=64-token sequences.*lower max_seq_len to at most 32",
        ),
        # no sliding_window key: MistralConfig's default window (4096), as from_pretrained reads it
        (_raw("mistral", max_position_embeddings=32768), 8192, "sliding_window=4096: MistralForCausalLM"),
        (
            _raw("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=2),
            64,
            "sliding_window=32 with use_sliding_window=true.*" + QWEN2_LAYERS_2_3,
        ),
        # no sliding_window key: Qwen2Config's __init__ default (4096), which 5.x keeps when the flag is on
        (
            _raw("qwen2", use_sliding_window=True, max_window_layers=2, max_position_embeddings=32768),
            8192,
            "sliding_window=4096 with use_sliding_window=true",
        ),
    ],
    ids=["mistral_shorter", "mistral_default", "qwen2_used_window", "qwen2_used_default_window"],
)
def test_windows_that_apply_are_refused_with_why(raw, seq_len, match):
    with pytest.raises(ValueError, match=match):
        check_sliding_window(raw, seq_len, "config.json")


@pytest.mark.parametrize(
    "raw, seq_len, match",
    [
        (_raw("qwen2", **QWEN2_DEFAULTS_4X), 4097, UNUSED_WINDOW),
        (_raw("qwen2", **DISTILLED_QWEN2), 8192, UNUSED_WINDOW),
        (
            _raw("qwen2", use_sliding_window=True, sliding_window=32, max_window_layers=4),  # no layer >= 4
            64,
            "use_sliding_window=true but max_window_layers=4 >= num_hidden_layers=4: the model uses no window, "
            'but.*eager and sdpa.*Set "sliding_window": null',
        ),
        (
            _raw("qwen2", use_sliding_window=True, sliding_window=32, layer_types=["full_attention"] * 4),
            64,
            "max_window_layers=28 >= num_hidden_layers=4: the model uses no window",  # 4.51 reads no layer_types
        ),
    ],
    ids=["qwen2_defaults", "distilled_qwen2", "qwen2_window_layers_past_the_last", "qwen2_layer_types_full"],
)
def test_unused_qwen2_windows_follow_the_installed_transformers(raw, seq_len, match):
    """4.51's eager/sdpa Qwen2 applies sliding_window to every layer, flag or not: refused there. 5.x applies
    it only with use_sliding_window, to the layers layer_types marks: these configs have no window there."""
    if TRANSFORMERS_5:
        check_sliding_window(raw, seq_len, "config.json")
    else:
        with pytest.raises(ValueError, match=match):
            check_sliding_window(raw, seq_len, "config.json")


@pytest.mark.parametrize(
    "model_type, fields, applies",
    [
        ("mistral", dict(sliding_window=16), (True, True)),
        ("qwen2", dict(sliding_window=16, use_sliding_window=False), (True, False)),
        ("qwen2", dict(sliding_window=16, use_sliding_window=True, max_window_layers=2), (True, True)),
        ("qwen2", dict(sliding_window=16, use_sliding_window=True, max_window_layers=4), (True, False)),
        (
            "qwen2",
            dict(
                sliding_window=16,
                use_sliding_window=True,
                max_window_layers=4,
                layer_types=["sliding_attention"] + ["full_attention"] * 3,
            ),
            (True, True),
        ),
    ],
    ids=["mistral", "qwen2_unused", "qwen2_upper_layers", "qwen2_layers_past_the_last", "qwen2_layer_types"],
)
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_window_rule_is_what_stock_transformers_computes(tmp_path, model_type, fields, applies, attn):
    """Accepted exactly where our windowless model gives the stock class's logits: up to sliding_window
    tokens always; one token more only where the installed transformers applies no window (``applies``:
    under 4.51, under 5.x). The masked model's own guard refuses exactly the sequences the check refuses."""
    applies = applies[TRANSFORMERS_5]
    path = make_hf_family(tmp_path, model_type, seed=3, **fields)
    raw = json.loads((path / "config.json").read_text())
    hf = AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()
    ours, _ = load_source_model(path)
    ours.eval()
    for seq_len in (16, 17):
        ids = torch.randint(0, 512, (2, seq_len), generator=torch.Generator().manual_seed(1))
        with torch.no_grad():
            if seq_len > 16 and applies:  # the model itself refuses a sequence the window would apply to ...
                with pytest.raises(
                    ValueError, match="17-token sequence is longer than this model's sliding_window=16"
                ):
                    ours(ids)
                ours.window = (
                    None  # ... and without that guard it would compute what the stock model does not
                )
            same = torch.allclose(ours(ids), _logits(hf, ids), atol=1e-5, rtol=1e-4)
        try:
            check_sliding_window(raw, seq_len, "config.json")
            accepted = True
        except ValueError:
            accepted = False
        assert accepted == same == (seq_len <= 16 or not applies), (seq_len, accepted, same)


@pytest.mark.parametrize("role", ["source", "teacher"])
def test_run_validation_checks_the_window_against_max_seq_len(tmp_path, role):
    """prune_tiny (max_seq_len 64) from a Mistral whose window is 64 runs; one of 32 is refused before any
    weights load, for the source and for a distillation teacher alike."""
    from shearing.config import load_config
    from shearing.validation import check_context_length, check_distillation

    def cfg_with(window):
        folder = make_hf_family(tmp_path / f"w{window}", "mistral", seed=3, sliding_window=window)
        plain = make_hf_family(tmp_path / "plain", "mistral", seed=3, sliding_window=None)
        source, teacher = (folder, plain) if role == "source" else (plain, folder)
        return load_config(
            "yamls/testing/prune_tiny.yaml",
            [f"variables.source_model={source}", "distillation.alpha=0.5", f"distillation.teacher={teacher}"],
        )

    check = check_context_length if role == "source" else check_distillation
    check(cfg_with(64))
    with pytest.raises(
        ValueError, match=r"w32/config.json: sliding_window=32: MistralForCausalLM.*at most 32"
    ):
        check(cfg_with(32))


@pytest.mark.slow
def test_qwen2_prune_run_exports_stock_qwen2(tmp_path, tokenizer_dir, tiny_data):
    """End to end: prune_tiny from a tied Qwen2 source for a few steps, exported at fit end (forced: the
    masks have not converged) as a Qwen2ForCausalLM of the exact target shape, with the source's tokenizer
    files (transformers 5 loads a qwen2 folder's tokenizer as its own Qwen2Tokenizer, whose save would
    write its default pad token and its own pre-tokenizer into tokenizer.json)."""
    from shearing.train import train_from_yaml

    source = make_hf_family(
        tmp_path / "qwen2", "qwen2", tokenizer_dir, seed=5, num_key_value_heads=4, tie_word_embeddings=True
    )
    run_dir = tmp_path / "run"
    overrides = run_overrides(
        source,
        tiny_data,
        run_dir,
        "variables.max_duration=6ba",
        "variables.save_interval=6ba",
        "variables.eval_interval=6ba",
        "export.on_fit_end=true",
        "export.force=true",
        "export.gate_eval_batches=1",
    )
    trainer = train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)
    hf, info = AutoModelForCausalLM.from_pretrained(run_dir / "hf", output_loading_info=True)
    assert not any(info[key] for key in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
    assert type(hf) is Qwen2ForCausalLM and hf.config.tie_word_embeddings
    assert (run_dir / "hf" / "tokenizer.json").read_bytes() == (source / "tokenizer.json").read_bytes()
    for name, value in TINY_TARGET.items():
        assert getattr(hf.config, name) == value
    target = resolve_target_shape(
        shape_from_hf_config(json.loads((source / "config.json").read_text())), TINY_TARGET
    )
    assert sum(p.numel() for p in hf.parameters()) == count_params(target)
    l0 = trainer.state.model.l0
    l0.eval()
    masks = l0.deterministic_masks(exact=True)
    ids = torch.randint(0, 512, (2, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        masked = trainer.state.model.model.eval()(ids, masks=masks)
    torch.testing.assert_close(_logits(hf.eval(), ids), masked)


def test_gguf_refuses_non_llama_families_before_writing(tmp_path):
    from shearing.export.gguf import write_gguf

    config = config_from_shape(
        shape_from_hf_config({**config_from_shape(named_shape("tiny_gqa")).to_dict(), "model_type": "qwen2"}),
        "qwen2",
    )
    with pytest.raises(ValueError, match="model_type 'qwen2' is not supported: export without --gguf"):
        write_gguf(config, {}, tmp_path, tmp_path / "model.gguf")
    assert not (tmp_path / "model.gguf").exists()
