"""Export formats users expect: GGUF (``--gguf``), the model card ``README.md``, ``generation_config.json``.

GGUF: the ``pruned_run`` export written with ``--gguf`` loads back through transformers' own GGUF reader
(``from_pretrained(dir, gguf_file=...)``, which undoes llama.cpp's q/k row order) to the same logits as
the HF export, and its tokenizer encodes and decodes like the exported one; a tied-embeddings model with
head_dim != hidden / heads likewise; float16 writes an F16 file, and refuses a weight it cannot hold. The
GGUF's ``tokenizer.ggml.pre`` names each family's pre-tokenizer structure (others are refused) and its
bos/eos/pad ids are the export's generation config's (that llama.cpp then tokenizes and computes like
transformers is ``tests/test_gguf_llamacpp.py``). The card and the generation config are checked against
the run's own records (shearing_run.json, metrics.jsonl, the checkpoint's timestamp).
"""

from __future__ import annotations

import json

import pytest
import torch
from gguf_tokenizers import STRUCTURES, write_variant
from tiny import make_hf_llama
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from shearing.export.gguf import rope_settings, write_gguf
from shearing.export.gguf_vocab import identify_pre_tokenizer
from shearing.export.hf import SUMMARY_NAME, export_model_state, load_checkpoint, main
from shearing.export.model_card import last_eval

SENTENCE = "def parse(self, text):\n    return [line.strip() for line in text.splitlines()]"


@pytest.fixture(scope="module")
def exported(pruned_run, tmp_path_factory):
    _, run_dir = pruned_run
    out = tmp_path_factory.mktemp("formats") / "x"
    assert main(["--checkpoint", str(run_dir), "--output", str(out), "--gguf"]) == 0
    return run_dir, out


def _gguf_fields(path):
    from gguf import GGUFReader

    return {name: field.contents() for name, field in GGUFReader(path).fields.items()}


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
    fields = _gguf_fields(out / "model.gguf")
    generation = GenerationConfig.from_pretrained(out)
    assert (
        fields["tokenizer.ggml.pre"] == summary["gguf"]["tokenizer_pre"] == "gpt-2"
    )  # our trained ByteLevel
    assert fields["tokenizer.ggml.bos_token_id"] == generation.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == generation.eos_token_id
    assert summary["gguf"]["special_tokens"]["eos"] == {
        "id": generation.eos_token_id,
        "from": "generation_config.json",
    }


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
    with pytest.raises(SystemExit, match="2"):
        main(["--checkpoint", str(run_dir), "--output", str(tmp_path / "x"), "--gguf", "sub/model.bin"])
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
    # Its tokenizer files say eos <|im_start|> (1) and no pad; its generation config eos <|im_end|> (2), pad 2.
    with pytest.warns(
        UserWarning,
        match=r"eos token id 2 \('<\|im_end\|>'\) from generation_config.json differs "
        r"from the tokenizer files' eos id 1 \('<\|im_start\|>'",
    ):
        info = write_gguf(model.config, state, folder, folder / "model.gguf")
    _, gg = _same_model_and_tokenizer(folder, "model.gguf", atol=1e-4)
    assert rope_settings(gg.config) == rope_settings(model.config) == (100000.0, None)
    assert gg.config.tie_word_embeddings
    fields = _gguf_fields(folder / "model.gguf")
    assert fields["tokenizer.ggml.pre"] == "gpt-2"  # as stored: a plain ByteLevel pre-tokenizer
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.padding_token_id"]) == (2, 2)
    assert fields["tokenizer.ggml.bos_token_id"] == 1 and fields["tokenizer.ggml.add_bos_token"] is True
    assert info["special_tokens"]["eos"] == {"id": 2, "from": "generation_config.json", "tokenizer": 1}


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

    from shearing.composer.callbacks.export import check_export_config
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
    # (the plain frequencies by hand: transformers 5 has no "default" entry in ROPE_INIT_FUNCTIONS)
    theta, _ = rope_settings(model.config)
    head_dim = (
        getattr(model.config, "head_dim", None)
        or model.config.hidden_size // model.config.num_attention_heads
    )
    default = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim)
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](model.config, "cpu")
    torch.testing.assert_close((default / factors).float(), scaled.float(), rtol=1e-5, atol=1e-7)
    assert factors.min() == 1.0 and factors.max() == 8.0  # both ends of the smooth band are present

    # theta and scaling are read alike from 4.x's rope_theta/rope_scaling and 5.x's rope_parameters
    linear = {"rope_type": "linear", "factor": 2.0}
    src = make_hf_llama(tmp_path / "lin", tokenizer_dir, rope_theta=500000.0, rope_scaling=linear)
    model = AutoModelForCausalLM.from_pretrained(src)
    write_gguf(model.config, model.state_dict(), src, src / "lin.gguf")
    fields = GGUFReader(src / "lin.gguf").fields
    assert bytes(fields["llama.rope.scaling.type"].parts[-1]).decode() == "linear"
    assert float(fields["llama.rope.scaling.factor"].parts[-1][0]) == 2.0
    assert float(fields["llama.rope.freq_base"].parts[-1][0]) == 500000.0


