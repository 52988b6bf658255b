"""Tokenizers for data preparation: loading and checking one, and training a small one from raw domains.

Loading (``load_tokenizer_info``): data preparation frames every document as BOS + text + EOS, so a
tokenizer without a bos or eos token is refused with a message saying how to fix it. Only the Rust
("fast") backend is used: its serialised form travels to the worker processes, which then need
``tokenizers`` alone, not ``transformers``. The vocabulary size is ``len(tokenizer)``, added tokens
included, because that is the largest id the shards can hold.

Training (``train_bpe_tokenizer``): a byte-level BPE (GPT-2 style pre-tokenisation, no normaliser) on the
documents of ``RAW_DIR``, for tests and demos that have no source tokenizer. Byte-level means every
string round-trips exactly through encode/decode, which the data tests rely on. Special tokens follow
LLaMA's ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2; like LLaMA, ``tokenizer(text)`` prepends ``<s>`` (data
preparation encodes without special tokens and frames documents itself). The result is saved as a
``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained(TOKENIZER_DIR)`` loads it; decoding does
not "clean up" spaces, which would break the round trip.
"""

from __future__ import annotations

import hashlib
import itertools
import os
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shearing.data.raw import RawFile, discover_domains, read_documents

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@dataclass(frozen=True)
class TokenizerInfo:
    """What data preparation needs from a tokenizer; ``backend_json`` is the serialised Rust tokenizer."""

    path: str
    name: str
    vocab_size: int
    bos_token: str
    bos_token_id: int
    eos_token: str
    eos_token_id: int
    backend_json: str

    @property
    def fingerprint(self) -> str:
        """A hash of everything that decides the token ids written (vocabulary, merges, bos/eos)."""
        digest = hashlib.sha256(self.backend_json.encode("utf-8"))
        digest.update(f"{self.bos_token_id},{self.eos_token_id},{self.vocab_size}".encode())
        return digest.hexdigest()[:16]

    def to_manifest(self) -> dict[str, Any]:
        """The manifest's ``tokenizer`` entry."""
        return {
            "path": self.path,
            "name": self.name,
            "vocab_size": self.vocab_size,
            "bos_token": self.bos_token,
            "bos_token_id": self.bos_token_id,
            "eos_token": self.eos_token,
            "eos_token_id": self.eos_token_id,
            "fingerprint": self.fingerprint,
        }


def load_tokenizer_info(path: str | os.PathLike) -> TokenizerInfo:
    """Load a Hugging Face tokenizer and check it can frame documents (fast backend, bos and eos)."""
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise ValueError(
            f"--tokenizer {path} could not be loaded with transformers.AutoTokenizer ({err}); point it at a "
            "folder with tokenizer.json / tokenizer_config.json, e.g. the source model's folder or the "
            "output of data_prep/train_tokenizer.py"
        ) from err
    if not tokenizer.is_fast:
        raise ValueError(
            f"tokenizer at {path} has no fast (Rust) backend: save it once with "
            "AutoTokenizer.from_pretrained(..., use_fast=True).save_pretrained(...) so tokenizer.json exists"
        )
    for role in ("bos", "eos"):
        if getattr(tokenizer, f"{role}_token_id") is None:
            raise ValueError(
                f"tokenizer at {path} has no {role}_token: every document is written as BOS + text + EOS; "
                f'set "{role}_token" in its tokenizer_config.json (LLaMA uses "<s>" and "</s>")'
            )
    return TokenizerInfo(
        path=str(Path(path).resolve()) if Path(path).is_dir() else str(path),
        name=str(tokenizer.name_or_path),
        vocab_size=len(tokenizer),
        bos_token=str(tokenizer.bos_token),
        bos_token_id=int(tokenizer.bos_token_id),
        eos_token=str(tokenizer.eos_token),
        eos_token_id=int(tokenizer.eos_token_id),
        backend_json=tokenizer.backend_tokenizer.to_str(),
    )


def _domain_texts(files: list[RawFile]) -> Iterator[str]:
    for file in files:
        for _, text in read_documents(file):
            yield text


def _training_texts(raw_dir: str | os.PathLike, max_docs_per_domain: int | None) -> Iterator[str]:
    for domain in discover_domains(raw_dir).values():
        yield from itertools.islice(_domain_texts(domain.files), max_docs_per_domain)


def train_bpe_tokenizer(
    raw_dir: str | os.PathLike,
    vocab_size: int,
    output: str | os.PathLike,
    *,
    min_frequency: int = 2,
    max_docs_per_domain: int | None = None,
    progress: bool = True,
) -> Path:
    """Train a byte-level BPE on ``raw_dir``'s documents and save it to ``output`` (see the module docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < MIN_VOCAB_SIZE:
        raise ValueError(
            f"--vocab-size {vocab_size} is too small: a byte-level BPE needs at least {MIN_VOCAB_SIZE} "
            "(256 bytes + <unk>, <s>, </s>)"
        )
    tokenizer = Tokenizer(models.BPE(unk_token=UNK))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=progress,
    )
    tokenizer.train_from_iterator(_training_texts(raw_dir, max_docs_per_domain), trainer=trainer)
    bos_id = tokenizer.token_to_id(BOS)
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
    )
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=BOS,
        eos_token=EOS,
        unk_token=UNK,
        clean_up_tokenization_spaces=False,
    )
    return _save_atomically(wrapped, Path(output))


def _save_atomically(tokenizer: Any, output: Path) -> Path:
    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.", dir=output.parent))
    try:
        tokenizer.save_pretrained(str(tmp))
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output
