"""Evaluation of Hugging Face checkpoints: per-domain loss, lm-eval-harness tasks, inference speed.

``python -m shearing.evaluate`` is the command line; the pieces live here as plain functions:
``loading`` (checked model/tokenizer loading), ``domains`` (per-domain CE and perplexity on MDS eval
shards), ``harness`` (lm-eval-harness on an already-loaded model) and ``speed`` (prefill and decode
tokens/s against a baseline).
"""
