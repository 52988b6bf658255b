"""A tokenizer's fingerprint: what decides which embedding row a stored token id selects.

Data preparation records it in ``manifest.json`` (``shearing.data.tokenizer``); training and evaluation
compare it with the model's tokenizer (``shearing.data.compat``). Both import it from here, so neither
imports the other for it.

Fingerprint (``FINGERPRINT_METHOD``): sha256 over a canonical JSON of the vocabulary as sorted
``[id, token]`` pairs (added tokens included), the special tokens with their ids, and the bos/eos ids.
That is what decides which embedding row a stored id selects; it does not depend on where the tokenizer
lives or how its files are laid out, so it is stable across ``save_pretrained`` / ``from_pretrained``
(the serialised ``tokenizer.json`` is not: saving rewrites padding/truncation fields). Merges are not
hashed: two tokenizers with one vocabulary index the same embedding rows.

Core fingerprint: the same hash over the ids below ``core_vocab_size``, the vocabulary less its trailing
special added tokens that the framing does not use. Across transformers versions the same files can load
with extra tokens (transformers 5 loads a ``model_type: qwen2`` folder with ``Qwen2Tokenizer``, which
appends its default ``<|endoftext|>`` pad token when the files lack it: 512 tokens under 4.51, 513 under
5.x), so the full fingerprint differs while the core one does not.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable
from typing import Any

FINGERPRINT_METHOD = "sha256(vocab id->token, special tokens, bos/eos ids) v1"


def tokenizer_fingerprint(tokenizer: Any, below: int | None = None) -> str:
    """The fingerprint (hex sha256) of a Hugging Face tokenizer; see the module docstring. With ``below``,
    of its ids below ``below`` only (a bos/eos id at or above it counts as none): the core fingerprint."""

    def keep(i: Any) -> bool:
        return below is None or (i is not None and int(i) < below)

    vocab = sorted((int(i), str(t)) for t, i in tokenizer.get_vocab().items() if keep(i))
    special = sorted(
        (str(t), int(i))
        for t in tokenizer.all_special_tokens
        if keep(i := tokenizer.convert_tokens_to_ids(t))
    )
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    payload = {
        "vocab": vocab,
        "special": special,
        "bos_token_id": bos if keep(bos) else None,
        "eos_token_id": eos if keep(eos) else None,
    }
    text = json.dumps(payload, ensure_ascii=False, separators=(",", ":"))
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def core_vocab_size(tokenizer: Any, used: Iterable[int | None] = ()) -> int:
    """``len(tokenizer)`` less its trailing special added tokens whose ids are not in ``used`` (the framing's
    bos/eos): where the ids a transformers version may append start (see the module docstring)."""
    used_ids = {int(i) for i in used if i is not None}
    added = tokenizer.added_tokens_decoder
    size = len(tokenizer)
    while size > 0 and size - 1 not in used_ids and getattr(added.get(size - 1), "special", False):
        size -= 1
    return size
