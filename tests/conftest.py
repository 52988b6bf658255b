"""Shared fixtures: a tiny trained tokenizer, a tiny random HF LLaMA checkpoint, a tiny MDS corpus.

Everything is built locally from text that ships with Python (its standard library sources), so the
suite needs no downloads. Expensive fixtures are session-scoped.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from tiny import SEQ_LEN, VOCAB, make_hf_llama, stdlib_texts


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=VOCAB,
        special_tokens=["<unk>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_texts(200_000), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    out = tmp_path_factory.mktemp("tokenizer")
    fast.save_pretrained(out)
    return out


@pytest.fixture(scope="session")
def tiny_gqa_dir(tmp_path_factory, tokenizer_dir) -> Path:
    return make_hf_llama(tmp_path_factory.mktemp("tiny_gqa"), tokenizer_dir)


@pytest.fixture(scope="session")
def tiny_mds(tmp_path_factory, tokenizer_dir) -> Path:
    """``train`` and ``eval`` MDS splits of packed ``SEQ_LEN``-token stdlib text (column ``tokens``)."""
    from streaming import MDSWriter
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    ids: list[int] = []
    for text in stdlib_texts(300_000):
        ids += [tok.bos_token_id, *tok(text)["input_ids"], tok.eos_token_id]
    seqs = np.asarray(ids[: len(ids) // SEQ_LEN * SEQ_LEN], dtype=np.uint16).reshape(-1, SEQ_LEN)
    root = tmp_path_factory.mktemp("mds")
    n_eval = 32
    for split, rows in (("eval", seqs[:n_eval]), ("train", seqs[n_eval:])):
        with MDSWriter(out=str(root / split), columns={"tokens": "ndarray:uint16"}) as writer:
            for row in rows:
                writer.write({"tokens": row})
    return root
