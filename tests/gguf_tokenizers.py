"""Byte-level BPE tokenizers with each pre-tokenizer structure ``shearing.export.gguf_vocab`` maps to a llama.cpp name.

``variant(spec, name)`` rewrites a tokenizer.json (its pre-tokenizer, normalizer and ``ignore_merges``)
into the structure the real model family ships (LLaMA-3's Split + ByteLevel without its regex, Qwen2's
with NFC, SmolLM2's Digits + ByteLevel, ...), so one vocabulary can be read every way.
``shared_vocab_tokenizer`` trains that vocabulary on the test corpus with GPT-2's split, which leaves
merges across every boundary the other splits draw (``Ġ1``, ``2000``, ``'s``), and adds ``RAW_WORD``
to the vocabulary without the merges that would build it: only ``ignore_merges`` finds it whole. Read
under the wrong name, at least one of ``PROMPTS`` then tokenizes differently.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

from shearing.export.gguf_vocab import SPLITS

RAW_WORD = "Ġzqxjvkw"  # in the vocabulary, not reachable by merges (a space then "zqxjvkw")


def _byte_level(use_regex: bool) -> dict:
    return {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": use_regex}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


# name -> (pre_tokenizer, normalizer, ignore_merges), as each family's tokenizer.json has them.
STRUCTURES = {
    "gpt-2": (_byte_level(True), None, False),
    "smollm": (
        {
            "type": "Sequence",
            "pretokenizers": [{"type": "Digits", "individual_digits": True}, _byte_level(True)],
        },
        None,
        False,
    ),
    "llama-bpe": (
        {"type": "Sequence", "pretokenizers": [_split(SPLITS["llama3"][0]), _byte_level(False)]},
        None,
        True,
    ),
    "smaug-bpe": (
        {"type": "Sequence", "pretokenizers": [_split(SPLITS["llama3"][0]), _byte_level(False)]},
        None,
        False,
    ),
    "qwen2": (
        {"type": "Sequence", "pretokenizers": [_split(SPLITS["qwen2"][0]), _byte_level(False)]},
        {"type": "NFC"},
        False,
    ),
}

# Text where the splits differ: digit runs, contractions in any case, punctuation glued to words,
# whitespace runs with tabs and newlines, code, HTML, scripts beyond Latin, emoji with joiners.
PROMPTS = [
    "it's 12345 apples, 3.14159 and 1,000,000 (or 2000)",
    "I'll say we've done it; they're here. IT'S DONE, We'Ve a'lL 'RE 'M 'D",
    "7 77 777 7777 77777 777777",
    "  leading spaces\n\nnewlines\r\n\ttabs \t\t and trailing   ",
    "def f(x):\n    return [y ** 2 for y in range(x)]  # squares\n",
    '<div class="note">caf\u00e9 &amp; na\u00efve \u65e5\u672c\u8a9e</div>',
    "emoji \U0001f600! family \U0001f469\u200d\U0001f469\u200d\U0001f467 \u2705\u2705",
    "\u041f\u0440\u0438\u0432\u0435\u0442, \u043c\u0438\u0440! \u0967\u0968\u0969 \u0661\u0662\u0663 \u1780\u17b6\u1793\u17cb",
    "!!!???...---===```''''\"\"\"",
    " \n \n\n \n\n\n\t\n",
    f"the word{RAW_WORD.replace('Ġ', ' ')} and{RAW_WORD.replace('Ġ', ' ')}s",
]


def variant(spec: dict, name: str) -> dict:
    """A copy of tokenizer.json ``spec`` with the pre-tokenizer structure of ``name`` (a ``STRUCTURES`` key)."""
    pre, normalizer, ignore_merges = STRUCTURES[name]
    out = copy.deepcopy(spec)
    out["pre_tokenizer"] = copy.deepcopy(pre)
    out["normalizer"] = copy.deepcopy(normalizer)
    out["model"]["ignore_merges"] = ignore_merges
    return out


def write_variant(source: Path, name: str, out: Path) -> Path:
    """``source``'s tokenizer files in ``out``, with ``name``'s structure."""
    import shutil

    out.mkdir(parents=True, exist_ok=True)
    for path in source.iterdir():
        if path.name in (
            "tokenizer.json",
            "tokenizer_config.json",
            "special_tokens_map.json",
            "vocab.json",
            "merges.txt",
        ):
            shutil.copy(path, out / path.name)
    spec = json.loads((source / "tokenizer.json").read_text())
    (out / "tokenizer.json").write_text(json.dumps(variant(spec, name), ensure_ascii=False))
    return out


def shared_vocab_tokenizer(texts: list[str], out: Path, vocab_size: int = 2000) -> Path:
    """A byte-level BPE trained on ``texts`` with GPT-2's split, plus ``RAW_WORD`` (see the docstring)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    spec = json.loads(tokenizer.to_str())
    assert RAW_WORD not in spec["model"]["vocab"]
    spec["model"]["vocab"][RAW_WORD] = len(spec["model"]["vocab"])
    tokenizer = Tokenizer.from_str(json.dumps(spec))
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>")
    wrapped.save_pretrained(out)
    return out
