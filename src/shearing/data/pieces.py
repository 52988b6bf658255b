"""Cut a long document into pieces the tokenizer takes one at a time, giving the tokens of the whole.

Why: a Hugging Face ``tokenizers`` call holds per-token strings, offsets and pre-tokenization splits for
its whole input, ~130 bytes per character; one 50 MB document passed 4 GB of RSS within 25-35 s (9 GB
reported), so ``tokenize_domains --workers 16`` ran out of memory on one large document. Data
preparation therefore never gives the tokenizer more than ``MAX_PIECE_CHARS`` characters: a longer
document is cut into pieces, each tokenized alone and written in order, framed once (BOS before the
first piece, EOS after the last), so the document stays one document for the split. Measured with
``bench/prep_long_document.py`` (50 MB of stdlib source as one JSON line, one process): peak RSS 828 MB
with the tests' tokenizer and 870 MB with SmolLM2-135M's, of which ~650 MB is the process with its
imports before any text is read (646 and 714 MB); 30 s and 35 s for the whole document.

Where to cut. Tokenizers never merge across certain boundaries: GPT-2-style byte-level pre-tokenizers
(GPT-2, LLaMA-3, SmolLM2, Qwen2) start a new pre-token at a space that precedes a word (" world"), and
SentencePiece-style tokenizers (LLaMA-2, Mistral: the space becomes "▁", which starts a piece) do not
join a word to the "▁" that follows it. But they differ at the start of an input: the SentencePiece
style prepends "▁" to every input, so the right piece must then start without its space, which the
tokenizer puts back. Rather than guess each tokenizer's rules, every cut is verified with the tokenizer
at hand: a window of ``CHECK_CHARS`` characters either side is tokenized whole and as two halves, and
the cut is taken only if the ids agree. Candidates, best first, scanning back from ``MAX_PIECE_CHARS``:

1. a single space between two non-space characters: the space starting the right piece, else dropped
   (for tokenizers that prepend one);
2. just after a newline, before a non-space character;
3. just after punctuation, before a letter or digit (text without spaces, e.g. Chinese or Japanese);
4. a few plain positions.

Up to ``_TRIES`` of each kind, nearest the limit first, never before half the limit. If none verifies
(one giant pre-token, such as megabytes without a space or punctuation), the piece is cut at
``MAX_PIECE_CHARS`` anyway and counted as unverified (``CutStats.unverified``, a warning from data
preparation): bounded memory wins over a few tokens around such a cut. A document of at most
``MAX_PIECE_CHARS`` characters is never cut, so ordinary documents are tokenized exactly as before.
"""

from __future__ import annotations

import collections
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

MAX_PIECE_CHARS = 1 << 16  # the most characters one tokenizer call sees
CHECK_CHARS = 256  # characters either side of a cut tokenized to verify it
_TRIES = 4  # candidates of each kind tried per cut


@dataclass
class CutStats:
    """How long documents were cut: documents cut, cuts made, and cuts no candidate verified."""

    documents: int = 0
    cuts: int = 0
    unverified: int = 0

    def add(self, other: CutStats) -> None:
        self.documents += other.documents
        self.cuts += other.cuts
        self.unverified += other.unverified


def _ids(tokenizer: Any, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tokenizer.encode_batch_fast(texts, add_special_tokens=False)]


def cut_is_exact(tokenizer: Any, text: str, left_end: int, right_start: int) -> bool:
    """Whether ``text[..left_end]`` and ``text[right_start..]`` tokenize like the text around the cut."""
    a, b = max(0, left_end - CHECK_CHARS), min(len(text), right_start + CHECK_CHARS)
    whole, left, right = _ids(tokenizer, [text[a:b], text[a:left_end], text[right_start:b]])
    return whole == left + right


_SPACE_BETWEEN_WORDS = re.compile(r"(?<=\S) (?=\S)")  # 1.
_AFTER_NEWLINE = re.compile(r"(?<=\n)(?=\S)")  # 2.
_AFTER_PUNCTUATION = re.compile(r"(?<=[^\w\s])(?=\w)")  # 3.


def _last_matches(pattern: re.Pattern, text: str, lo: int, hi: int) -> list[int]:
    """Start positions ``lo < c <= hi`` of ``pattern``'s last ``_TRIES`` matches, last first."""
    found = collections.deque(maxlen=_TRIES)
    for match in pattern.finditer(text, lo + 1, hi + 2):
        if match.start() <= hi:
            found.append(match.start())
    return list(reversed(found))


def _candidates(text: str, lo: int, hi: int) -> Iterator[tuple[int, int]]:
    """Cuts ``(left_end, right_start)`` with ``lo < left_end <= hi``, best first (module docstring)."""
    for c in _last_matches(_SPACE_BETWEEN_WORDS, text, lo, hi):
        yield c, c  # the space starts the right piece
        yield c, c + 1  # the space is dropped: the tokenizer prepends one to the right piece
    for pattern in (_AFTER_NEWLINE, _AFTER_PUNCTUATION):
        for c in _last_matches(pattern, text, lo, hi):
            yield c, c
    step = max(1, (hi - lo) // _TRIES)
    for c in range(hi, lo, -step):  # 4. plain positions
        yield c, c


def document_pieces(
    text: str, tokenizer: Any, stats: CutStats | None = None, max_chars: int = MAX_PIECE_CHARS
) -> Iterator[str]:
    """The pieces of ``text`` (itself if it has at most ``max_chars`` characters), cut as the module says.

    The tokens of the pieces, concatenated, are the tokens of ``text`` at every verified cut.
    """
    if len(text) <= max_chars:
        yield text
        return
    stats = stats if stats is not None else CutStats()
    stats.documents += 1
    start = 0
    while len(text) - start > max_chars:
        hi, lo = start + max_chars, start + max_chars // 2
        cut = next((c for c in _candidates(text, lo, hi) if cut_is_exact(tokenizer, text, *c)), None)
        if cut is None:
            cut = (hi, hi)
            stats.unverified += 1
        stats.cuts += 1
        yield text[start : cut[0]]
        start = cut[1]
    yield text[start:]
