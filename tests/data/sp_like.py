"""SentencePiece-style tokenizers built locally (no download), shaped like LLaMA-2's ``tokenizer.json``.

A BPE over "▁"-joined words, trained on the given texts, in the two forms ``transformers`` converts
LLaMA-2 / Mistral tokenizers to: ``legacy`` (normalizer Prepend("▁") + Replace(" ", "▁"), no
pre-tokenizer: BPE runs over the whole text) and ``metaspace`` (a Metaspace pre-tokenizer that
prepends "▁" to the first word only, no split). Both prepend "▁" to every input, which is what makes
cutting a document for them differ from byte-level tokenizers (``shearing.data.pieces``).
"""

from __future__ import annotations

from collections.abc import Iterable

SPECIALS = ("<unk>", "<s>", "</s>")


def make_sp_like(texts: Iterable[str], form: str, vocab_size: int = 600):
    """A ``tokenizers.Tokenizer`` of the given ``form`` (``legacy`` or ``metaspace``)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token=SPECIALS[0]))
    tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="first", split=True)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIALS), show_progress=False)
    tokenizer.train_from_iterator(list(texts), trainer=trainer)
    if form == "legacy":
        tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
        tokenizer.pre_tokenizer = None
    elif form == "metaspace":
        tokenizer.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="▁", prepend_scheme="first", split=False
        )
    else:
        raise ValueError(f"form must be 'legacy' or 'metaspace', got {form!r}")
    tokenizer.encode_special_tokens = True
    return tokenizer
