"""The tokenizer half of a llama GGUF (``tokenizer.ggml.*``), written so llama.cpp tokenizes like the model's
own tokenizer and stops where the export's generation config says.

Byte-level BPE only (``tokenizer.ggml.model = "gpt2"``): ours, SmolLM2's, LLaMA-3's, Qwen2's. A
SentencePiece tokenizer (LLaMA-2's, ``"llama"``) needs its ``tokenizer.model`` piece scores; it is refused
rather than written approximately.

**Pre-tokenizer (``tokenizer.ggml.pre``), identified by what it does.** Before BPE merges, a byte-level
tokenizer cuts text into pieces with a list of regexes applied in order; llama.cpp does the same with the
list fixed by the pre name (``llm_tokenizer_bpe`` in its ``src/llama-vocab.cpp``). So the HF
pre-tokenizer (from the tokenizer as transformers runs it, not just the file) is read as that list:
``Split(pattern, Isolated)`` is its regex, ``Digits(individual_digits)`` is ``\\p{N}``, and a final
``ByteLevel`` with ``use_regex`` adds GPT-2's regex. The list, plus whether whole words found in the
vocabulary skip the merges (``ignore_merges``, which llama.cpp ties to the name), picks the name:

======================================  =============  ==========================================
splits                                  ignore_merges  name (llama.cpp's example model)
======================================  =============  ==========================================
GPT-2 regex                             no             ``gpt-2`` (GPT-2, our trained tokenizer)
``\\p{N}``, GPT-2 regex                 no             ``smollm`` (SmolLM/SmolLM2; starcoder's too)
LLaMA-3 regex                           yes            ``llama-bpe`` (LLaMA-3)
LLaMA-3 regex                           no             ``smaug-bpe`` (the same split, merges kept)
Qwen2 regex                             no             ``qwen2`` (Qwen1.5/2/2.5)
======================================  =============  ==========================================

Anything else (another regex, a prefix space, a word-piece prefix or suffix, BPE dropout, a normalizer
other than NFC, added tokens that strip spaces) is refused with what was found: llama.cpp would cut text
differently (``default``, the old value, turned ``it's`` into ``it ' s``). llama.cpp's own
``convert_hf_to_gguf.py`` identifies the tokenizer by hashing a tokenization and knows more models.
One known gap is accepted with a warning: llama.cpp applies no normalizer, so a tokenizer that NFC-
normalizes (Qwen2's) gives other tokens there for text not already in NFC form (decomposed accents).

**Special ids follow the export, not the tokenizer files.** bos/eos/pad come from the export folder's
``generation_config.json`` (what ``generate`` uses), else ``config.json``, else the tokenizer; unk from
the tokenizer. A list of eos ids gives the tokenizer's eos when it is in the list, else the first.
When the tokenizer files name another id (SmolLM2's say eos ``<|im_start|>``, its generation config
``<|im_end|>``), a warning names both and the files. ``add_bos``/``add_eos`` are what the tokenizer does.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# The regexes a byte-level pre-tokenizer splits with, as tokenizer.json spells them (HF form first; the
# second spelling is llama.cpp's rewrite of ``(?i:...)``, same matches).
_CONTRACTIONS_CI = (
    "(?i:'s|'t|'re|'ve|'m|'ll|'d)",
    "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])",
)
_LLAMA3_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
_QWEN2_TAIL = r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
SPLITS = {
    "gpt2": (r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+",),
    "digit": (r"\p{N}",),
    "llama3": tuple(c + _LLAMA3_TAIL for c in _CONTRACTIONS_CI),
    "qwen2": tuple(c + _QWEN2_TAIL for c in _CONTRACTIONS_CI),
}
# (splits in order, ignore_merges) -> llama.cpp's tokenizer.ggml.pre.
PRE_NAMES = {
    (("gpt2",), False): "gpt-2",
    (("digit", "gpt2"), False): "smollm",
    (("llama3",), True): "llama-bpe",
    (("llama3",), False): "smaug-bpe",
    (("qwen2",), False): "qwen2",
}
_REFUSED_TAIL = (
    "llama.cpp would split text differently from the tokenizer, so no GGUF is written. Convert the export "
    "with llama.cpp's convert_hf_to_gguf.py, or export without --gguf"
)
# GGUF token types (gguf.TokenType): the ones written here.
NORMAL, CONTROL, USER_DEFINED, UNUSED = 1, 3, 4, 5


def describe_pre_tokenizer(pre: dict | None) -> str:
    """A one-line rendering of a tokenizer.json pre-tokenizer, for messages."""
    if not pre:
        return "none"
    kind = pre.get("type")
    if kind == "Sequence":
        return "Sequence[" + ", ".join(describe_pre_tokenizer(p) for p in pre.get("pretokenizers", [])) + "]"
    if kind == "Split":
        pattern = pre.get("pattern") or {}
        return f"Split({json.dumps(pattern)}, {pre.get('behavior')}, invert={pre.get('invert')})"
    if kind == "ByteLevel":
        return f"ByteLevel(use_regex={pre.get('use_regex', True)}, add_prefix_space={pre.get('add_prefix_space')})"
    if kind == "Digits":
        return f"Digits(individual_digits={pre.get('individual_digits')})"
    return str(kind)


def _steps(pre: dict | None) -> list[dict]:
    if not pre:
        return []
    return pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre]


def pre_tokenizer_splits(pre: dict | None) -> tuple[str, ...] | None:
    """The ``SPLITS`` keys a tokenizer.json pre-tokenizer applies, in order; None when it is not one of them."""
    steps = _steps(pre)
    if not steps or steps[-1].get("type") != "ByteLevel" or steps[-1].get("add_prefix_space"):
        return None
    splits = []
    for step in steps[:-1]:
        if step.get("type") == "Digits" and step.get("individual_digits"):
            splits.append("digit")
        elif step.get("type") == "Split" and step.get("behavior") == "Isolated" and not step.get("invert"):
            regex = (step.get("pattern") or {}).get("Regex")
            found = [name for name, spellings in SPLITS.items() if regex in spellings]
            if not found:
                return None
            splits.append(found[0])
        else:
            return None
    if steps[-1].get("use_regex", True):
        splits.append("gpt2")
    return tuple(splits)


def identify_pre_tokenizer(spec: dict, where: str) -> str:
    """llama.cpp's ``tokenizer.ggml.pre`` for a byte-level BPE ``spec`` (tokenizer.json); ValueError if none fits."""
    model = spec.get("model") or {}
    pre = spec.get("pre_tokenizer")
    found = f"pre-tokenizer {describe_pre_tokenizer(pre)}"
    if model.get("type") != "BPE" or not any(step.get("type") == "ByteLevel" for step in _steps(pre)):
        raise ValueError(
            f"--gguf writes byte-level BPE tokenizers (tokenizer.ggml.model 'gpt2'); the tokenizer in {where} is a "
            f"{model.get('type')} model with {found} (a SentencePiece tokenizer such as LLaMA-2's needs its "
            "tokenizer.model scores and the sentencepiece package, which this converter does not use). Export "
            "without --gguf and convert with llama.cpp's convert_hf_to_gguf.py"
        )
    for key in ("continuing_subword_prefix", "end_of_word_suffix", "dropout"):
        if model.get(key):
            raise ValueError(f"--gguf: the BPE model in {where} has {key}={model[key]!r}; {_REFUSED_TAIL}")
    splits = pre_tokenizer_splits(pre)
    name = PRE_NAMES.get((splits, bool(model.get("ignore_merges")))) if splits is not None else None
    if name is None:
        merges = f", ignore_merges={bool(model.get('ignore_merges'))}" if splits else ""
        raise ValueError(
            f"--gguf cannot match the {found}{merges} of the tokenizer in {where} to a llama.cpp pre-tokenizer "
            f"(known: {', '.join(sorted(set(PRE_NAMES.values())))}); {_REFUSED_TAIL}"
        )
    _check_normalizer(spec.get("normalizer"), where)
    for token in spec.get("added_tokens", []):
        stripping = [k for k in ("lstrip", "rstrip", "single_word") if token.get(k)]
        if stripping:
            raise ValueError(
                f"--gguf: the added token {token.get('content')!r} (id {token.get('id')}) in {where} has "
                f"{'/'.join(stripping)} set, which llama.cpp does not apply; {_REFUSED_TAIL}"
            )
    return name


