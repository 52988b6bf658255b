"""Export a pruning (or continued pre-training) run as a standard Hugging Face checkpoint.

    python -m shearing.export --checkpoint RUN_DIR_OR_FILE --output OUT_DIR [--dtype bfloat16] [--overwrite]
        [--force] [--data DATA_DIR/eval | --no-data] [--max-seqs N] [--gguf [NAME]]

Given a run folder it takes the latest checkpoint (Composer's ``latest-rank0.pt`` link, else the
file with the highest batch count); when that file is truncated or corrupt it falls back to the newest
readable one, with a warning naming both (``shearing.checkpoints.checkpoint_is_readable``, as training
does on resume). A checkpoint file given explicitly must be readable. For a pruning run the final
deterministic masks (exact target shape) are folded into the weights and cut out (see
``shearing.pruning.surgery``); a run without masks is exported as it is.

Before anything is written, the gate of ``shearing.pruning.gate``: no NaN/inf in any weight or mask
logit (never overridable), and for a pruning run the convergence gate (expected sparsity vs target per
family, how decided the masks are, and the eval loss under final vs expected masks), which ``--force``
overrides. The eval loss is measured on ``--data``; without it, on the run's own eval split, found through
the run record ``shearing_run.json`` (``run_eval_split``: its ``DATA_DIR/train`` -> ``DATA_DIR/eval``; the
CLI says so before it starts, and a recorded data folder that is gone is an error naming it). ``--no-data``
skips it, and the record says so (``gate.eval_source``). The loss is ``gate.mask_eval_losses``, the fit-end
callback's measurement too: the mean token cross-entropy over the first ``--max-seqs`` sequences of each
domain, under expected and under final masks. After the surgery the shape must equal the run's
target exactly and the parameter count ``count_params``; after the cast to ``--dtype`` every weight must
still be finite (float16 holds |w| <= 65504: a larger weight is refused by name, never written as inf).

The output loads with stock ``transformers.AutoModelForCausalLM.from_pretrained`` with no missing or
unexpected keys: ``config.json`` (``head_dim`` explicit), safetensors weights, the source tokenizer,
``generation_config.json`` (the source's, else built from the config's token ids), a model card
``README.md`` (``shearing.export.model_card``: source, shapes, parameter counts, data, steps and tokens, the
run's last eval, the gate's numbers, the command) and ``shearing_export.json`` / ``shearing_export.md``
(source and target shapes, parameter counts, kept indices per layer, the gate's numbers, the batch the
checkpoint was trained to). ``--gguf`` adds ``model.gguf`` (``shearing.export.gguf``: llama.cpp's
format, F32 or F16, loadable with ``from_pretrained(OUT, gguf_file="model.gguf")``).

transformers versions. The folder loads alike in transformers 4.x and 5.x whichever of them wrote it.
``config.json`` is what ``save_pretrained`` writes, passed through
``shearing.models.hf_io.portable_config_dict``: 5.x writes RoPE only as ``rope_parameters``, which 4.x
ignores (it would run with theta 10000), so ``rope_theta``/``rope_scaling`` are written too (and ``torch_dtype``
beside 5.x's ``dtype``). The tokenizer files are the source's, copied byte for byte (``copy_tokenizer``), not
re-saved: a tokenizer re-saved by 5.x names ``TokenizersBackend``, a class 4.x does not have, and for a
``model_type: qwen2`` folder 5.x loads its own ``Qwen2Tokenizer``, whose save would bake its default pad token
and its own pre-tokenizer into ``tokenizer.json``. The one edit is ``make_portable``'s (``tokenizer_class``
``TokenizersBackend`` -> ``PreTrainedTokenizerFast``, same tokenizer) for a source saved by 5.x; a source
with only slow vocabulary files also gets the ``tokenizer.json`` transformers builds from them (the GGUF
writer reads it).

Output safety. Writes are atomic: everything goes to a temporary sibling folder that is renamed into
place only when complete, so a crash never leaves a directory that looks finished; leftovers of a killed
export (``.OUT.tmp-*``, ``.OUT.old-*`` whose process is gone) are removed by the next export to OUT.
Replacing OUT is only ever allowed for a previous *export* (it holds ``shearing_export.json``) and only
with ``--overwrite``; an output that is, or contains, the run folder or the checkpoint, or that holds
checkpoints/run files anywhere, or any other non-empty folder, is refused before any work
(``check_export_target``) — an export must never delete a run. The written folder and files get the
umask's permissions, like ``save_pretrained``'s, not ``tempfile``'s private ones.

Refusals. A refused input (a flag, the checkpoint, the output folder, the eval data, the gate's verdict on
the checkpoint) is printed as one message naming it and the fix, and the command exits 2
(``shearing.refusals``); an error during the work itself keeps its traceback. ``export_model_state`` is the
one export, for the CLI and the fit-end callback (``shearing.composer.callbacks.export``) alike.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shlex
import shutil
import sys
import tempfile
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from huggingface_hub import save_torch_state_dict

from shearing.checkpoints import (
    LATEST,
    UntrustedCheckpointError,
    checkpoint_batch,
    checkpoint_is_readable,
    load_checkpoint_file,
)
from shearing.data.manifest import MANIFEST_NAME, SPLITS
from shearing.data.tokenizer import load_hf_tokenizer, make_portable
from shearing.evaluation.loading import dtype_kwargs
from shearing.export.gguf import DEFAULT_NAME as GGUF_DEFAULT_NAME
from shearing.export.gguf import check_gguf_name, write_gguf
from shearing.export.model_card import model_card, run_facts, write_generation_config
from shearing.folders import DYNAMIC_LOADING_STEM, METRICS_FILE, RUN_RECORD
from shearing.folders import EXPORT_SUMMARY as SUMMARY_NAME
from shearing.io import apply_umask, pid_alive
from shearing.models.family import family_of
from shearing.models.hf_io import config_from_dict, load_state_dict_strict, portable_config_dict
from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.models.shapes import PRUNABLE_FIELDS, count_params, shape_from_hf_config
from shearing.pruning.gate import (
    ExportRefused,
    GateThresholds,
    check_dtype_range,
    check_finite,
    check_gate,
    describe_gate,
    evaluate_gate,
    family_stats,
    mask_eval_losses,
)
from shearing.pruning.l0 import L0Module
from shearing.pruning.plan import PruningPlan
from shearing.pruning.surgery import prune_model
from shearing.refusals import exit_on_refusal, refusing

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# What marks a run folder or a checkpoint: an export target holding any of these is never replaced.
RUN_FILES = (LATEST, METRICS_FILE, f"{DYNAMIC_LOADING_STEM}.json")
RUN_SUFFIXES = (".pt", ".pt.corrupt")
# A tokenizer's files as transformers 4.x and 5.x save and read them (tokenization_utils_base's names), plus
# the loaded class's own vocabulary files (``vocab_files_names``: vocab.json/merges.txt, tokenizer.model).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
TOKENIZER_DIRS = ("additional_chat_templates",)  # 5.x: one .jinja per named chat template

__all__ = [
    "ExportExists",
    "ExportRefused",
    "check_export_target",
    "copy_tokenizer",
    "export_checkpoint",
    "export_model_state",
    "find_checkpoint",
    "load_checkpoint",
    "load_model_state",
    "mask_losses_on_data",
    "read_eval_batches",
    "rebuild",
    "write_config",
]


class ExportExists(FileExistsError, ValueError):
    """The output holds a previous export and ``--overwrite`` was not given: a refused input (a ``ValueError``,
    see ``shearing.refusals``) that is still the ``FileExistsError`` it always was."""


# --------------------------------------------------------------------------------- checkpoints
def find_checkpoint(path: str | os.PathLike) -> Path:
    """The checkpoint file to export: ``path`` itself, or the latest readable one in a run folder."""
    path = Path(path)
    if path.is_file():
        if not checkpoint_is_readable(path):
            raise ValueError(
                f"--checkpoint {path} is corrupt or truncated (not a complete torch.save archive): "
                "give an earlier checkpoint file, or the run folder to use its newest readable one"
            )
        return path
    if not path.is_dir():
        raise FileNotFoundError(f"--checkpoint {path} is neither a checkpoint file nor a run folder")
    candidates = [p for p in path.glob("*.pt") if p.is_file() and p.name != LATEST]
    latest = path / LATEST
    if latest.exists():
        newest = latest.resolve()
    elif candidates:
        newest = max(candidates, key=lambda p: (checkpoint_batch(p), p.stat().st_mtime))
    else:
        sharded = [p for p in path.iterdir() if p.is_dir() and checkpoint_batch(p) >= 0]
        hint = " (sharded checkpoints: set fsdp_config.state_dict_type: full)" if sharded else ""
        raise FileNotFoundError(f"no Composer checkpoint (*.pt) in {path}{hint}")
    if checkpoint_is_readable(newest):
        return newest
    older = sorted(
        (p for p in candidates if p.resolve() != newest.resolve()),
        key=lambda p: (checkpoint_batch(p), p.stat().st_mtime),
        reverse=True,
    )
    fallback = next((p for p in older if checkpoint_is_readable(p)), None)
    if fallback is None:
        raise ValueError(
            f"the latest checkpoint {newest} is corrupt or truncated and {path} holds no earlier readable "
            "checkpoint: there is nothing to export"
        )
    message = f"checkpoint {newest} is corrupt or truncated; exporting the newest readable one, {fallback}"
    warnings.warn(message, stacklevel=2)
    log.warning(message)
    return fallback


def load_checkpoint(checkpoint: str | os.PathLike) -> tuple[dict[str, Any], int | None, Path]:
    """``(model state dict, batch it was trained to, file)`` of a Composer checkpoint or run folder."""
    model_state, step, _, file = read_checkpoint(checkpoint)
    return model_state, step, file


def read_checkpoint(checkpoint: str | os.PathLike) -> tuple[dict[str, Any], int | None, int | None, Path]:
    """``(model state dict, batch, tokens it was trained to, file)`` of a checkpoint or run folder."""
    file = find_checkpoint(checkpoint)
    try:
        raw = load_checkpoint_file(file)  # weights_only: a .pt from elsewhere runs nothing (or is refused)
    except UntrustedCheckpointError:
        raise
    except Exception as e:  # noqa: BLE001  (a damaged archive can fail in many ways)
        raise ValueError(f"checkpoint {file} cannot be loaded ({type(e).__name__}: {e})") from None
    try:
        model_state = raw["state"]["model"]
    except (KeyError, TypeError):
        raise ValueError(f"{file} is not a Composer checkpoint (no state.model)") from None
    timestamp = raw["state"].get("timestamp") or {}
    timestamp = timestamp.get("Timestamp", timestamp)  # Composer nests the fields under the class name
    step, tokens = timestamp.get("batch"), timestamp.get("token")
    if step is None and checkpoint_batch(file) >= 0:
        step = checkpoint_batch(file)
    return model_state, None if step is None else int(step), None if tokens is None else int(tokens), file


def load_model_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The model state dict of a Composer checkpoint (keys as in ``ComposerShearedLlama``)."""
    return load_checkpoint(checkpoint)[0]


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
    config = config_from_dict(meta["hf_config"])
    model = MaskedLlamaForCausalLM(config, attn_impl="sdpa")
    weights = {k[len("model.") :]: v for k, v in model_state.items() if k.startswith("model.")}
    load_state_dict_strict(model, weights, where="checkpoint")
    l0 = None
    plan = PruningPlan.from_metadata(meta, shape_from_hf_config(config))
    if plan is not None:
        l0 = L0Module.from_plan(plan)
        l0_state = {k[len("l0.") :]: v for k, v in model_state.items() if k.startswith("l0.")}
        l0.load_state_dict(l0_state, strict=True)
    unexpected = [k for k in model_state if not k.startswith(("model.", "l0.")) and k != "_extra_state"]
    if unexpected:
        raise ValueError(f"checkpoint has keys the model does not: {unexpected[:8]}")
    return model, l0, meta


