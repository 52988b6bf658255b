"""Raw per-domain text: which files make up a domain, and the documents inside them.

``RAW_DIR`` holds one entry per domain; the entry's name (minus its suffix) is the domain's name::

    RAW_DIR/cc.jsonl.zst          one file of JSON lines, each {"text": ...}; also .jsonl and .jsonl.gz
    RAW_DIR/github/               a folder of such files (searched recursively, symlinks followed)
    RAW_DIR/book.txt              one plain-text document
    RAW_DIR/wiki/                 a folder of .txt files, one document a file (may mix with .jsonl files)

Files are always taken in sorted order of their path relative to the domain, so a domain's document
list is the same on every machine. A document is identified by ``(file, doc_id)``: ``file`` is that
relative path and ``doc_id`` is the 0-based line number in a JSON-lines file (0 for a .txt file); the
identity survives skipped lines, which is what the split recorded in the manifest refers to.

Bad input, by kind:
  - a file type we do not read (README.md, .parquet, ...) is skipped with a warning;
  - a .txt file that is not valid UTF-8 is skipped and counted (``skipped_file``); so is a JSON line whose
    bytes are not UTF-8 or whose text holds lone surrogates (``skipped_documents``), and an empty text;
  - a line that is not JSON, or has no string ``"text"`` field, is a format error: ``ValueError`` naming the
    file and line, because the whole file is probably not what the user meant to give us.
``.jsonl.zst`` needs the ``zstandard`` package; without it reading such a file raises an error naming it.

``link_redpajama`` lays a RedPajama download (the 1T layout of one folder per source, or the 1T-Sample
layout of flat ``<prefix>_*.jsonl`` files) out as such a ``RAW_DIR`` with the paper's 7 domains, by
symlinks, so nothing is copied.
"""

from __future__ import annotations

import gzip
import io
import json
import logging
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO

logger = logging.getLogger(__name__)

JSONL_SUFFIXES = (".jsonl", ".jsonl.gz", ".jsonl.zst")
TEXT_SUFFIXES = (".txt",)
KNOWN_SUFFIXES = JSONL_SUFFIXES + TEXT_SUFFIXES

_CORRUPT_ERRORS: tuple[type[BaseException], ...] = (OSError, EOFError)
try:  # optional: only .jsonl.zst needs it
    import zstandard as _zstandard

    _CORRUPT_ERRORS += (_zstandard.ZstdError,)
except ImportError:
    pass


@dataclass(frozen=True)
class RawFile:
    """One raw file of a domain: ``name`` is its path relative to the domain (the file name for a one-file domain)."""

    path: Path
    name: str
    size: int

    @property
    def kind(self) -> str:
        return "txt" if self.name.endswith(TEXT_SUFFIXES) else "jsonl"


@dataclass
class RawDomain:
    """A domain: where it lives and its readable files in sorted order."""

    name: str
    source: Path
    files: list[RawFile]
    ignored: list[Path] = field(default_factory=list)


@dataclass
class ReadStats:
    """What reading one file skipped."""

    skipped_file: bool = False
    skipped_documents: int = 0


def known_suffix(name: str) -> str | None:
    """The raw-file suffix of ``name`` (``.jsonl.gz`` before ``.gz``), or None for a type we do not read."""
    for suffix in sorted(KNOWN_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix) and len(name) > len(suffix):
            return suffix
    return None


def _folder_files(folder: Path) -> tuple[list[RawFile], list[Path]]:
    files, ignored = [], []
    for dirpath, dirnames, filenames in os.walk(folder, followlinks=True):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for filename in filenames:
            if filename.startswith("."):
                continue
            path = Path(dirpath) / filename
            if known_suffix(filename) is None:
                ignored.append(path)
                continue
            name = path.relative_to(folder).as_posix()
            files.append(RawFile(path=path, name=name, size=path.stat().st_size))
    return sorted(files, key=lambda f: f.name), sorted(ignored)


