"""Laying out a RedPajama download as RAW_DIR by symlinks, on fake trees of both layouts."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from shearing.data.raw import REDPAJAMA_DOMAINS, discover_domains, link_redpajama, read_documents

ONE_T = [
    "common_crawl/2019-30/en_head_0000.json.gz.dedup.classifier.jsonl.zst",
    "common_crawl/2023-06/en_middle_0001.json.gz.dedup.classifier.jsonl.zst",
    "c4/c4-train.00000-of-01024.jsonl",
    "c4/c4-train.00001-of-01024.jsonl",
    "github/filtered_0.sampled.jsonl",
    "book/book.jsonl",
    "wikipedia/wiki.jsonl",
    "arxiv/arxiv_0.jsonl",
    "stackexchange/stackexchange.jsonl",
    "urls/README.md",
]
SAMPLE = [
    "arxiv_sample.jsonl",
    "book_sample.jsonl",
    "c4_sample.jsonl",
    "cc_2019-30_sample.jsonl",
    "cc_2023-06_sample.jsonl",
    "github_sample.jsonl",
    "stackexchange_sample.jsonl",
    "wikipedia_sample.jsonl",
]


def _fake_tree(root: Path, names) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"text": f"text of {name}", "meta": {}}) + "\n")


def test_1t_layout_by_symlinks(tmp_path: Path) -> None:
    _fake_tree(tmp_path / "rp", ONE_T)
    counts = link_redpajama(tmp_path / "rp", tmp_path / "raw")
    assert counts == {"cc": 2, "c4": 2, "github": 1, "book": 1, "wiki": 1, "arxiv": 1, "stackexchange": 1}
    domains = discover_domains(tmp_path / "raw")
    assert sorted(domains) == sorted(REDPAJAMA_DOMAINS)
    cc = domains["cc"].files
    assert [f.name for f in cc] == [
        "2019-30__en_head_0000.json.gz.dedup.classifier.jsonl.zst",
        "2023-06__en_middle_0001.json.gz.dedup.classifier.jsonl.zst",
    ]
    assert all(f.path.is_symlink() for d in domains.values() for f in d.files)
    wiki = domains["wiki"].files[0]
    assert wiki.path.resolve() == (tmp_path / "rp" / "wikipedia" / "wiki.jsonl").resolve()
    assert list(read_documents(wiki)) == [(0, "text of wikipedia/wiki.jsonl")]
    assert link_redpajama(tmp_path / "rp", tmp_path / "raw") == counts  # rerun is a no-op


def test_sample_layout_and_cli(tmp_path: Path, capsys) -> None:
    sys.path.insert(0, str(Path(__file__).parents[2] / "data_prep"))
    try:
        import redpajama
    finally:
        sys.path.pop(0)
    _fake_tree(tmp_path / "rp", [*SAMPLE, "README.md"])
    assert redpajama.main(["--source", str(tmp_path / "rp"), "--output", str(tmp_path / "raw")]) == 0
    assert "laid out" in capsys.readouterr().out
    domains = discover_domains(tmp_path / "raw")
    assert [f.name for f in domains["cc"].files] == ["cc_2019-30_sample.jsonl", "cc_2023-06_sample.jsonl"]
    assert [f.name for f in domains["c4"].files] == ["c4_sample.jsonl"]
    assert [f.name for f in domains["wiki"].files] == ["wikipedia_sample.jsonl"]


def test_missing_domain_and_conflicting_file(tmp_path: Path) -> None:
    _fake_tree(tmp_path / "rp", [name for name in SAMPLE if not name.startswith(("book", "arxiv"))])
    with pytest.raises(ValueError, match="no RedPajama files for domain.*book, arxiv.*--allow-missing"):
        link_redpajama(tmp_path / "rp", tmp_path / "raw")
    assert "book" not in link_redpajama(tmp_path / "rp", tmp_path / "raw", allow_missing=True)
    other = tmp_path / "raw2" / "c4" / "c4_sample.jsonl"
    other.parent.mkdir(parents=True)
    other.write_text("{}")
    with pytest.raises(ValueError, match="already exists and is not a link"):
        link_redpajama(tmp_path / "rp", tmp_path / "raw2", allow_missing=True)