def _check_normalizer(normalizer: dict | None, where: str) -> None:
    steps = (
        normalizer.get("normalizers", [])
        if normalizer and normalizer.get("type") == "Sequence"
        else [normalizer]
    )
    kinds = [step.get("type") for step in steps if step]
    if not kinds:
        return
    if kinds == ["NFC"]:
        message = (
            f"--gguf: the tokenizer in {where} NFC-normalizes text and llama.cpp does not: text not already in "
            "NFC form (e.g. decomposed accents) tokenizes differently there; normalize prompts with "
            "unicodedata.normalize('NFC', text) before llama.cpp"
        )
        warnings.warn(message, stacklevel=3)
        log.warning(message)
        return
    raise ValueError(
        f"--gguf: the tokenizer in {where} has normalizer {'+'.join(map(str, kinds))}; {_REFUSED_TAIL}"
    )


# ------------------------------------------------------------------------------------- special ids
def special_token_ids(folder: Path, config: Any, tok: Any) -> dict[str, dict[str, Any]]:
    """``{kind: {"id", "from", ["tokenizer"]}}`` for bos/eos/pad/unk; rules in the module docstring.

    ``"tokenizer"`` is present when the tokenizer files name another id (a warning says so)."""
    generation_file = folder / "generation_config.json"
    generation = json.loads(generation_file.read_text()) if generation_file.is_file() else {}
    vocab_size = int(config.vocab_size)
    chosen = {}
    for kind in ("bos", "eos", "pad", "unk"):
        key = f"{kind}_token_id"
        own = getattr(tok, key)
        candidates = [(own, "tokenizer")]
        if kind != "unk":  # generation configs carry no unk
            candidates = [
                (generation.get(key), "generation_config.json"),
                (getattr(config, key, None), "config.json"),
                *candidates,
            ]
        value, source = next(((v, s) for v, s in candidates if v is not None), (None, None))
        if isinstance(value, list):
            value = own if own in value else value[0] if value else None
        if value is None:
            continue
        if not isinstance(value, int) or not 0 <= value < vocab_size:
            raise ValueError(
                f"--gguf: {key} {value!r} in {source} of {folder} is not a token id of this model (0..{vocab_size - 1}): "
                "fix it in the source model's file and export again"
            )
        chosen[kind] = {"id": value, "from": source}
        if own is not None and own != value:
            chosen[kind]["tokenizer"] = own
            message = (
                f"--gguf: {kind} token id {value} ({_token_text(tok, value)!r}) from {source} differs from the "
                f"tokenizer files' {kind} id {own} ({_token_text(tok, own)!r}, tokenizer_config.json / "
                f"special_tokens_map.json) in {folder}; the GGUF uses {value}, as the export's generation does"
            )
            warnings.warn(message, stacklevel=3)
            log.warning(message)
    return chosen


