"""Helpers for tests: real text from the Python install, tiny random HF LLaMA checkpoints."""

from __future__ import annotations

import sysconfig
from pathlib import Path

import torch

VOCAB = 512  # the tiny named shapes' vocabulary
SEQ_LEN = 64


def stdlib_texts(limit_bytes: int = 400_000) -> list[str]:
    """Real text present on any machine: Python standard library sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    texts, total = [], 0
    for path in sorted(root.glob("*.py")):
        text = path.read_text(encoding="utf-8", errors="ignore")
        texts.append(text)
        total += len(text)
        if total > limit_bytes:
            break
    return texts


def make_hf_llama(out: Path, tokenizer_dir: Path | None = None, seed: int = 0, **fields) -> Path:
    """Save a random tiny ``LlamaForCausalLM`` (and the tokenizer) as an HF directory."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    defaults = dict(
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=4,
        intermediate_size=176,
        vocab_size=VOCAB,
        head_dim=16,
        max_position_embeddings=256,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(LlamaConfig(**{**defaults, **fields}))
    model.save_pretrained(out)
    if tokenizer_dir is not None:
        AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out
