"""The export: a pruning checkpoint (or a masked model in memory) to a stock Hugging Face folder and a GGUF.

- ``hf``: the one export path (``export_model_state``, used by ``python -m shearing.export`` and the fit-end
  callback), the convergence gate's measurement, atomic writes; ``python -m shearing.export`` runs its ``main``.
- ``gguf`` and ``gguf_vocab``: the GGUF file llama.cpp reads (weights, RoPE, the tokenizer's vocabulary).
- ``model_card``: the export's ``README.md`` and ``generation_config.json``.
"""