# ------------------------------------------------------------------------------ output safety
def _run_file_in(folder: Path) -> Path | None:
    """The first checkpoint or run file anywhere under ``folder`` (exports hold none), else None."""
    for root, dirs, files in os.walk(folder):
        for name in files:
            if name in RUN_FILES or name.endswith(RUN_SUFFIXES):
                return Path(root) / name
        for name in dirs:
            if checkpoint_batch(Path(name)) >= 0 and name.startswith("ep"):
                return Path(root) / name  # a sharded checkpoint folder
    return None


def check_export_target(
    output: str | os.PathLike,
    run_folder: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    overwrite: bool = True,
) -> None:
    """Refuse (``ValueError``) any export target whose replacement could destroy a run or foreign files.

    Allowed: a new folder, an empty one, or a previous export (``shearing_export.json`` in it, no
    checkpoint or run file anywhere below) when ``overwrite``. Refused: the run folder, the checkpoint's
    folder, or any folder containing them; any other non-empty folder, naming what it holds. A previous
    export without ``overwrite`` is ``ExportExists`` (a ``FileExistsError``). Cheap: the config validation
    calls it.
    """
    out = Path(output).expanduser().absolute().resolve()
    protected = []
    if run_folder is not None:
        protected.append(("run folder", Path(run_folder).expanduser().absolute().resolve()))
    if checkpoint is not None:
        given = Path(checkpoint).expanduser().absolute()
        for path in {given, given.resolve()}:
            protected.append(("run folder" if path.is_dir() else "checkpoint", path))
    for what, path in protected:
        if out == path or out in path.parents:
            relation = "is" if out == path else "contains"
            raise ValueError(
                f"export folder {output} {relation} the {what} {path}: replacing it would delete the run's "
                f"checkpoints and records. Export to a new folder, e.g. {(path if path.is_dir() else path.parent) / 'hf'}"
            )
    if not out.exists():
        return
    if not out.is_dir():
        raise ValueError(f"export folder {output} is an existing file, not a folder: choose another --output")
    entries = sorted(p.name for p in out.iterdir())
    if not entries:
        return
    if SUMMARY_NAME not in entries:
        shown = ", ".join(entries[:10]) + (f", ... ({len(entries)} entries)" if len(entries) > 10 else "")
        raise ValueError(
            f"export folder {output} is not empty and is not a previous shearing export (no {SUMMARY_NAME}); "
            f"it holds: {shown}. Exporting there would delete those files, so it is refused even with "
            "--overwrite: choose a new or empty folder"
        )
    found = _run_file_in(out)
    if found is not None:
        raise ValueError(
            f"export folder {output} holds {found}, a checkpoint or run file: replacing the folder would delete "
            "it. Move it out, or export to a new folder"
        )
    if not overwrite:
        raise ExportExists(f"{output} holds a previous export; pass --overwrite to replace it")


