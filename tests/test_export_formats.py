"""Export formats users expect: GGUF (``--gguf``), the model card ``README.md``, ``generation_config.json``.

GGUF: the ``pruned_run`` export written with ``--gguf`` loads back through transformers' own GGUF reader
(``from_pretrained(dir, gguf_file=...)``, which undoes llama.cpp's q/k row order) to the same logits as
the HF export, and its tokenizer encodes and decodes like the exported one; a tied-embeddings model with
head_dim != hidden / heads likewise; float16 writes an F16 file. The card and the generation config are
checked against the run's own records (shearing_run.json, metrics.jsonl, the checkpoint's timestamp).
"""

from __future__ import annotations

import json

import pytest
import torch
from tiny import make_hf_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from shearing.export import SUMMARY_NAME, export_model_state, load_checkpoint, main
from shearing.gguf_export import write_gguf
from shearing.model_card import last_eval

SENTENCE = "def parse(self, text):\n    return [line.strip() for line in text.splitlines()]"


@pytest.fixture(scope="module")
def exported(pruned_run, tmp_path_factory):
    _, run_dir = pruned_run
    out = tmp_path_factory.mktemp("formats") / "x"
    assert main(["--checkpoint", str(run_dir), "--output", str(out), "--gguf"]) == 0
    return run_dir, out


def _logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


def _same_model_and_tokenizer(folder, gguf_name, atol=1e-5):
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    gg = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf_name, torch_dtype=torch.float32).eval()
    for field in ("hidden_size", "num_hidden_layers", "num_attention_heads", "num_key_value_heads"):
        assert getattr(gg.config, field) == getattr(hf.config, field), field
    assert gg.config.intermediate_size == hf.config.intermediate_size
    assert gg.config.head_dim == hf.config.head_dim
    assert gg.config.tie_word_embeddings == hf.config.tie_word_embeddings
    ids = torch.randint(0, hf.config.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(_logits(gg, ids), _logits(hf, ids), atol=atol, rtol=atol)
    tok = AutoTokenizer.from_pretrained(folder)
    gtok = AutoTokenizer.from_pretrained(folder, gguf_file=gguf_name)
    ids_hf = tok(SENTENCE, add_special_tokens=False).input_ids
    ids_gg = gtok(SENTENCE, add_special_tokens=False).input_ids
    assert ids_gg == ids_hf
    assert gtok.decode(ids_gg) == SENTENCE
    return hf, gg


def test_gguf_of_pruned_export_loads_back_with_same_logits(exported):
    _, out = exported
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["gguf"]["file"] == "model.gguf" and summary["gguf"]["file_type"] == "ALL_F32"
    assert (out / "model.gguf").is_file()
    hf, _ = _same_model_and_tokenizer(out, "model.gguf")
    assert not hf.config.tie_word_embeddings  # the tiny source is untied: output.weight is written


def test_gguf_tied_embeddings_and_float16(tmp_path, tokenizer_dir):
    # Tied embeddings and head_dim (16) != hidden / heads (64 / 8): both must survive the round trip.
    src = make_hf_llama(tmp_path / "tied", tokenizer_dir, seed=3, tie_word_embeddings=True)
    model = AutoModelForCausalLM.from_pretrained(src)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    info = write_gguf(model.config, state, src, src / "tied.gguf", dtype="float32")
    assert info["file_type"] == "ALL_F32"
    from gguf import GGUFReader

    names = {t.name for t in GGUFReader(src / "tied.gguf").tensors}
    assert "output.weight" not in names and "token_embd.weight" in names
    _, gg = _same_model_and_tokenizer(src, "tied.gguf")
    assert gg.config.tie_word_embeddings

    info = write_gguf(model.config, state, src, src / "half.gguf", dtype="float16")
    assert info["file_type"] == "MOSTLY_F16"
    types = {t.name: t.tensor_type.name for t in GGUFReader(src / "half.gguf").tensors}
    assert types["blk.0.attn_q.weight"] == "F16" and types["blk.0.attn_norm.weight"] == "F32"
    half = AutoModelForCausalLM.from_pretrained(src, gguf_file="half.gguf", torch_dtype=torch.float32).eval()
    ids = torch.arange(20).unsqueeze(0)
    torch.testing.assert_close(_logits(half, ids), _logits(model.eval(), ids), atol=2e-2, rtol=2e-2)


def test_bad_gguf_name_is_refused_before_work(pruned_run, tmp_path, capsys):
    _, run_dir = pruned_run
    code = main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "x"), "--gguf", "sub/model.bin"])
    assert code == 2
    err = capsys.readouterr().err
    assert "--gguf 'sub/model.bin'" in err and "ending in .gguf" in err
    assert not (tmp_path / "x").exists()