# ------------------------------------------------------------------ tokenizer.ggml.pre, special ids, F16
@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer_dir):
    src = make_hf_llama(tmp_path_factory.mktemp("pre") / "src", tokenizer_dir, seed=5)
    return src, AutoModelForCausalLM.from_pretrained(src)


@pytest.mark.parametrize("name", list(STRUCTURES))
def test_gguf_pre_tokenizer_is_named_by_what_it_splits(tiny_model, tmp_path, name):
    # Each family's structure (gpt-2: ByteLevel; smollm: Digits + ByteLevel; llama-bpe: LLaMA-3's Split +
    # ByteLevel without regex, ignore_merges; smaug-bpe: the same, merges kept; qwen2: its Split, NFC).
    # That llama.cpp then tokenizes like transformers is tests/test_gguf_llamacpp.py's part.
    src, model = tiny_model
    folder = write_variant(src, name, tmp_path / name)
    if name == "qwen2":
        with pytest.warns(UserWarning, match="NFC-normalizes text and llama.cpp does not"):
            info = write_gguf(model.config, model.state_dict(), folder, folder / "m.gguf")
    else:
        info = write_gguf(model.config, model.state_dict(), folder, folder / "m.gguf")
    assert _gguf_fields(folder / "m.gguf")["tokenizer.ggml.pre"] == name
    assert info["tokenizer_pre"] == name


def _spec(pre, normalizer=None, **model):
    return {
        "model": {"type": "BPE", **model},
        "pre_tokenizer": pre,
        "normalizer": normalizer,
        "added_tokens": [],
    }


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}
_LLAMA3 = STRUCTURES["llama-bpe"][0]["pretokenizers"][0]


@pytest.mark.parametrize(
    "spec, found",
    [
        (  # DeepSeek-Coder-like: a split llama.cpp applies only under a name this converter does not write
            _spec(
                {
                    "type": "Sequence",
                    "pretokenizers": [_LLAMA3 | {"pattern": {"Regex": r"\s?\p{L}+"}}, _BYTE_LEVEL],
                }
            ),
            r"pre-tokenizer Sequence\[Split\(\{\"Regex\": \"\\\\s\?\\\\p\{L\}\+\"\}, Isolated, invert=False\), ByteLevel",
        ),
        (_spec(_BYTE_LEVEL | {"use_regex": True, "add_prefix_space": True}), "add_prefix_space=True"),
        (
            _spec(
                {
                    "type": "Sequence",
                    "pretokenizers": [{"type": "Digits", "individual_digits": False}, _BYTE_LEVEL],
                }
            ),
            r"Digits\(individual_digits=False\)",
        ),
        (  # LLaMA-3's split followed by GPT-2's as well: llama.cpp has no such pair
            _spec(
                {"type": "Sequence", "pretokenizers": [_LLAMA3, _BYTE_LEVEL | {"use_regex": True}]},
                ignore_merges=True,
            ),
            r"ByteLevel\(use_regex=True.*ignore_merges=True",
        ),
        (
            _spec({"type": "Sequence", "pretokenizers": [_LLAMA3 | {"behavior": "Removed"}, _BYTE_LEVEL]}),
            "Removed",
        ),
        (_spec(_BYTE_LEVEL | {"use_regex": True}, {"type": "Lowercase"}), "normalizer Lowercase"),
        (
            _spec(_BYTE_LEVEL | {"use_regex": True}, continuing_subword_prefix="##"),
            "continuing_subword_prefix='##'",
        ),
    ],
)
def test_gguf_refuses_a_pre_tokenizer_llama_cpp_would_not_reproduce(spec, found):
    with pytest.raises(ValueError, match=found) as caught:
        identify_pre_tokenizer(spec, "the/folder")
    assert "the/folder" in str(caught.value)
    assert "convert_hf_to_gguf.py, or export without --gguf" in str(caught.value)