def _token_text(tok: Any, token_id: int) -> str:
    return tok.convert_ids_to_tokens(token_id) or f"<id {token_id}>"


# -------------------------------------------------------------------------------------- the fields
def gguf_tokenizer(folder: str | os.PathLike, config: Any) -> dict[str, Any]:
    """The ``tokenizer.ggml.*`` fields for the export folder ``folder`` (its tokenizer files and configs).

    Returns ``tokens``, ``types``, ``merges``, ``pre``, ``special`` (see ``special_token_ids``),
    ``add_bos``, ``add_eos`` and ``chat_template``. Raises ValueError for tokenizers llama.cpp would not
    reproduce (see the module docstring), before anything is written."""
    from shearing.data.tokenizer import load_hf_tokenizer

    folder = Path(folder)
    if not (folder / "tokenizer.json").is_file():
        raise ValueError(
            f"--gguf needs the tokenizer's tokenizer.json in {folder}, and there is none: export a run whose "
            "source has a fast (tokenizers) tokenizer, or drop --gguf"
        )
    vocab_size = int(config.vocab_size)
    tok = load_hf_tokenizer(folder)  # as AutoTokenizer; a folder saved by transformers 5 loads under 4.x too
    spec = json.loads(tok.backend_tokenizer.to_str())  # what transformers runs, after its own adjustments
    pre = identify_pre_tokenizer(spec, f"{folder}")
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ValueError(
            f"the tokenizer in {folder} has token id {max(vocab.values())} but the model's vocab_size is "
            f"{vocab_size}: they do not belong together"
        )
    by_id = {i: t for t, i in vocab.items()}
    special = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    added = set(tok.added_tokens_decoder)
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(UNUSED)
        else:
            tokens.append(by_id[i])
            types.append(CONTROL if i in special else USER_DEFINED if i in added else NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
    probe = tok("a").input_ids
    plain = tok("a", add_special_tokens=False).input_ids
    return {
        "tokens": tokens,
        "types": types,
        "merges": merges,
        "pre": pre,
        "special": special_token_ids(folder, config, tok),
        "add_bos": tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id] != plain[:1],
        "add_eos": tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id] != plain[-1:],
        "chat_template": tok.chat_template if isinstance(tok.chat_template, str) else None,
    }