def test_model_card_has_the_run_facts(exported):
    run_dir, out = exported
    card = (out / "README.md").read_text()
    summary = json.loads((out / SUMMARY_NAME).read_text())
    record = json.loads((run_dir / "shearing_run.json").read_text())
    raw = torch.load(run_dir / "latest-rank0.pt", map_location="cpu", weights_only=False)
    tokens = int(raw["state"]["timestamp"]["Timestamp"]["token"])
    assert summary["run"]["tokens"] == tokens and summary["run"]["steps"] == 300
    assert f"Source model: `{summary['source_path']}`" in card
    assert "| hidden_size | 64 | 48 |" in card and "| num_hidden_layers | 4 | 3 |" in card
    assert (
        f"| num_params | {summary['source']['num_params']:,} | {summary['target']['num_params']:,} |" in card
    )
    assert f"- data: `{record['train_data']}`" in card
    assert "- steps (batches): 300" in card and f"- tokens seen: {tokens:,}" in card
    step, evals = last_eval(run_dir / "metrics.jsonl")
    assert step == 300 and evals  # prune_tiny evaluates every 100 batches
    assert "Last evaluation of the run, at step 300:" in card
    for name, value in evals.items():
        assert f"| {name} | {value:.4f} |" in card
    assert "## Convergence gate: passed" in card and "max_sparsity_gap" in card
    assert "`model.gguf` (GGUF, ALL_F32" in card
    assert f"python -m shearing.export --checkpoint {run_dir} --output {out} --gguf" in card


def test_generation_config_is_the_sources(exported):
    _, out = exported
    summary = json.loads((out / SUMMARY_NAME).read_text())
    assert summary["generation_config"] == "source"
    source = GenerationConfig.from_pretrained(summary["source_path"])
    assert GenerationConfig.from_pretrained(out).to_dict() == source.to_dict()


def test_generation_config_from_config_when_the_source_has_none(pruned_run, tmp_path, tokenizer_dir):
    _, run_dir = pruned_run
    model_state, step, _ = load_checkpoint(run_dir)
    meta = dict(model_state["_extra_state"])
    bare = make_hf_llama(tmp_path / "bare", tokenizer_dir)
    (bare / "generation_config.json").unlink()
    meta["source"] = str(bare)
    meta["hf_config"] = {**meta["hf_config"], "bos_token_id": 7, "eos_token_id": 9}
    model_state = {**model_state, "_extra_state": meta}
    summary = export_model_state(model_state, tmp_path / "out", step=step, force=True)
    assert summary["generation_config"] == "config"
    generation = GenerationConfig.from_pretrained(tmp_path / "out")
    assert (generation.bos_token_id, generation.eos_token_id) == (7, 9)


def test_fit_end_export_writes_card_and_generation_config(pruned_run):
    _, run_dir = pruned_run  # export.on_fit_end=true: the callback's export at run/hf
    card = (run_dir / "hf" / "README.md").read_text()
    assert "- steps (batches): 300" in card and "- tokens seen: 153,600" in card  # 300 x 8 x 64
    assert "Last evaluation of the run, at step 300:" in card and "## Convergence gate: passed" in card
    assert (run_dir / "hf" / "generation_config.json").is_file()


def test_gguf_of_real_smollm2_loads_back(smollm2_dir, tmp_path):
    # The real thing: a 49k-token byte-level BPE with chat special tokens, 9 query heads over 3 KV heads,
    # tied embeddings, rope theta 1e5. ~20 s on 2 cores (two 135M loads and a 540 MB file).
    import shutil

    folder = tmp_path / "smol"
    shutil.copytree(smollm2_dir, folder)
    model = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32)
    state = {k: v for k, v in model.state_dict().items() if k != "lm_head.weight"}
    write_gguf(model.config, state, folder, folder / "model.gguf")
    _, gg = _same_model_and_tokenizer(folder, "model.gguf", atol=1e-4)
    assert gg.config.rope_theta == model.config.rope_theta and gg.config.tie_word_embeddings