def discover_domains(raw_dir: str | os.PathLike) -> dict[str, RawDomain]:
    """Find the domains of ``raw_dir`` (see the module docstring), sorted by name."""
    root = Path(raw_dir)
    if not root.is_dir():
        raise ValueError(
            f"--input {root} is not a folder: point it at RAW_DIR, which holds one entry per domain "
            "(DOMAIN.jsonl, DOMAIN.jsonl.gz, DOMAIN.jsonl.zst, DOMAIN.txt or a folder DOMAIN/ of such files)"
        )
    domains: dict[str, RawDomain] = {}
    for entry in sorted(root.iterdir()):
        if entry.name.startswith("."):
            continue
        if entry.is_dir():
            files, ignored = _folder_files(entry)
            name = entry.name
            if not files:
                raise ValueError(
                    f"domain folder {entry} holds no .jsonl, .jsonl.gz, .jsonl.zst or .txt files: "
                    "add the domain's text to it or remove the folder"
                )
        else:
            suffix = known_suffix(entry.name)
            if suffix is None:
                logger.warning(
                    "skipping %s: not a raw domain file (want %s)", entry, ", ".join(KNOWN_SUFFIXES)
                )
                continue
            files, ignored = [RawFile(path=entry, name=entry.name, size=entry.stat().st_size)], []
            name = entry.name[: -len(suffix)]
        if name in domains:
            raise ValueError(
                f"domain {name!r} is given twice in {root} ({domains[name].source.name} and {entry.name}): "
                "keep one entry per domain"
            )
        for path in ignored:
            logger.warning("skipping %s in domain %r: not a %s file", path, name, "/".join(KNOWN_SUFFIXES))
        domains[name] = RawDomain(name=name, source=entry, files=files, ignored=ignored)
    if not domains:
        raise ValueError(
            f"no domains found in {root}: it should hold DOMAIN.jsonl[.gz|.zst], DOMAIN.txt or DOMAIN/ entries"
        )
    return domains


def _open_zst(path: Path) -> BinaryIO:
    try:
        import zstandard
    except ImportError as err:
        raise ImportError(
            f"reading {path} needs the `zstandard` package: pip install zstandard (or decompress the file)"
        ) from err
    raw = open(path, "rb")  # noqa: SIM115 - closed with the wrapping reader
    reader = zstandard.ZstdDecompressor().stream_reader(raw, read_across_frames=True, closefd=True)
    return io.BufferedReader(reader)


def open_binary(path: Path) -> BinaryIO:
    """Open a raw file for reading bytes, decompressing ``.gz`` and ``.zst`` on the fly."""
    name = path.name
    if name.endswith(".gz"):
        return gzip.open(path, "rb")
    if name.endswith(".zst"):
        return _open_zst(path)
    return open(path, "rb")


