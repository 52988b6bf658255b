"""Data preparation's limits: a per-domain document cap (``--max-docs-per-domain``) and a full disk."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace
from pathlib import Path

import pytest

import shearing.data.prep as prep
from shearing.data.manifest import load_manifest
from shearing.data.prep import DiskFullError, document_order, prepare

from .conftest import EVAL_SEQS, SEED, SEQ_LEN, Corpus, prep_config
from .test_prep import _tree_digest

CAP = 12


def _cli():
    sys.path.insert(0, str(Path(__file__).parents[2] / "data_prep"))
    try:
        import tokenize_domains
    finally:
        sys.path.pop(0)
    return tokenize_domains


def _argv(corpus: Corpus, tokenizer_dir: Path, out: Path, *extra: str) -> list[str]:
    argv = ["--input", str(corpus.root), "--tokenizer", str(tokenizer_dir), "--output", str(out)]
    return [*argv, "--seq-len", str(SEQ_LEN), "--eval-seqs", str(EVAL_SEQS), "--no-progress", *extra]


# ---------------------------------------------------------------------------------------------------
# --max-docs-per-domain


def test_cap_reads_only_each_domains_first_documents(
    corpus: Corpus, tokenizer_dir, tmp_path, monkeypatch, caplog
) -> None:
    opened: list[str] = []
    read_documents = prep.read_documents
    monkeypatch.setattr(
        prep,
        "read_documents",
        lambda file, stats=None: opened.append(file.name) or read_documents(file, stats),
    )
    config = prep_config(corpus, tokenizer_dir, tmp_path / "data", max_docs_per_domain=CAP)
    with caplog.at_level(logging.INFO, logger="shearing.data.prep"):
        manifest = prepare(config)

    assert (
        manifest.split["max_docs_per_domain"] == CAP and load_manifest(config.output).split == manifest.split
    )
    for domain, documents in corpus.documents.items():
        assert len(documents) > CAP, "the corpus must have more documents than the cap"
        first = [list(identity) for identity, _ in documents[:CAP]]
        eval_documents = manifest.split["eval_documents"][domain]
        order = document_order(CAP, SEED, domain)  # the usual split, over the first CAP documents
        assert eval_documents == [first[i] for i in order[: len(eval_documents)]], domain
        entry = manifest.domains[domain]
        assert (entry.eval.documents, entry.train.documents) == (
            len(eval_documents),
            CAP - len(eval_documents),
        )
    docs_files = sorted({name for name in opened if name.startswith("part-")})
    assert docs_files == ["part-0.jsonl"], "docs' second file is not read once the first holds the cap"
    licenses = [name for name in opened if name.startswith(("license-", "latin1"))]
    assert licenses == ["latin1.txt", *(f"license-{i:03d}.txt" for i in range(CAP))]
    assert (
        f"domain 'licenses': capped at its first {CAP} documents (--max-docs-per-domain), from {CAP + 1} of"
        in (caplog.text)
    )


def test_cap_with_train_tokens_and_eval_seqs_through_the_cli(corpus, tokenizer_dir, tmp_path, capsys) -> None:
    cli = _cli()
    out = tmp_path / "data"
    assert (
        cli.main(_argv(corpus, tokenizer_dir, out, "--max-docs-per-domain", str(CAP), "--train-tokens", "3K"))
        == 0
    )
    manifest = load_manifest(out)
    assert (manifest.split["max_docs_per_domain"], manifest.split["train_tokens"]) == (CAP, 3000)
    train = sum(entry.train.tokens for entry in manifest.domains.values())
    assert 3000 - SEQ_LEN * len(manifest.domains) <= train <= 3000
    assert all(entry.eval.sequences == EVAL_SEQS for entry in manifest.domains.values())

    assert cli.main(_argv(corpus, tokenizer_dir, tmp_path / "small", "--max-docs-per-domain", "1")) == 2
    err = capsys.readouterr().err
    assert "in 1 documents: not enough for --eval-seqs 6" in err
    assert "or raise --max-docs-per-domain, which caps this domain at 1 documents" in err
    with pytest.raises(SystemExit):
        cli.main(_argv(corpus, tokenizer_dir, tmp_path / "bad", "--max-docs-per-domain", "many"))
    with pytest.raises(ValueError, match="--max-docs-per-domain must be at least 1"):
        prep_config(corpus, tokenizer_dir, tmp_path / "bad", max_docs_per_domain=0)


def test_a_changed_cap_is_another_preparation(corpus, tokenizer_dir, tmp_path, monkeypatch) -> None:
    """Resuming never mixes two caps: refused once a domain is written, the token cache redone before."""
    fresh = prepare(
        prep_config(corpus, tokenizer_dir, tmp_path / "fresh", max_docs_per_domain=CAP, workers=2)
    )
    fresh_digest = _tree_digest(tmp_path / "fresh")

    out = tmp_path / "data"
    write_domain = prep.write_domain

    def interrupted_after_code(docs, *args, **kwargs):
        if docs.name != "code":
            raise KeyboardInterrupt
        return write_domain(docs, *args, **kwargs)

    monkeypatch.setattr(prep, "write_domain", interrupted_after_code)
    with pytest.raises(KeyboardInterrupt):
        prepare(prep_config(corpus, tokenizer_dir, out, max_docs_per_domain=CAP))
    monkeypatch.setattr(prep, "write_domain", write_domain)
    for other in (CAP + 5, None):
        with pytest.raises(ValueError, match=r"different settings \(max_docs_per_domain changed\)"):
            prepare(prep_config(corpus, tokenizer_dir, out, max_docs_per_domain=other))
    assert (
        prepare(prep_config(corpus, tokenizer_dir, out, max_docs_per_domain=CAP)).to_dict() == fresh.to_dict()
    )
    assert _tree_digest(out) == fresh_digest

    # Stopped before any domain was written, with every file's tokens cached under the old cap: a new
    # cap drops that cache, and the result is a fresh run's with the new cap.
    early = tmp_path / "early"
    monkeypatch.setattr(prep, "plan_split", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        prepare(prep_config(corpus, tokenizer_dir, early, max_docs_per_domain=CAP + 5))
    assert any((early / prep.WORK_DIR / "tokens").rglob("*.npz"))
    monkeypatch.undo()
    assert (
        prepare(prep_config(corpus, tokenizer_dir, early, max_docs_per_domain=CAP)).to_dict()
        == fresh.to_dict()
    )
    assert _tree_digest(early) == fresh_digest


# ---------------------------------------------------------------------------------------------------
# A full disk: the real write path, redirected to /dev/full (every write fails with ENOSPC)


def test_disk_full_while_writing_shards_keeps_finished_domains(prepared, tmp_path, monkeypatch) -> None:
    """The licenses domain's shard files go to /dev/full (streaming's MDS writer opens them): the error
    names the folder, the free space and the fix; code and docs stay done; a rerun completes."""
    import builtins

    import streaming.base.format.base.writer as mds_writer

    def full_for_licenses(name, mode="r", *args, **kwargs):
        target = "/dev/full" if "licenses" in str(name) and "w" in mode else name
        return builtins.open(target, mode, *args, **kwargs)

    done_config, manifest = prepared
    config = replace(done_config, output=tmp_path / "data", workers=1)
    monkeypatch.setattr(mds_writer, "open", full_for_licenses, raising=False)
    with pytest.raises(DiskFullError) as err:
        prepare(config)
    message = str(err.value)
    work = config.output / prep.WORK_DIR / "tmp" / "licenses"
    assert message.startswith(
        f"no space left on device while writing {work / 'eval'} (No space left on device; "
    )
    assert " free there). Domains already prepared are kept" in message
    assert "then rerun the same command: it resumes with the domains not yet done" in message
    assert sorted(p.name for p in (config.output / prep.WORK_DIR / "done").iterdir()) == [
        "code.json",
        "docs.json",
    ]
    assert not work.exists(), "the partial shards are removed"
    expected = _tree_digest(done_config.output)
    assert {k: v for k, v in _tree_digest(config.output).items() if "licenses" not in k} == {
        k: v for k, v in expected.items() if "licenses" not in k
    }

    monkeypatch.undo()
    assert prepare(config).to_dict() == manifest.to_dict()
    assert _tree_digest(config.output) == expected


def test_disk_full_in_a_tokenizer_process_through_the_cli(
    prepared, corpus, tokenizer_dir, tmp_path, capsys
) -> None:
    """The token cache of docs' second file is a link to /dev/full, written by one of two worker
    processes (old code: "OSError: 3096 requested and 0 written"); rerunning after it is gone completes."""
    out = tmp_path / "data"
    cache = out / prep.WORK_DIR / "tokens" / "docs" / "000001.bin.tmp"
    cache.parent.mkdir(parents=True)
    cache.symlink_to("/dev/full")
    cli = _cli()
    assert cli.main(_argv(corpus, tokenizer_dir, out, "--workers", "2")) == 2
    err = capsys.readouterr().err
    assert f"error: no space left on device while writing {cache} (No space left on device; " in err
    assert "requested and" not in err
    assert not cache.is_symlink(), "the partial file is removed"
    assert not list((out / prep.WORK_DIR / "tokens").rglob("*.tmp")), (
        "so are the other workers' partial files"
    )
    assert cli.main(_argv(corpus, tokenizer_dir, out, "--workers", "2")) == 0
    assert _tree_digest(out) == _tree_digest(prepared[0].output)