def clean_leftovers(output: Path) -> list[Path]:
    """Remove ``.OUT.tmp-PID-*`` / ``.OUT.old-PID`` siblings of killed exports (their process is gone)."""
    removed = []
    if not output.parent.is_dir():
        return removed
    for kind in ("tmp", "old"):
        prefix = f".{output.name}.{kind}-"
        for path in output.parent.iterdir():
            if not path.name.startswith(prefix):
                continue
            pid = path.name[len(prefix) :].split("-")[0]
            if pid.isdigit() and pid_alive(int(pid)):
                continue  # an export to the same folder is running right now (or it is this one)
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
            removed.append(path)
    if removed:
        log.warning("removed leftovers of an interrupted export: %s", [str(p) for p in removed])
    return removed


# ------------------------------------------------------------------------------ measurement
def read_eval_batches(
    data: str | os.PathLike, max_seqs: int | None, vocab_size: int, batch_size: int = 8
) -> list[torch.Tensor]:
    """The CLI's eval tokens for the loss half of the gate: the first ``max_seqs`` sequences of each domain of
    ``data`` (``DATA_DIR/eval``, domains in the manifest's order), as int64 batches of at most ``batch_size``.

    Read once for both halves of ``mask_losses_on_data`` (the tokens of 64 sequences per domain are a few MB)
    and checked before any forward: every domain has sequences, every id is in the model's vocabulary."""
    from shearing.reference_losses import _batches, _domain_folders, iter_mds_tokens

    if max_seqs is not None and max_seqs < 1:
        raise ValueError(f"--max-seqs must be at least 1 (or left out for all), got {max_seqs}")
    batches = []
    for name, folder in _domain_folders(Path(data)).items():
        domain = [
            torch.from_numpy(b.astype(np.int64))
            for b in _batches(iter_mds_tokens(folder), batch_size, max_seqs)
        ]
        if not domain:
            raise ValueError(f"domain {name!r} has no eval sequences in {folder}")
        top = max(int(b.max()) for b in domain)
        if top >= vocab_size:
            raise ValueError(
                f"domain {name!r} holds token id {top} but the model's vocabulary has {vocab_size}: "
                "the data was tokenized with another tokenizer"
            )
        batches += domain
    return batches