def _valid_text(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # lone surrogates from a "\ud800" escape
        return False
    return True


def _jsonl_documents(path: Path, stats: ReadStats) -> Iterator[tuple[int, str]]:
    with open_binary(path) as f:
        try:
            for line_no, raw in enumerate(f):
                if not raw or raw.isspace():
                    continue
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError:
                    stats.skipped_documents += 1
                    continue
                text = _text_field(line, path, line_no)
                raw = line = None  # a long document's line is not held twice while it is tokenized
                if not text or not _valid_text(text):
                    stats.skipped_documents += 1
                    continue
                yield line_no, text
        except _CORRUPT_ERRORS as err:
            raise ValueError(
                f"{path} could not be read ({err}): the file looks truncated or corrupt"
            ) from err


def _text_field(line: str, path: Path, line_no: int) -> str:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(
            f"{path}, line {line_no + 1}: not valid JSON ({err.msg}); every line of a .jsonl file must be "
            'one JSON object with a "text" field'
        ) from err
    if not isinstance(record, dict) or not isinstance(record.get("text"), str):
        raise ValueError(
            f'{path}, line {line_no + 1}: no string "text" field; every line of a .jsonl file must be '
            'one JSON object like {"text": "..."}'
        )
    return record["text"]


def read_documents(file: RawFile, stats: ReadStats | None = None) -> Iterator[tuple[int, str]]:
    """Yield ``(doc_id, text)`` for every document of ``file``, counting what is skipped into ``stats``."""
    stats = stats if stats is not None else ReadStats()
    if file.kind == "jsonl":
        yield from _jsonl_documents(file.path, stats)
        return
    try:
        text = file.path.read_bytes().decode("utf-8")
    except UnicodeDecodeError:
        logger.warning("skipping %s: not UTF-8 text", file.path)
        stats.skipped_file = True
        return
    if text:
        yield 0, text
    else:
        stats.skipped_documents += 1


# ---------------------------------------------------------------------------------------------------
# RedPajama: lay a download out as RAW_DIR by symlinks

#: domain -> (folder of the 1T layout, file-name prefix of the 1T-Sample layout)
REDPAJAMA_DOMAINS: dict[str, tuple[str, str]] = {
    "cc": ("common_crawl", "cc"),
    "c4": ("c4", "c4"),
    "github": ("github", "github"),
    "book": ("book", "book"),
    "wiki": ("wikipedia", "wikipedia"),
    "arxiv": ("arxiv", "arxiv"),
    "stackexchange": ("stackexchange", "stackexchange"),
}


def redpajama_files(source: str | os.PathLike) -> dict[str, list[tuple[Path, str]]]:
    """Per RedPajama domain, its raw files as ``(path, link name)``, from either download layout.

    The 1T layout has one folder per domain (``common_crawl/<snapshot>/*.jsonl.zst``, ``c4/*.jsonl``, ...);
    link names flatten the path inside that folder with ``__``. The 1T-Sample layout has flat files
    named by domain prefix (``cc_2019-30_sample.jsonl``, ``wikipedia_sample.jsonl``, ...).
    """
    root = Path(source)
    if not root.is_dir():
        raise ValueError(f"--source {root} is not a folder: point it at the RedPajama download")
    found: dict[str, list[tuple[Path, str]]] = {}
    for domain, (folder, prefix) in REDPAJAMA_DOMAINS.items():
        if (root / folder).is_dir():
            files, _ = _folder_files(root / folder)
            found[domain] = [(f.path, f.name.replace("/", "__")) for f in files]
        else:
            found[domain] = [
                (path, path.name)
                for path in sorted(root.iterdir())
                if path.is_file() and known_suffix(path.name) and path.name.startswith(prefix + "_")
            ]
    return found


def link_redpajama(
    source: str | os.PathLike, raw_dir: str | os.PathLike, allow_missing: bool = False
) -> dict[str, int]:
    """Make ``raw_dir/<domain>/`` folders of symlinks to a RedPajama download; return the files per domain.

    Rerunning is safe: a link that already points at the same file is kept. A missing domain is an error
    unless ``allow_missing`` (then it is left out with a warning).
    """
    found = redpajama_files(source)
    missing = [domain for domain, files in found.items() if not files]
    if missing and not allow_missing:
        raise ValueError(
            f"no RedPajama files for domain(s) {', '.join(missing)} in {source}: expected folders "
            f"{', '.join(REDPAJAMA_DOMAINS[d][0] + '/' for d in missing)} (1T layout) or files "
            f"{', '.join(REDPAJAMA_DOMAINS[d][1] + '_*.jsonl' for d in missing)} (sample layout); "
            "pass --allow-missing to lay out the others"
        )
    counts = {}
    for domain, files in found.items():
        if not files:
            logger.warning("RedPajama domain %r has no files in %s: left out", domain, source)
            continue
        folder = Path(raw_dir) / domain
        folder.mkdir(parents=True, exist_ok=True)
        for path, name in files:
            _symlink(path.resolve(), folder / name)
        counts[domain] = len(files)
    return counts


def _symlink(target: Path, link: Path) -> None:
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.exists() or link.is_symlink():
        raise ValueError(
            f"{link} already exists and is not a link to {target}: remove it or pick another output"
        )
    link.symlink_to(target)
