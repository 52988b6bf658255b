"""Loading the model under evaluation: an HF checkpoint folder, checked before transformers sees it.

A folder without ``config.json`` or without weights is a ``ValueError`` that says what to pass instead,
rather than transformers' attempt to resolve the path as a hub id. The default dtype is bfloat16 on CUDA
(what the models are trained and served in) and float32 on CPU. The dtype is passed as ``dtype`` to
transformers 5.x and as ``torch_dtype`` to 4.x (``dtype_kwargs``: 4.x does not know ``dtype``, 5.x deprecates
``torch_dtype``); the tokenizer loads with ``shearing.data.tokenizer.load_hf_tokenizer`` (a folder saved by
5.x loads under 4.x too).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
WEIGHT_PATTERNS = ("*.safetensors", "pytorch_model*.bin")


def default_device() -> torch.device:
    return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    """``auto`` -> bfloat16 on CUDA, float32 elsewhere; else one of ``DTYPES``."""
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name not in DTYPES:
        raise ValueError(f"--dtype must be auto or one of {', '.join(DTYPES)}, got {name!r}")
    return DTYPES[name]


def dtype_kwargs(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype keyword for the installed transformers: ``dtype`` (5.x), ``torch_dtype`` (4.x)."""
    import transformers

    major = int(transformers.__version__.split(".")[0])
    return {"dtype" if major >= 5 else "torch_dtype": dtype}


def check_hf_dir(path: str | os.PathLike, flag: str = "--model") -> Path:
    """``path`` as a Path if it is a local HF checkpoint folder (config.json + weights), else a ValueError."""
    root = Path(path)
    hint = "pass a folder written by python -m shearing.export or save_pretrained"
    if not root.is_dir():
        raise ValueError(f"{flag} {root} is not a folder: {hint}")
    config = root / "config.json"
    if not config.is_file():
        raise ValueError(
            f"{flag} {root} has no config.json, so it is not a Hugging Face model folder: {hint}"
        )
    try:
        json.loads(config.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{flag} {config} is not valid JSON ({err})") from err
    if not any(any(root.glob(pattern)) for pattern in WEIGHT_PATTERNS):
        raise ValueError(
            f"{flag} {root} has a config.json but no *.safetensors or pytorch_model*.bin weights"
        )
    return root


def load_model(
    path: str | os.PathLike, device: torch.device, dtype: torch.dtype, flag: str = "--model"
) -> Any:
    """An ``AutoModelForCausalLM`` from a checked local folder, on ``device``, in eval mode."""
    from transformers import AutoModelForCausalLM

    from shearing.models.hf_io import check_model_finite

    root = check_hf_dir(path, flag)
    model = AutoModelForCausalLM.from_pretrained(root, local_files_only=True, **dtype_kwargs(dtype))
    check_model_finite(model, root)  # a damaged or overflowed checkpoint, named, before any evaluation
    return model.to(device).eval()


def load_tokenizer(path: str | os.PathLike, flag: str = "--tokenizer") -> Any:
    """The tokenizer saved in ``path`` (an exported model folder carries its source tokenizer)."""
    from shearing.data.tokenizer import load_hf_tokenizer

    try:
        return load_hf_tokenizer(path, local_files_only=True)
    except (OSError, ValueError) as err:
        raise ValueError(
            f"no tokenizer could be loaded from {path} ({err}): save one next to the model or pass {flag}"
        ) from err


def count_parameters(model: Any) -> int:
    """Unique parameters (a tied embedding counts once)."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())