def test_bfloat16_beyond_float16_range_is_written_in_float32(tmp_path, tokenizer_dir):
    src = make_hf_llama(tmp_path / "big", tokenizer_dir, seed=4)
    model = AutoModelForCausalLM.from_pretrained(src)
    state = {k: v.to(torch.bfloat16) for k, v in model.state_dict().items()}
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6  # fine in bf16, inf in fp16
    with pytest.warns(UserWarning, match="beyond float16; the GGUF is written in float32"):
        info = write_gguf(model.config, state, src, src / "big.gguf", dtype="bfloat16")
    assert info["file_type"] == "ALL_F32"
    info = write_gguf(
        model.config, {k: v.clamp(-1, 1) for k, v in state.items()}, src, src / "ok.gguf", "bfloat16"
    )
    assert info["file_type"] == "MOSTLY_F16"


def test_non_byte_level_tokenizer_is_refused_before_writing(tmp_path, tokenizer_dir):
    import shutil

    src = make_hf_llama(tmp_path / "spm", tokenizer_dir)
    spec = json.loads((src / "tokenizer.json").read_text())
    spec["pre_tokenizer"] = {
        "type": "Metaspace",
        "replacement": "\u2581",
        "prepend_scheme": "always",
        "split": True,
    }
    (src / "tokenizer.json").write_text(json.dumps(spec))
    model = AutoModelForCausalLM.from_pretrained(src)
    with pytest.raises(ValueError, match="pre-tokenizer Metaspace.*convert_hf_to_gguf.py"):
        write_gguf(model.config, model.state_dict(), src, src / "x.gguf")
    assert not (src / "x.gguf").exists()
    shutil.rmtree(src)


def test_export_gguf_config_is_checked_before_training(tmp_path):
    from types import SimpleNamespace

    from shearing.callbacks.export import check_export_config
    from shearing.config import ExportConfig

    cfg = SimpleNamespace(
        save_folder=str(tmp_path / "run"), export=ExportConfig(on_fit_end=True, gguf="m.bin")
    )
    with pytest.raises(ValueError, match="export.gguf: 'm.bin' must be a file name ending in .gguf"):
        check_export_config(cfg)
    cfg.export.gguf = "m.gguf"
    assert check_export_config(cfg) == tmp_path / "run" / "hf"


def test_rope_scaling_llama3_factors_and_linear_metadata(tmp_path, tokenizer_dir):
    from gguf import GGUFReader
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    llama3 = {
        "rope_type": "llama3",
        "factor": 8.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 64,
    }
    src = make_hf_llama(tmp_path / "l3", tokenizer_dir, rope_scaling=llama3)
    model = AutoModelForCausalLM.from_pretrained(src)
    write_gguf(model.config, model.state_dict(), src, src / "l3.gguf")
    tensors = {t.name: t for t in GGUFReader(src / "l3.gguf").tensors}
    factors = torch.from_numpy(tensors["rope_freqs.weight"].data.copy())
    # llama.cpp divides the default frequencies by these factors: they must give transformers' llama3 ones.
    default, _ = ROPE_INIT_FUNCTIONS["default"](model.config, "cpu")
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    torch.testing.assert_close((default / factors).float(), scaled.float(), rtol=1e-5, atol=1e-7)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the smooth band are present

    src = make_hf_llama(tmp_path / "lin", tokenizer_dir, rope_scaling={"rope_type": "linear", "factor": 2.0})
    model = AutoModelForCausalLM.from_pretrained(src)
    write_gguf(model.config, model.state_dict(), src, src / "lin.gguf")
    fields = GGUFReader(src / "lin.gguf").fields
    assert bytes(fields["llama.rope.scaling.type"].parts[-1]).decode() == "linear"
    assert float(fields["llama.rope.scaling.factor"].parts[-1][0]) == 2.0