def mask_losses_on_data(
    model: MaskedLlamaForCausalLM, l0: L0Module, batches: list[torch.Tensor]
) -> dict[str, float]:
    """The gate's eval losses (``shearing.pruning.gate.mask_eval_losses``) on ``batches``
    (``read_eval_batches``), on the GPU under bfloat16 autocast when there is one, as ``shearing.evaluate``
    and the reference losses run, else in float32 on the CPU."""
    device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    model.to(device).eval()
    l0.eval()  # l0() gives the deterministic masks that mask_eval_losses selects

    def forward(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        masks = {k: v.to(device) for k, v in l0().items()}
        with autocast:
            return model(batch["input_ids"], masks=masks)

    try:
        return mask_eval_losses(
            forward, l0, lambda: ({"input_ids": ids.to(device)} for ids in batches), device
        )
    finally:
        model.to("cpu")


# ----------------------------------------------------------------------------------- export
def export_model_state(
    model_state: dict[str, Any],
    output: str | os.PathLike,
    dtype: str = "float32",
    overwrite: bool = True,
    *,
    step: int | None = None,
    force: bool = False,
    thresholds: GateThresholds | None = None,
    eval_loss: dict[str, float] | None = None,
    eval_data: str | os.PathLike | None = None,
    eval_source: str | None = None,
    max_seqs: int | None = 64,
    run_folder: str | os.PathLike | None = None,
    checkpoint: str | os.PathLike | None = None,
    gguf: str | None = None,
    tokens: int | None = None,
    command: str | None = None,
    refusals: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
) -> dict[str, Any]:
    """Gate, cut and write a saved model state as an HF directory at ``output`` (atomically); the summary.
    The one export: the CLI (``export_checkpoint``) and the fit-end callback both call it.

    ``eval_loss`` (``{"expected_masks", "final_masks"}``, measured by the caller) or ``eval_data``
    (measured here) feed the loss half of the gate; with neither it is recorded as not measured.
    ``eval_source`` is recorded with it: where the loss was measured, or why not (default: ``eval_data``).
    Raises ``ExportRefused`` when the gate fails and ``force`` is not set, and always for non-finite state
    or for weights that ``dtype`` cannot hold (float16 overflow).
    ``gguf`` (a file name, e.g. ``model.gguf``) also writes the model as GGUF inside the folder
    (``shearing.export.gguf``); ``tokens`` (seen by the checkpoint) and ``command`` go into the model card.
    ``refusals`` is the context the checks of the input run in (the arguments, the output folder, the state,
    the eval data, the gate's verdicts): the CLI passes ``shearing.refusals.refusing``, so that a refused input
    is a message and exit 2; the callback leaves it, and its refusal stays an error of the run.
    """
    thresholds = thresholds or GateThresholds()
    output = Path(output)
    with refusals():
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        if gguf is not None:
            check_gguf_name(gguf)
        check_export_target(output, run_folder=run_folder, checkpoint=checkpoint, overwrite=overwrite)
        check_finite(model_state, step)
        model, l0, meta = rebuild(model_state)
        batches = None
        if l0 is not None and eval_loss is None and eval_data is not None:
            batches = read_eval_batches(eval_data, max_seqs, model.config.vocab_size)
    source_shape = shape_from_hf_config(model.config)
    kept: dict[str, Any] = {}
    gate = None
    if l0 is not None:
        if batches is not None:
            eval_loss = mask_losses_on_data(model, l0, batches)
            eval_source = eval_source or str(eval_data)
        with refusals():
            gate = evaluate_gate(family_stats(l0), eval_loss, thresholds, force, eval_source)
            check_gate(gate, step)
        if gate["forced"]:
            log.warning("export forced past a failed convergence gate: %s", "; ".join(gate["failures"]))
        l0.eval()
        l0.use_final_masks = True
        result = prune_model(model, l0())
        model, kept = result.model, result.kept
    shape = shape_from_hf_config(model.config)
    with refusals():
        _check_target_shape(shape, meta, step)
        full = model.state_dict()
        state = {k: v.to(DTYPES[dtype]).contiguous() for k, v in full.items()}
        check_dtype_range(full, state, dtype)  # after the cast: float16 turns |w| > 65504 into inf
        if model.config.tie_word_embeddings:
            state.pop("lm_head.weight")
        num_params = sum(v.numel() for v in state.values())
        if num_params != count_params(shape):
            raise ExportRefused(
                f"export refused: the cut model has {num_params:,} parameters but its shape has "
                f"{count_params(shape):,}"
            )
    config = model.config
    config.architectures = [family_of(config).architecture]
    (dtype_field,) = dtype_kwargs(DTYPES[dtype])  # torch_dtype (4.x), dtype (5.x: torch_dtype is deprecated)
    setattr(config, dtype_field, dtype)
    summary = {
        "source": {**source_shape.to_dict(), "num_params": count_params(source_shape)},
        "target": {**shape.to_dict(), "num_params": count_params(shape)},
        "dtype": dtype,
        "pruned": l0 is not None,
        "families": meta.get("families"),
        "checkpoint_batch": step,
        "gate": gate,
        "kept": kept,
        "source_path": meta.get("source"),
        "run": run_facts(run_folder, step, tokens),
    }
    _write(output, config, state, meta.get("tokenizer"), summary, gguf=gguf, command=command)
    return summary


def _check_target_shape(shape: Any, meta: dict[str, Any], step: int | None) -> None:
    """A pruning run's export has exactly the run's target shape (the NaN top-k bug kept everything)."""
    target = meta.get("target")
    if target is None:
        return
    wrong = {
        f: (getattr(shape, f), int(target[f])) for f in PRUNABLE_FIELDS if getattr(shape, f) != int(target[f])
    }
    if wrong:
        details = ", ".join(f"{f} {got} (target {want})" for f, (got, want) in wrong.items())
        raise ExportRefused(
            f"export refused: the final masks of the checkpoint (batch {step}) cut a model of the wrong shape: "
            f"{details}. The mask logits are broken (e.g. a diverged run); export an earlier checkpoint."
        )


def _write(
    output: Path,
    config: Any,
    state: dict[str, torch.Tensor],
    tokenizer: str | None,
    summary: dict,
    gguf: str | None = None,
    command: str | None = None,
) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    clean_leftovers(output)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}.tmp-{os.getpid()}-", dir=output.parent))
    try:
        apply_umask(tmp, directory=True)  # mkdtemp makes 0700; an export is meant to be shared
        write_config(config, tmp)
        save_torch_state_dict(state, tmp, max_shard_size="5GB", safe_serialization=True)
        copy_tokenizer(tokenizer, tmp)
        summary["generation_config"] = write_generation_config(summary.get("source_path"), config, tmp)
        if gguf is not None:
            summary["gguf"] = write_gguf(config, state, tmp, tmp / gguf, dtype=summary["dtype"])
        (tmp / "README.md").write_text(model_card(summary, summary["run"], command))
        (tmp / SUMMARY_NAME).write_text(json.dumps(summary, indent=1))
        (tmp / "shearing_export.md").write_text(_markdown(summary))
        for path in tmp.rglob("*"):
            apply_umask(path)
        _replace_dir(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def write_config(config: Any, dest: Path) -> None:
    """``dest/config.json``: what ``config.save_pretrained`` writes, with RoPE settings and dtype in both
    transformers 4.x's and 5.x's form (``portable_config_dict``; see the module note)."""
    config.save_pretrained(dest)
    path = dest / "config.json"
    portable = portable_config_dict(json.loads(path.read_text()))
    path.write_text(json.dumps(portable, indent=2, sort_keys=True) + "\n")


def copy_tokenizer(tokenizer: str | os.PathLike | None, dest: Path) -> list[str]:
    """Copy the tokenizer folder ``tokenizer``'s files into ``dest`` byte for byte (see the module note) and
    return their names; nothing for a tokenizer that is not a local folder (a hub name, or none)."""
    if not tokenizer or not Path(tokenizer).is_dir():
        return []
    source = Path(tokenizer)
    loaded = load_hf_tokenizer(source)  # it must load here; its class names its vocabulary files
    names = {*TOKENIZER_FILES, *(n for n in loaded.vocab_files_names.values() if isinstance(n, str))}
    copied = []
    for name in sorted(names):
        if (source / name).is_file():
            shutil.copyfile(source / name, dest / name)
            copied.append(name)
    for name in TOKENIZER_DIRS:
        if (source / name).is_dir():
            shutil.copytree(source / name, dest / name)
            copied.append(name)
    if "tokenizer.json" not in copied and loaded.is_fast:
        loaded.backend_tokenizer.save(str(dest / "tokenizer.json"))  # built from the slow files
    if "tokenizer_config.json" in copied:
        make_portable(dest)  # TokenizersBackend (a 5.x save) -> PreTrainedTokenizerFast, which 4.x loads
    return copied


def _replace_dir(tmp: Path, output: Path) -> None:
    """Move the finished ``tmp`` to ``output``; an old ``output`` is removed only after the swap."""
    old = None
    if output.exists():
        old = output.with_name(f".{output.name}.old-{os.getpid()}")
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        os.replace(output, old)
    os.replace(tmp, output)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _markdown(summary: dict[str, Any]) -> str:
    lines = ["# shearing export", "", "| | source | target |", "|---|---|---|"]
    for name in (*PRUNABLE_FIELDS, "num_params"):
        lines.append(f"| {name} | {summary['source'][name]:,} | {summary['target'][name]:,} |")
    if summary.get("checkpoint_batch") is not None:
        lines += ["", f"Checkpoint trained to batch {summary['checkpoint_batch']}."]
    gate = summary.get("gate")
    if gate is not None:
        verdict = "passed" if gate["passed"] else "FAILED (exported anyway with --force / export.force)"
        lines += ["", f"## Convergence gate: {verdict}", ""]
        lines += [f"- {line}" for line in describe_gate(gate)]
        if gate["failures"]:
            lines += ["", "Failed checks:", ""] + [f"- {failure}" for failure in gate["failures"]]
    if summary["kept"]:
        layers = [layer["source_layer"] for layer in summary["kept"]["layers"]]
        lines += [
            "",
            f"Kept source layers: {layers}",
            f"Kept hidden channels: {len(summary['kept']['hidden'])}",
        ]
    return "\n".join(lines) + "\n"


def export_checkpoint(
    checkpoint: str | os.PathLike,
    output: str | os.PathLike,
    dtype: str = "float32",
    overwrite: bool = False,
    **gate_options: Any,
) -> dict[str, Any]:
    """Export a checkpoint file or a run folder's latest readable checkpoint (see ``export_model_state``), as
    the CLI does: a refused input (the arguments, the output folder, the checkpoint, the eval data, the gate's
    verdicts) is marked as a refusal (``shearing.refusals.refusing``); an error of the work is not."""
    with refusing():  # the arguments and the output folder before the checkpoint is read, then the checkpoint
        if dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {list(DTYPES)}, got {dtype!r}")
        given = Path(checkpoint)
        run_folder = given if given.is_dir() else given.parent
        check_export_target(output, run_folder=run_folder, checkpoint=checkpoint, overwrite=overwrite)
        if gate_options.get("gguf") is not None:
            check_gguf_name(gate_options["gguf"])
        model_state, step, tokens, file = read_checkpoint(checkpoint)
    return export_model_state(
        model_state,
        output,
        dtype=dtype,
        overwrite=overwrite,
        step=step,
        tokens=tokens,
        run_folder=run_folder,
        checkpoint=file,
        refusals=refusing,
        **gate_options,
    )


def run_eval_split(run_folder: str | os.PathLike) -> tuple[Path | None, str | None]:
    """The run's own eval split for the loss half of the gate, as ``(folder, where it came from)``; or
    ``(None, why not)`` when the run does not record it, ``(None, None)`` for a run that does not prune.

    The run record (``shearing_run.json``) names the training data, ``DATA_DIR/train``; the eval split
    is its sibling ``DATA_DIR/eval``, the layout ``data_prep/tokenize_domains.py`` writes and every recipe's
    ``eval_loader`` reads. A recorded data folder that is gone is a ``FileNotFoundError`` naming it and
    the two ways out (``--data``, ``--no-data``), raised before anything is loaded.
    """
    folder = Path(run_folder)
    record_file = folder / RUN_RECORD
    try:
        record = json.loads(record_file.read_text())
    except (OSError, ValueError):
        record = None
    if not isinstance(record, dict):
        return None, (
            f"{folder} has no readable {RUN_RECORD} naming the run's data; pass --data DATA_DIR/eval to measure it"
        )
    if record.get("target") is None:
        return None, None
    train = record.get("train_data")
    if not train:
        return None, f"{record_file} records no training data folder; pass --data DATA_DIR/eval to measure it"
    train = Path(train)
    if train.name in SPLITS:
        root = train.parent
    elif (train / MANIFEST_NAME).is_file():
        root = train
    else:
        return None, (
            f"the run's training data {train} is not a data_prep/tokenize_domains.py split (DATA_DIR/train), so "
            "its eval split is unknown; pass --data DATA_DIR/eval to measure it"
        )
    split = root / "eval"
    if not split.is_dir():
        raise FileNotFoundError(
            f"the run's eval data {split} does not exist (the run record {record_file} names its training data "
            f"{train}; the prepared data folder was moved or deleted). Pass --data DATA_DIR/eval where it is now "
            "to measure the loss half of the export gate, or --no-data to export without it (recorded as skipped)"
        )
    return split, f"the run's eval split {split} (from {record_file})"


def gate_eval_data(
    checkpoint: str | os.PathLike, data: str | None, no_data: bool
) -> tuple[Path | None, str | None]:
    """``(eval data folder or None, what the gate record says about it)`` for the CLI's options."""
    if no_data:
        return None, "skipped (--no-data)"
    if data is not None:
        if not Path(data).is_dir():
            raise ValueError(f"--data {data} is not a folder: give DATA_DIR/eval of the prepared data")
        return Path(data), f"{data} (--data)"
    given = Path(checkpoint)
    return run_eval_split(given if given.is_dir() else given.parent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m shearing.export", description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--checkpoint", required=True, help="a run folder (latest readable checkpoint) or a checkpoint file"
    )
    parser.add_argument("--output", required=True, help="the Hugging Face directory to write")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument(
        "--overwrite", action="store_true", help="replace a previous export in --output (never anything else)"
    )
    parser.add_argument(
        "--force", action="store_true", help="export even if the convergence gate fails (recorded as forced)"
    )
    data = parser.add_mutually_exclusive_group()
    data.add_argument(
        "--data",
        default=None,
        help="DATA_DIR/eval: measure the eval loss under expected vs final masks there "
        "(default: the run's own eval split, found through its shearing_run.json)",
    )
    data.add_argument(
        "--no-data",
        action="store_true",
        help="skip the loss half of the gate (recorded as skipped in shearing_export.json)",
    )
    parser.add_argument(
        "--max-seqs", type=int, default=64, help="eval sequences per domain for the loss half of the gate"
    )
    parser.add_argument(
        "--gguf",
        nargs="?",
        const=GGUF_DEFAULT_NAME,
        default=None,
        metavar="NAME",
        help=f"also write the model as GGUF (llama.cpp) inside --output, as NAME (default {GGUF_DEFAULT_NAME}); "
        "F32, or F16 for --dtype float16/bfloat16",
    )
    parser.add_argument("--max-sparsity-gap", type=float, default=GateThresholds.max_sparsity_gap)
    parser.add_argument("--max-loss-gap", type=float, default=GateThresholds.max_loss_gap)
    parser.add_argument("--min-kept-probability", type=float, default=GateThresholds.min_kept_probability)
    parser.add_argument(
        "--max-dropped-probability", type=float, default=GateThresholds.max_dropped_probability
    )
    args = parser.parse_args(argv)
    command = shlex.join(["python", "-m", "shearing.export", *(sys.argv[1:] if argv is None else argv)])
    with exit_on_refusal("the export"):
        with refusing():  # before the checkpoint is read: the gate's thresholds, where its loss is measured
            thresholds = GateThresholds(
                args.max_sparsity_gap,
                args.max_loss_gap,
                args.min_kept_probability,
                args.max_dropped_probability,
            )
            eval_data, eval_source = gate_eval_data(args.checkpoint, args.data, args.no_data)
        if eval_data is not None and args.data is None:
            print(
                f"export gate: measuring the eval loss under expected and final masks on {eval_source}, "
                f"at most {args.max_seqs} sequences per domain (--data DIR for other data, --no-data to skip)",
                flush=True,
            )
        summary = export_checkpoint(
            args.checkpoint,
            args.output,
            dtype=args.dtype,
            overwrite=args.overwrite,
            force=args.force,
            thresholds=thresholds,
            eval_data=eval_data,
            eval_source=eval_source,
            max_seqs=args.max_seqs,
            gguf=args.gguf,
            command=command,
        )
    target = summary["target"]
    print(
        f"wrote {args.output}: {target['num_params']:,} parameters "
        f"(hidden {target['hidden_size']}, layers {target['num_hidden_layers']}, heads {target['num_attention_heads']}, "
        f"kv heads {target['num_key_value_heads']}, intermediate {target['intermediate_size']})"
    )
    if summary.get("gguf"):
        print(f"wrote {Path(args.output) / summary['gguf']['file']} ({summary['gguf']['file_type']})")
    gate = summary["gate"]
    if gate is not None:
        status = "passed" if gate["passed"] else "FAILED, exported because of --force"
        print(f"convergence gate {status}:")
        for line in describe_gate(gate):
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
