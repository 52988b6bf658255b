"""A SmolLM2-like tokenizer built locally (no download): byte-level BPE whose special tokens are
``<|endoftext|>`` 0, ``<|im_start|>`` 1, ``<|im_end|>`` 2, with bos ``<|im_start|>`` and eos ``<|im_end|>``
(as SmolLM2-Instruct ships them) and, like SmolLM2, no post-processor: ``tokenizer(text)`` adds no bos.
``same_token=True`` gives the GPT-2 convention instead: bos = eos = ``<|endoftext|>``.
"""

from __future__ import annotations

from pathlib import Path

SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>")
TEXTS = [
    "def add(a, b):\n    return a + b\n",
    "The quick brown fox jumps over the lazy dog. " * 4,
    "Licensed under the Apache License, Version 2.0; you may not use this file except in compliance.",
]


def make_smol_like(out: Path, vocab_size: int = 400, same_token: bool = False, eos: bool = True) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(TEXTS * 20, trainer=trainer)
    if same_token:
        names = {"bos_token": SPECIALS[0], "eos_token": SPECIALS[0] if eos else None}
    else:
        names = {"bos_token": SPECIALS[1], "eos_token": SPECIALS[2] if eos else None}
    wrapped = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token=SPECIALS[0],
        clean_up_tokenization_spaces=False,
        **{k: v for k, v in names.items() if v is not None},
    )
    wrapped.save_pretrained(str(out))
    return out
