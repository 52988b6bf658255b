"""Sheared LLaMA: targeted structured pruning of a pre-trained LLM into an exact smaller shape."""

__version__ = "0.1.0"
