"""Data preparation on a real multi-domain corpus (see conftest): round trip, split, counts, resume, errors."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pytest
from transformers import AutoTokenizer

import shearing.data.prep as prep
from shearing.data.manifest import SPLITS, load_manifest
from shearing.data.prep import (
    PrepConfig,
    allot_train_sequences,
    choose_token_dtype,
    document_order,
    format_summary,
    pack_sequences,
    parse_token_count,
    prepare,
    tokenize_file,
)
from shearing.data.raw import RawFile, discover_domains, read_documents

from .conftest import EVAL_SEQS, SEED, SEQ_LEN, Corpus, prep_config, streaming_samples


def _documents_in_stream(tokenizer, stream: np.ndarray, expected: list[str]) -> list[str]:
    """Parse ``stream`` as BOS text EOS BOS text EOS ... (the last one may be cut) against ``expected`` texts."""
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    decoded, pos = [], 0
    for text in expected:
        if pos == len(stream):
            break
        assert stream[pos] == bos, f"document {len(decoded)} does not start with BOS"
        rest = stream[pos + 1 :]
        ends = np.flatnonzero(rest == eos)
        body = rest[: ends[0]] if len(ends) else rest
        assert bos not in body, f"document {len(decoded)} runs into the next one: EOS missing"
        got = tokenizer.decode(body.tolist())
        if len(ends):
            assert got == text, f"document {len(decoded)} does not round-trip"
            pos += len(body) + 2
        else:  # the tail cut at the end of the split
            assert text.startswith(got.rstrip("\ufffd"))
            pos = len(stream)
        decoded.append(got)
    assert pos == len(stream), "the split holds more tokens than its documents"
    return decoded


def _tree_digest(root: Path) -> dict[str, str]:
    return {
        str(path.relative_to(root)): hashlib.sha256(path.read_bytes()).hexdigest()
        for split in SPLITS
        for path in sorted((root / split).rglob("*"))
        if path.is_file()
    }


def _mtimes(root: Path, domain: str) -> dict[str, int]:
    return {str(p): p.stat().st_mtime_ns for split in SPLITS for p in (root / split / domain).iterdir()}


def test_round_trip_and_document_level_split(prepared, corpus: Corpus, tokenizer_dir: Path) -> None:
    config, manifest = prepared
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    for domain, documents in corpus.documents.items():
        ids = [identity for identity, _ in documents]
        texts = [text for _, text in documents]
        order = document_order(len(documents), SEED, domain)
        eval_ids = [tuple(doc) for doc in manifest.split["eval_documents"][domain]]
        assert eval_ids == [ids[i] for i in order[: len(eval_ids)]]
        decoded = {}
        for split, doc_order in (("eval", order[: len(eval_ids)]), ("train", order[len(eval_ids) :])):
            stream = streaming_samples(config.output / split / domain).reshape(-1)
            decoded[split] = _documents_in_stream(tokenizer, stream, [texts[i] for i in doc_order])
            assert len(decoded[split]) == getattr(manifest.domains[domain], split).documents
        assert len(decoded["eval"]) == len(eval_ids)
        assert set(decoded["eval"]).isdisjoint(decoded["train"]), f"{domain}: a document is in both splits"


def test_each_sequence_decodes_to_a_span_of_the_document_stream(
    prepared, corpus: Corpus, tokenizer_dir: Path
) -> None:
    config, _ = prepared
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    documents = corpus.documents["code"]
    order = document_order(len(documents), SEED, "code")
    stream_text = "".join(f"<s>{documents[i][1]}</s>" for i in order)
    samples = streaming_samples(config.output / "train" / "code")
    for sample in samples[:: max(1, len(samples) // 7)]:
        span = tokenizer.decode(sample.tolist(), skip_special_tokens=False).strip("\ufffd")
        assert len(span) > 10 and span in stream_text


def test_manifest_counts_match_streaming_dataset(prepared, tokenizer_dir: Path) -> None:
    config, manifest = prepared
    assert load_manifest(config.output).to_dict() == manifest.to_dict()
    assert (manifest.seq_len, manifest.dtype) == (SEQ_LEN, "uint16")
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert manifest.tokenizer["vocab_size"] == len(tokenizer)
    assert (manifest.tokenizer["bos_token_id"], manifest.tokenizer["eos_token_id"]) == (1, 2)
    assert sorted(manifest.domains) == ["code", "docs", "licenses"]
    for domain, entry in manifest.domains.items():
        assert entry.eval.sequences == EVAL_SEQS
        for split in SPLITS:
            stats = getattr(entry, split)
            samples = streaming_samples(config.output / split / domain)
            assert samples.shape == (stats.sequences, SEQ_LEN)
            assert samples.dtype == np.uint16 and stats.tokens == samples.size
            index = json.loads((config.output / split / domain / "index.json").read_text())
            assert {s["column_encodings"][0] for s in index["shards"]} == {"ndarray:uint16"}


def test_non_utf8_file_and_empty_text_are_skipped_and_counted(prepared) -> None:
    _, manifest = prepared
    assert (manifest.domains["licenses"].skipped_files, manifest.domains["licenses"].skipped_documents) == (
        1,
        0,
    )
    assert (manifest.domains["code"].skipped_files, manifest.domains["code"].skipped_documents) == (0, 1)
    assert (manifest.domains["docs"].skipped_files, manifest.domains["docs"].skipped_documents) == (0, 0)
    line = next(line for line in format_summary(manifest).splitlines() if line.startswith("licenses"))
    assert line.endswith("1f/0d")


def test_deterministic_and_resumable(
    prepared, corpus: Corpus, tokenizer_dir: Path, tmp_path: Path, monkeypatch
) -> None:
    config, manifest = prepared
    again = prep_config(corpus, tokenizer_dir, tmp_path / "data", workers=1)
    assert prepare(again).to_dict() == manifest.to_dict()
    assert _tree_digest(again.output) == _tree_digest(config.output), "same seed, different bytes"

    calls: list[str] = []
    write_domain = prep.write_domain
    monkeypatch.setattr(
        prep, "write_domain", lambda docs, *a, **k: calls.append(docs.name) or write_domain(docs, *a, **k)
    )
    untouched = _mtimes(again.output, "code") | _mtimes(again.output, "licenses")
    (again.output / prep.WORK_DIR / "done" / "docs.json").unlink()  # as if interrupted while writing docs
    assert prepare(again).to_dict() == manifest.to_dict()
    assert calls == ["docs"]
    assert _mtimes(again.output, "code") | _mtimes(again.output, "licenses") == untouched
    assert _tree_digest(again.output) == _tree_digest(config.output)

    calls.clear()
    prepare(again)
    assert calls == []
    with pytest.raises(ValueError, match="different settings .*seq_len"):
        prepare(prep_config(corpus, tokenizer_dir, again.output, seq_len=32))


def test_train_token_cap_is_shared_in_proportion_through_the_cli(
    prepared, corpus, tokenizer_dir, tmp_path, capsys
) -> None:
    sys.path.insert(0, str(Path(__file__).parents[2] / "data_prep"))
    try:
        import tokenize_domains
    finally:
        sys.path.pop(0)
    _, full = prepared
    out = tmp_path / "capped"
    argv = ["--input", str(corpus.root), "--tokenizer", str(tokenizer_dir), "--output", str(out)]
    argv += [
        "--seq-len",
        str(SEQ_LEN),
        "--eval-seqs",
        str(EVAL_SEQS),
        "--train-tokens",
        "6K",
        "--no-progress",
    ]
    assert tokenize_domains.main(argv) == 0
    assert "licenses" in capsys.readouterr().out
    capped = load_manifest(out)
    assert capped.split["train_tokens"] == 6000
    train = {name: entry.train.tokens for name, entry in capped.domains.items()}
    assert 6000 - SEQ_LEN * len(train) <= sum(train.values()) <= 6000
    for name, share in full.token_proportions().items():
        assert abs(train[name] / 6000 - share) < 2 * SEQ_LEN / 6000, name
    assert {name: e.eval for name, e in capped.domains.items()} == {
        name: e.eval for name, e in full.domains.items()
    }


def test_wide_vocabulary_writes_uint32(corpus, tokenizer_dir, tmp_path, monkeypatch) -> None:
    assert [choose_token_dtype(v) for v in (32000, 65535, 65536, 65537, 128256)] == [
        "uint16",
        "uint16",
        "uint16",
        "uint32",
        "uint32",
    ]
    monkeypatch.setattr(prep, "choose_token_dtype", lambda vocab_size: "uint32")
    config = prep_config(corpus, tokenizer_dir, tmp_path / "data")
    manifest = prepare(config)
    assert manifest.dtype == "uint32"
    samples = streaming_samples(config.output / "eval" / "docs")
    assert samples.dtype == np.uint32 and samples.shape == (EVAL_SEQS, SEQ_LEN)
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    assert samples[0, 0] == tokenizer.bos_token_id


def test_pack_sequences_carries_the_tail_and_drops_it_at_the_end() -> None:
    chunks = [np.arange(0, 3), np.arange(3, 10), np.arange(10, 12)]
    assert [s.tolist() for s in pack_sequences(iter(chunks), 4)] == [
        [0, 1, 2, 3],
        [4, 5, 6, 7],
        [8, 9, 10, 11],
    ]
    assert [s.tolist() for s in pack_sequences(iter(chunks[:2]), 4)] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    pulled = []
    limited = pack_sequences((pulled.append(c) or c for c in chunks), 4, max_seqs=1)
    assert [s.tolist() for s in limited] == [[0, 1, 2, 3]] and len(pulled) == 2


def test_allotment_is_proportional_and_refuses_an_empty_domain() -> None:
    assert allot_train_sequences({"a": 3000, "b": 1000}, 10, 2000) == {"a": 150, "b": 50}
    assert allot_train_sequences({"a": 3000, "b": 1000}, 10, None) == {"a": 300, "b": 100}
    assert allot_train_sequences({"a": 3000, "b": 1000}, 10, 10**9) == {"a": 300, "b": 100}
    with pytest.raises(ValueError, match="--train-tokens 20 leaves domain.* b"):
        allot_train_sequences({"a": 3000, "b": 100}, 10, 20)


def test_parse_token_count() -> None:
    assert parse_token_count("0.4B") == 400_000_000
    assert [parse_token_count(s) for s in ("50M", "12k", "1000", "1_000", "1T")] == [
        50 * 10**6,
        12000,
        1000,
        1000,
        10**12,
    ]
    for bad in ("abc", "0.5", "-3M", "", "1.5X"):
        with pytest.raises(ValueError, match="not a positive whole number"):
            parse_token_count(bad)


def test_literal_special_token_text_is_not_a_control_token(tokenizer_dir, tmp_path) -> None:
    raw = tmp_path / "x.jsonl"
    raw.write_text(json.dumps({"text": "a</s>b<s>c"}) + "\n")
    info = prep.load_tokenizer_info(tokenizer_dir)
    state = prep._worker_state(info.backend_json, info.bos_token_id, info.eos_token_id, "uint16")
    tokenize_file(RawFile(raw, raw.name, raw.stat().st_size), tmp_path / "cache", **state)
    tokens = np.fromfile(tmp_path / "cache.bin", dtype=np.uint16)
    assert tokens[0] == info.bos_token_id and tokens[-1] == info.eos_token_id
    assert info.eos_token_id not in tokens[1:-1] and info.bos_token_id not in tokens[1:-1]


# ---------------------------------------------------------------------------------------------------
# Bad input


def test_bad_arguments_are_refused(corpus, tokenizer_dir, tmp_path) -> None:
    with pytest.raises(ValueError, match="--seq-len must be at least 2"):
        prep_config(corpus, tokenizer_dir, tmp_path / "o", seq_len=1)
    with pytest.raises(ValueError, match="--eval-seqs must be at least 1"):
        prep_config(corpus, tokenizer_dir, tmp_path / "o", eval_seqs=0)
    with pytest.raises(ValueError, match="--output .* must not be inside --input"):
        PrepConfig(input=corpus.root, tokenizer=str(tokenizer_dir), output=corpus.root / "data")


def test_eval_seqs_beyond_a_domain_is_an_error_before_anything_is_written(
    corpus, tokenizer_dir, tmp_path
) -> None:
    config = prep_config(corpus, tokenizer_dir, tmp_path / "data", eval_seqs=100_000)
    with pytest.raises(ValueError, match="domain 'code' has .* lower --eval-seqs"):
        prepare(config)
    assert not (config.output / "train").exists() and not (config.output / "manifest.json").exists()
    fixed = prepare(prep_config(corpus, tokenizer_dir, config.output, eval_seqs=2))  # the fix is accepted
    assert {entry.eval.sequences for entry in fixed.domains.values()} == {2}


def test_raw_layout_errors_and_warnings(corpus, tmp_path, caplog) -> None:
    with caplog.at_level(logging.WARNING):
        domains = discover_domains(corpus.root)
    assert sorted(domains) == ["code", "docs", "licenses"]
    assert "NOTES.md" in caplog.text
    assert "latin1.txt" in [f.name for f in domains["licenses"].files]
    (tmp_path / "raw" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="domain folder .*empty holds no .jsonl"):
        discover_domains(tmp_path / "raw")
    with pytest.raises(ValueError, match="is not a folder"):
        discover_domains(tmp_path / "missing")
    (tmp_path / "raw" / "empty" / "a.txt").write_text("x")
    (tmp_path / "raw" / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="domain 'empty' is given twice"):
        discover_domains(tmp_path / "raw")


@pytest.mark.parametrize(
    ("line", "message"),
    [('{"txt": "x"}', r'line 2: no string "text" field'), ("{not json", "line 2: not valid JSON")],
)
def test_malformed_json_lines_name_file_and_line(tmp_path, line: str, message: str) -> None:
    path = tmp_path / "d.jsonl"
    path.write_text('{"text": "ok"}\n' + line + "\n")
    with pytest.raises(ValueError, match=message):
        list(read_documents(RawFile(path, path.name, 0)))


def test_zst_reading_and_the_missing_package_message(tmp_path, monkeypatch) -> None:
    zstandard = pytest.importorskip("zstandard")
    path = tmp_path / "d.jsonl.zst"
    path.write_bytes(zstandard.ZstdCompressor().compress(b'{"text": "caf\xc3\xa9"}\n\n{"text": "two"}\n'))
    assert list(read_documents(RawFile(path, path.name, 0))) == [(0, "caf\u00e9"), (2, "two")]
    monkeypatch.setitem(sys.modules, "zstandard", None)
    with pytest.raises(ImportError, match="needs the `zstandard` package: pip install zstandard"):
        list(read_documents(RawFile(path, path.name, 0)))


def test_tokenizer_without_eos_is_refused_and_without_bos_frames_text_eos(tokenizer_dir, tmp_path) -> None:
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.eos_token = None
    tokenizer.save_pretrained(tmp_path / "noeos")
    with pytest.raises(ValueError, match="has no eos_token.*--eos-token"):
        prep.load_tokenizer_info(tmp_path / "noeos")
    assert prep.load_tokenizer_info(tmp_path / "noeos", eos_token="</s>").eos_token_id == 2
    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.bos_token = None
    tokenizer.save_pretrained(tmp_path / "nobos")
    info = prep.load_tokenizer_info(tmp_path / "nobos")
    assert info.bos_token_id is None and "no BOS: the tokenizer has no bos_token" in info.framing
