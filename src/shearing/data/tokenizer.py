"""Tokenizers for data preparation: loading and checking one, and training a small one from raw domains.

Loading (``load_tokenizer_info``) decides how data preparation frames every document, following the
tokenizer's own convention, so the data looks like what the model saw in pre-training:

- EOS ends every document: the tokenizer's ``eos_token``, or ``--eos-token TOKEN``. No eos and no flag:
  refused (documents would run into each other).
- BOS starts every document only if the tokenizer adds it itself (``tokenizer(text)`` starts with
  ``bos_token_id``, as LLaMA-2/3 and Mistral do). A ``bos_token`` the tokenizer does not add (SmolLM2's
  ``<|im_start|>``, a chat-turn marker) is not written: the model never saw it at document starts.
  ``--bos-token TOKEN`` forces one, ``--no-bos`` forbids it.
- bos == eos (GPT-2 style ``<|endoftext|>`` for both) is ambiguous: refused unless ``--bos-token``,
  ``--no-bos`` or ``--eos-token`` says what is meant. The refusal spells out the flags to pass, read
  from the model folder the tokenizer sits in (``model_eos_token``): when its generation_config.json
  (else config.json) names another ``eos_token_id``, that token is the model's real end of text
  (SmolLM2's GGUF-converted tokenizer files say ``<|im_start|>`` for both, its generation_config.json
  says id 2, ``<|im_end|>``), so the fix is ``--no-bos --eos-token '<|im_end|>'``: ``text <|im_end|>``.

The choice (ids, strings, and why) goes into the manifest's ``tokenizer`` entry, with the tokenizer's
fingerprint (``shearing.data.fingerprint``), which training and evaluation check the model against. Only the Rust
("fast") backend is used: its serialised form travels to the worker processes, which then need
``tokenizers`` alone, not ``transformers``. The vocabulary size is ``len(tokenizer)``, added tokens
included, because that is the largest id the shards can hold.

transformers versions (``load_hf_tokenizer``): 5.x saves ``tokenizer_class: TokenizersBackend``, a class
4.x does not know; such a folder is loaded under 4.x as the ``PreTrainedTokenizerFast`` its
``tokenizer.json`` describes (same vocabulary, same ids). Tokenizers this module saves name
``PreTrainedTokenizerFast``, which both load. Note that 5.x picks the tokenizer class from
``config.json``'s ``model_type`` for some families (qwen2: ``Qwen2Tokenizer``, with its own
pre-tokenizer and default special tokens) where 4.x follows ``tokenizer.json``: the same folder can then
split text differently, with the same id -> token map (``shearing.data.fingerprint`` hashes that map).

Training (``train_bpe_tokenizer``): a byte-level BPE (GPT-2 style pre-tokenisation, no normaliser) on the
documents of ``RAW_DIR``, for tests and demos that have no source tokenizer. Byte-level means every
string round-trips exactly through encode/decode, which the data tests rely on. Special tokens follow
LLaMA's ids: ``<unk>`` 0, ``<s>`` 1, ``</s>`` 2; like LLaMA, ``tokenizer(text)`` prepends ``<s>`` (data
preparation encodes without special tokens and frames documents itself). The result is saved as a
``PreTrainedTokenizerFast`` so ``AutoTokenizer.from_pretrained(TOKENIZER_DIR)`` loads it (under 4.x and
5.x alike); decoding does not "clean up" spaces, which would break the round trip.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import shlex
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shearing.data.fingerprint import FINGERPRINT_METHOD, core_vocab_size, tokenizer_fingerprint
from shearing.data.raw import RawFile, discover_domains, read_documents

UNK, BOS, EOS = "<unk>", "<s>", "</s>"
SPECIAL_TOKENS = (UNK, BOS, EOS)
MIN_VOCAB_SIZE = 256 + len(SPECIAL_TOKENS)


@dataclass(frozen=True)
class TokenizerInfo:
    """What data preparation needs from a tokenizer; ``backend_json`` is the serialised Rust tokenizer.

    ``bos_token_id`` is ``None`` when documents get no BOS; ``framing`` says why each token was chosen.
    """

    path: str
    name: str
    vocab_size: int
    bos_token: str | None
    bos_token_id: int | None
    eos_token: str
    eos_token_id: int
    backend_json: str
    fingerprint: str = ""  # shearing.data.fingerprint.tokenizer_fingerprint of the loaded tokenizer
    framing: str = ""
    core_vocab_size: int = 0  # shearing.data.fingerprint.core_vocab_size, and the fingerprint below it
    core_fingerprint: str = ""

    @property
    def settings_digest(self) -> str:
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
            "framing": self.framing,
            "fingerprint": self.fingerprint,
            "fingerprint_method": FINGERPRINT_METHOD,
            "core_vocab_size": self.core_vocab_size,
            "core_fingerprint": self.core_fingerprint,
        }


def _token_id(tokenizer: Any, token: str, flag: str, path: Any) -> int:
    ids = tokenizer.convert_tokens_to_ids([token])
    if not ids or ids[0] is None or (ids[0] == tokenizer.unk_token_id and token != tokenizer.unk_token):
        raise ValueError(
            f"{flag} {token!r} is not a token of the tokenizer at {path}: give a token string from its "
            f"vocabulary (its special tokens are {tokenizer.all_special_tokens})"
        )
    return int(ids[0])


MODEL_CONFIG_FILES = ("generation_config.json", "config.json")  # where a model folder names its eos


def model_eos_token(tokenizer: Any, path: Any) -> tuple[str, int, str] | None:
    """(token, id, file) of the model's own end-of-text token where it is not the tokenizer's eos_token:
    the first ``eos_token_id`` (an id or a list of ids) of the folder's generation_config.json, else
    config.json, that is a token of ``tokenizer``; None when neither names another one."""
    if not isinstance(path, str | os.PathLike) or not Path(path).is_dir():
        return None
    for name in MODEL_CONFIG_FILES:
        try:
            ids = json.loads((Path(path) / name).read_text()).get("eos_token_id")
        except (OSError, ValueError, AttributeError):
            continue  # absent or unreadable: the model's own loaders report a damaged file
        for token_id in ids if isinstance(ids, list) else [ids]:
            if (
                isinstance(token_id, int)
                and not isinstance(token_id, bool)
                and 0 <= token_id < len(tokenizer)
            ):
                if token_id != tokenizer.eos_token_id:
                    return str(tokenizer.convert_ids_to_tokens(token_id)), token_id, name
        if ids is not None:
            return None  # the file names the tokenizer's own eos (or no usable id): nothing better to offer
    return None


def _ambiguous_message(tokenizer: Any, path: Any) -> str:
    """The refusal of a tokenizer whose bos_token is its eos_token, with the whole fix spelt out."""
    token = tokenizer.eos_token
    head = (
        f"tokenizer at {path} uses {token!r} as both bos_token and eos_token, so it is ambiguous whether "
        "documents start with it"
    )
    model_eos = model_eos_token(tokenizer, path)
    if model_eos is None:
        return (
            f"{head}: pass --no-bos (documents separated by {token!r} only, the GPT-2 convention) or "
            "--bos-token TOKEN (and --eos-token TOKEN for another end-of-document token)"
        )
    eos, eos_id, source = model_eos
    return (
        f"{head}. This model's {source} says eos_token_id {eos_id} ({eos!r}): use --no-bos --eos-token "
        f"{shlex.quote(eos)} (the eos of this model's {source}), which frames every document as "
        f"`text {eos}`. Alternatively, --no-bos alone separates documents by {token!r}, and --bos-token TOKEN "
        "starts each document with TOKEN"
    )


def choose_framing(
    tokenizer: Any,
    path: Any,
    bos_token: str | None = None,
    eos_token: str | None = None,
    no_bos: bool = False,
) -> tuple[str | None, int | None, str, int, str]:
    """(bos token, bos id, eos token, eos id, why) for framing documents; rules in the module docstring."""
    if bos_token is not None and no_bos:
        raise ValueError("--bos-token and --no-bos contradict each other: give one of them")
    own_bos, own_eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if eos_token is not None:
        eos_id, eos, eos_why = _token_id(tokenizer, eos_token, "--eos-token", path), eos_token, "--eos-token"
    elif own_eos is None:
        raise ValueError(
            f"tokenizer at {path} has no eos_token, so documents could not be separated: pass "
            "--eos-token TOKEN (e.g. '<|endoftext|>'), or set eos_token in its tokenizer_config.json"
        )
    else:
        eos_id, eos, eos_why = int(own_eos), str(tokenizer.eos_token), "the tokenizer's eos_token"
    explicit = bos_token is not None or no_bos or eos_token is not None
    if own_bos is not None and own_bos == own_eos and not explicit:
        raise ValueError(_ambiguous_message(tokenizer, path))
    adds_bos = False
    if own_bos is not None:
        with_special = tokenizer("a")["input_ids"]
        without = tokenizer("a", add_special_tokens=False)["input_ids"]
        adds_bos = with_special[:1] == [own_bos] and without[:1] != [own_bos]
    if no_bos:
        bos, bos_id, bos_why = None, None, "no BOS (--no-bos)"
    elif bos_token is not None:
        bos, bos_id = bos_token, _token_id(tokenizer, bos_token, "--bos-token", path)
        bos_why = "BOS from --bos-token"
    elif adds_bos:
        bos, bos_id, bos_why = str(tokenizer.bos_token), int(own_bos), "BOS: the tokenizer adds its bos_token"
    elif own_bos is not None:
        bos, bos_id = None, None
        bos_why = f"no BOS: the tokenizer does not add its bos_token {tokenizer.bos_token!r} itself"
    else:
        bos, bos_id, bos_why = None, None, "no BOS: the tokenizer has no bos_token"
    if bos_id is not None and bos_id == eos_id:
        bos_why += f" (the same token as EOS, {eos!r})"
    framing = f"{'BOS + ' if bos_id is not None else ''}text + EOS; {bos_why}; EOS: {eos_why}"
    return bos, bos_id, eos, eos_id, framing


PORTABLE_CLASS = "PreTrainedTokenizerFast"  # a tokenizer_class transformers 4.x and 5.x both load
V5_ONLY_CLASS = "TokenizersBackend"  # what 5.x saves for a tokenizer.json-backed tokenizer


def load_hf_tokenizer(path: str | os.PathLike, **kwargs: Any) -> Any:
    """``AutoTokenizer.from_pretrained(path)``; under transformers 4.x, a folder saved by 5.x (its
    ``tokenizer_class`` is ``TokenizersBackend``) loads as ``PreTrainedTokenizerFast`` from its tokenizer.json."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    try:
        return AutoTokenizer.from_pretrained(str(path), **kwargs)
    except ValueError as err:
        if V5_ONLY_CLASS not in str(err) or not (Path(path) / "tokenizer.json").is_file():
            raise
        return PreTrainedTokenizerFast.from_pretrained(str(path), **kwargs)


