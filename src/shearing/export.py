"""Export a pruning (or continued pre-training) run as a standard Hugging Face checkpoint.

    python -m shearing.export --checkpoint RUN_DIR_OR_FILE --output OUT_DIR [--dtype bfloat16] [--overwrite]

Given a run folder it takes the latest checkpoint (Composer's ``latest-rank0.pt`` link, else the
file with the highest batch count); a checkpoint file works too. For a pruning run the final
deterministic masks (exact target shape) are folded into the weights and cut out (see
``shearing.pruning.surgery``); a run without masks is exported as it is.

The output loads with stock ``transformers.AutoModelForCausalLM.from_pretrained`` with no missing or
unexpected keys: ``config.json`` (``head_dim`` explicit), safetensors weights, the source tokenizer,
and ``shearing_export.json`` / ``shearing_export.md`` (source and target shapes, parameter counts,
kept indices per layer). Writes are atomic: everything goes to a temporary sibling folder that is
renamed into place only when complete, so a crash never leaves a directory that looks finished.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import save_torch_state_dict
from transformers import LlamaConfig

from shearing.checkpoints import checkpoint_batch
from shearing.models.hf_io import load_state_dict_strict
from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.models.shapes import count_params, shape_from_hf_config
from shearing.pruning.l0 import L0Module
from shearing.pruning.surgery import prune_model

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
SUMMARY_NAME = "shearing_export.json"


def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file to export: ``path`` itself, or the latest one in a run folder."""
    path = Path(path)
    if path.is_file():
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path} is neither a checkpoint file nor a run folder")
    latest = path / "latest-rank0.pt"
    if latest.exists():
        return latest.resolve()
    candidates = [p for p in path.glob("*.pt") if p.is_file()]
    if not candidates:
        sharded = [p for p in path.iterdir() if p.is_dir() and checkpoint_batch(p) >= 0]
        hint = " (sharded checkpoints: set fsdp_config.state_dict_type: full)" if sharded else ""
        raise FileNotFoundError(f"no Composer checkpoint (*.pt) in {path}{hint}")
    return max(candidates, key=lambda p: (checkpoint_batch(p), p.stat().st_mtime))


def load_model_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The model state dict of a Composer checkpoint (keys as in ``ComposerShearedLlama``)."""
    file = find_checkpoint(checkpoint)
    raw = torch.load(file, map_location="cpu", weights_only=False)
    try:
        return raw["state"]["model"]
    except (KeyError, TypeError):
        raise ValueError(f"{file} is not a Composer checkpoint (no state.model)") from None


def _metadata(model_state: dict[str, Any]) -> dict[str, Any]:
    meta = model_state.get("_extra_state")
    if not isinstance(meta, dict) or "hf_config" not in meta:
        raise ValueError(
            "the checkpoint carries no shearing run metadata: was it written by shearing's train.py?"
        )
    return meta


def rebuild(model_state: dict[str, Any]) -> tuple[MaskedLlamaForCausalLM, L0Module | None, dict[str, Any]]:
    """The mask-aware model (and L0 module, for a pruning run) of a saved model state, strictly loaded."""
    meta = _metadata(model_state)
    config = LlamaConfig.from_dict(meta["hf_config"])
    model = MaskedLlamaForCausalLM(config, attn_impl="sdpa")
    weights = {k[len("model.") :]: v for k, v in model_state.items() if k.startswith("model.")}
    load_state_dict_strict(model, weights, where="checkpoint")
    l0 = None
    if meta.get("target") is not None:
        source = shape_from_hf_config(config)
        target = source.with_target(meta["target"])
        l0 = L0Module(source, target, meta["families"])
        l0_state = {k[len("l0.") :]: v for k, v in model_state.items() if k.startswith("l0.")}
        l0.load_state_dict(l0_state, strict=True)
    unexpected = [k for k in model_state if not k.startswith(("model.", "l0.")) and k != "_extra_state"]
    if unexpected:
        raise ValueError(f"checkpoint has keys the model does not: {unexpected[:8]}")
    return model, l0, meta


def export_model_state(
    model_state: dict[str, Any], output: str | os.PathLike, dtype: str = "float32", overwrite: bool = True
) -> dict[str, Any]:
    """Export a saved model state as an HF directory at ``output`` (atomically); returns the summary."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
    output = Path(output)
    if output.exists() and not overwrite:
        raise FileExistsError(f"{output} exists; pass --overwrite to replace it")
    model, l0, meta = rebuild(model_state)
    source_shape = shape_from_hf_config(model.config)
    kept: dict[str, Any] = {}
    if l0 is not None:
        l0.eval()
        l0.use_final_masks = True
        result = prune_model(model, l0())
        model, kept = result.model, result.kept
    shape = shape_from_hf_config(model.config)
    state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight")
    config = model.config
    config.architectures = ["LlamaForCausalLM"]
    config.torch_dtype = dtype
    summary = {
        "source": {**source_shape.to_dict(), "num_params": count_params(source_shape)},
        "target": {**shape.to_dict(), "num_params": count_params(shape)},
        "dtype": dtype,
        "pruned": l0 is not None,
        "families": meta.get("families"),
        "kept": kept,
    }

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-", dir=output.parent))
    try:
        config.save_pretrained(tmp)
        save_torch_state_dict(state, tmp, max_shard_size="5GB", safe_serialization=True)
        _copy_tokenizer(meta.get("tokenizer"), tmp)
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
        (tmp / "shearing_export.md").write_text(_markdown(summary))
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return summary


def _copy_tokenizer(tokenizer: str | None, dest: Path) -> None:
    if not tokenizer or not Path(tokenizer).is_dir():
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(tokenizer).save_pretrained(dest)


def _replace_dir(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` to ``output``; an old ``output`` is removed only after the swap."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _markdown(summary: dict[str, Any]) -> str:
    fields = (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "intermediate_size",
    )
    lines = ["# shearing export", "", "| | source | target |", "|---|---|---|"]
    for name in (*fields, "num_params"):
        lines.append(f"| {name} | {summary['source'][name]:,} | {summary['target'][name]:,} |")
    if summary["kept"]:
        layers = [layer["source_layer"] for layer in summary["kept"]["layers"]]
        lines += [
            "",
            f"Kept source layers: {layers}",
            f"Kept hidden channels: {len(summary['kept']['hidden'])}",
        ]
    return "\n".join(lines) + "\n"


def export_checkpoint(
    checkpoint: str | os.PathLike, output: str | os.PathLike, dtype: str = "float32", overwrite: bool = False
) -> dict[str, Any]:
    return export_model_state(load_model_state(checkpoint), output, dtype=dtype, overwrite=overwrite)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shearing.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="a run folder (latest checkpoint) or a checkpoint file"
    )
    parser.add_argument("--output", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    args = parser.parse_args(argv)
    try:
        summary = export_checkpoint(args.checkpoint, args.output, dtype=args.dtype, overwrite=args.overwrite)
    except (ValueError, FileNotFoundError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    target = summary["target"]
    print(
        f"wrote {args.output}: {target['num_params']:,} parameters "
        f"(hidden {target['hidden_size']}, layers {target['num_hidden_layers']}, heads {target['num_attention_heads']}, "
        f"kv heads {target['num_key_value_heads']}, intermediate {target['intermediate_size']})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