def test_gguf_refuses_added_tokens_that_strip_spaces():
    spec = _spec(_BYTE_LEVEL | {"use_regex": True})
    spec["added_tokens"] = [
        {"id": 7, "content": "<mask>", "lstrip": True, "rstrip": False, "single_word": False}
    ]
    with pytest.raises(ValueError, match=r"added token '<mask>' \(id 7\) in here has lstrip set"):
        identify_pre_tokenizer(spec, "here")


def test_gguf_special_ids_follow_the_generation_config(tmp_path, tokenizer_dir):
    # The tokenizer says eos </s> (2) and no pad; the model's generation config says eos 5, pad 5.
    src = make_hf_llama(tmp_path / "ids", tokenizer_dir, eos_token_id=5, pad_token_id=5)
    model = AutoModelForCausalLM.from_pretrained(src)
    assert AutoTokenizer.from_pretrained(src).eos_token_id == 2
    with pytest.warns(
        UserWarning,
        match=r"eos token id 5 .* from generation_config.json differs from the tokenizer "
        r"files' eos id 2 \('</s>', tokenizer_config.json / special_tokens_map.json\)",
    ):
        info = write_gguf(model.config, model.state_dict(), src, src / "m.gguf")
    fields = _gguf_fields(src / "m.gguf")
    assert (fields["tokenizer.ggml.eos_token_id"], fields["tokenizer.ggml.padding_token_id"]) == (5, 5)
    assert fields["tokenizer.ggml.bos_token_id"] == 1
    assert info["special_tokens"]["eos"] == {"id": 5, "from": "generation_config.json", "tokenizer": 2}
    assert info["special_tokens"]["pad"] == {"id": 5, "from": "generation_config.json"}

    # No generation_config.json: config.json's ids.
    (src / "generation_config.json").unlink()
    model.config.eos_token_id = 7
    with pytest.warns(UserWarning, match="eos token id 7 .* from config.json differs"):
        info = write_gguf(model.config, model.state_dict(), src, src / "m.gguf")
    assert info["special_tokens"]["eos"]["from"] == "config.json"
    assert _gguf_fields(src / "m.gguf")["tokenizer.ggml.eos_token_id"] == 7

    # A list of eos ids: the tokenizer's when listed (no disagreement), and an id outside the vocab is refused.
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": [9, 2]}))
    info = write_gguf(model.config, model.state_dict(), src, src / "m.gguf")
    assert info["special_tokens"]["eos"] == {"id": 2, "from": "generation_config.json"}
    (src / "generation_config.json").write_text(json.dumps({"eos_token_id": 512}))
    with pytest.raises(
        ValueError, match=r"eos_token_id 512 in generation_config.json .* not a token id of this model"
    ):
        write_gguf(model.config, model.state_dict(), src, src / "bad.gguf")
    assert not (src / "bad.gguf").exists()


def test_gguf_float16_refuses_weights_beyond_its_range(tmp_path, tokenizer_dir):
    src = make_hf_llama(tmp_path / "big", tokenizer_dir, seed=4)
    model = AutoModelForCausalLM.from_pretrained(src)
    state = dict(model.state_dict())
    state["model.layers.0.mlp.up_proj.weight"] = state["model.layers.0.mlp.up_proj.weight"].clone()
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = 1e6
    named = r"blk\.0\.ffn_up\.weight \(model\.layers\.0\.mlp\.up_proj\.weight\) max \|value\| "
    with pytest.raises(
        ValueError, match=named + r"1e\+06.*--dtype bfloat16 .* or --dtype float32.*Nothing was written"
    ):
        write_gguf(model.config, state, src, src / "half.gguf", dtype="float16")
    # As the export hands it over (already cast to float16, where the weight is inf).
    half = {k: v.to(torch.float16) for k, v in state.items()}
    with pytest.raises(ValueError, match=named + "inf"):
        write_gguf(model.config, half, src, src / "half.gguf", dtype="float16")
    state["model.layers.0.mlp.up_proj.weight"][0, 0] = float("nan")
    with pytest.raises(ValueError, match=named + "nan.*the weights themselves are not finite"):
        write_gguf(model.config, state, src, src / "f32.gguf", dtype="float32")
    assert not list(src.glob("*.gguf")) and not list(src.glob(".*.gguf.tmp-*"))