def make_portable(folder: str | os.PathLike) -> None:
    """Name ``PORTABLE_CLASS`` instead of 5.x's ``TokenizersBackend`` in a saved tokenizer_config.json, so
    transformers 4.x loads the folder too (5.x loads ``PreTrainedTokenizerFast`` as ``TokenizersBackend``)."""
    config = Path(folder) / "tokenizer_config.json"
    raw = json.loads(config.read_text())
    if raw.get("tokenizer_class") == V5_ONLY_CLASS:
        raw["tokenizer_class"] = PORTABLE_CLASS
        config.write_text(json.dumps(raw, indent=2, ensure_ascii=False) + "\n")


def load_tokenizer_info(
    path: str | os.PathLike,
    bos_token: str | None = None,
    eos_token: str | None = None,
    no_bos: bool = False,
) -> TokenizerInfo:
    """Load a Hugging Face tokenizer and decide the document framing (module docstring); fast backend only."""
    try:
        tokenizer = load_hf_tokenizer(path)
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
    bos, bos_id, eos, eos_id, framing = choose_framing(tokenizer, path, bos_token, eos_token, no_bos)
    core = core_vocab_size(tokenizer, used=(bos_id, eos_id))
    return TokenizerInfo(
        path=str(Path(path).resolve()) if Path(path).is_dir() else str(path),
        name=str(tokenizer.name_or_path),
        vocab_size=len(tokenizer),
        bos_token=bos,
        bos_token_id=bos_id,
        eos_token=eos,
        eos_token_id=eos_id,
        backend_json=tokenizer.backend_tokenizer.to_str(),
        fingerprint=tokenizer_fingerprint(tokenizer),
        framing=framing,
        core_vocab_size=core,
        core_fingerprint=tokenizer_fingerprint(tokenizer, below=core),
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
        make_portable(tmp)
        if output.exists():
            shutil.rmtree(output)
        os.replace(tmp, output)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return output
