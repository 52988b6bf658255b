"""Export the model as a Hugging Face directory when training ends (``export.on_fit_end: true``).

For a pruning run this is the exact target shape (final masks folded in and cut out); for continued
pre-training or pre-training, the model as it is. Same code path as ``python -m shearing.export``: the one
export function (``shearing.export.export_model_state``) with its gate (``shearing.pruning.gate``), and the
gate's one measurement of the eval losses (``mask_eval_losses``). On a pruning run the callback first
measures the loss under expected and under final masks on the run's own eval dataloader
(``state.evaluators[0]``, at most ``eval_batches`` batches), then rank 0 gates and writes. A refusal raises
``ExportRefused`` on every rank: the run exits non-zero and its checkpoints stay where they are. Since the
writer is the CLI's, ``export.dtype: float16`` with a weight beyond float16's range is refused by name here
too, before anything is written.

Distributed runs: the measurement runs the (wrapped) model's forward on every rank — under FSDP/FSDP2
the forward is a collective that gathers the sharded weights and mask logits — over each rank's own
shard of the eval set, the same number of batches everywhere (the minimum over ranks), and all-reduces
the summed loss and token count, so every rank holds the same two numbers. The full state dict is then
gathered (also a collective) and only rank 0 exports; its outcome is broadcast so that a refusal on
rank 0 stops every rank instead of leaving the others waiting.

``fit_end`` needs only the trainer's ``state`` (model, evaluators, device, timestamp), so it can also be
called after ``fit`` to finish the export of an already-finished run.
"""

from __future__ import annotations

import itertools
import logging
import shlex
import sys
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from shearing.composer.callbacks.pruning import find_l0
from shearing.composer.model import composer_model
from shearing.pruning.gate import ExportRefused, GateThresholds, mask_eval_losses
from shearing.pruning.l0 import L0Module

log = logging.getLogger(__name__)


def mask_losses_on_loader(state: State, l0: L0Module, max_batches: int) -> dict[str, float] | None:
    """The gate's eval losses (``gate.mask_eval_losses``) on the first ``max_batches`` batches of the run's
    eval loader, under the run's precision; a collective (every rank, the same number of batches)."""
    from composer.core.precision import get_precision_context

    if not state.evaluators or max_batches <= 0:
        return None
    data_spec = state.evaluators[0].dataloader
    loader = data_spec.dataloader
    try:
        n = min(len(loader), max_batches)
    except TypeError:
        n = max_batches
    device = state.device._device if hasattr(state.device, "_device") else torch.device("cpu")
    count = torch.tensor([n], dtype=torch.int64, device=device)
    dist.all_reduce(count, reduce_operation="MIN")  # every rank must run the same number of forwards
    n = int(count.item())

    def batches():
        for batch in itertools.islice(loader, n):
            yield state.device.batch_to_device(data_spec.batch_transforms(batch))

    def forward(batch):
        with get_precision_context(state.precision):
            return state.model(batch)  # the wrapped forward: FSDP gathers what it needs

    model = composer_model(state.model)
    was_training = model.training
    try:
        model.eval()
        return mask_eval_losses(forward, l0, batches, device, reduce=dist.all_reduce)
    finally:
        model.train(was_training)


class ExportOnFitEnd(Callback):
    def __init__(
        self,
        folder: str | Path,
        dtype: str = "float32",
        force: bool = False,
        thresholds: GateThresholds | None = None,
        eval_batches: int = 16,
        run_folder: str | Path | None = None,
        gguf: str | None = None,
    ):
        self.folder = Path(folder)
        self.gguf = gguf
        self.dtype = dtype
        self.force = force
        self.thresholds = thresholds or GateThresholds()
        self.eval_batches = eval_batches
        self.run_folder = run_folder

    def fit_end(self, state: State, logger: Logger) -> None:
        from shearing.export.hf import export_model_state

        l0 = find_l0(composer_model(state.model))
        eval_loss = mask_losses_on_loader(state, l0, self.eval_batches) if l0 is not None else None
        if eval_loss is not None:
            eval_source = f"the run's eval loader (at most {self.eval_batches} batches)"
        elif self.eval_batches <= 0:
            eval_source = "skipped (export.gate_eval_batches=0)"
        else:
            eval_source = "the run has no eval loader (eval_loader)"
        model_state = state.get_model_state_dict()  # collective under FSDP: every rank calls it
        outcome: list[Any] = [None]
        summary = None
        if dist.get_global_rank() == 0:
            try:
                summary = export_model_state(
                    model_state,
                    self.folder,
                    dtype=self.dtype,
                    step=int(state.timestamp.batch),
                    force=self.force,
                    thresholds=self.thresholds,
                    eval_loss=eval_loss,
                    eval_source=eval_source,
                    run_folder=self.run_folder,
                    gguf=self.gguf,
                    tokens=int(state.timestamp.token),
                    command=shlex.join(["composer", *sys.argv]),
                )
            except Exception as e:
                outcome = [(isinstance(e, ExportRefused), str(e))]
                if dist.get_world_size() == 1:
                    raise
                dist.broadcast_object_list(outcome, src=0)
                raise
        if dist.get_world_size() > 1:
            dist.broadcast_object_list(outcome, src=0)
            if outcome[0] is not None:
                refused, message = outcome[0]
                raise (
                    ExportRefused(message)
                    if refused
                    else RuntimeError(f"the export on rank 0 failed: {message}")
                )
        if summary is not None:
            metrics = {"export/num_params": float(summary["target"]["num_params"])}
            gate = summary["gate"]
            if gate is not None:
                metrics["export/gate_passed"] = float(gate["passed"])
                if gate["eval_loss"] is not None:
                    metrics["export/eval_loss_expected_masks"] = gate["eval_loss"]["expected_masks"]
                    metrics["export/eval_loss_final_masks"] = gate["eval_loss"]["final_masks"]
            logger.log_metrics(metrics)
            log.info("exported the model to %s", self.folder)


# ------------------------------------------------------------------------------ from the run config
def export_folder(cfg: Any) -> Path | None:
    """``export.folder``, else ``<save_folder>/hf``; None when the run does not export at fit end."""
    if not cfg.export.on_fit_end:
        return None
    folder = cfg.export.folder or (Path(cfg.save_folder) / "hf" if cfg.save_folder else None)
    if folder is None:
        raise ValueError("export.on_fit_end needs export.folder or save_folder")
    return Path(folder)


def check_export_config(cfg: Any) -> Path | None:
    """Cheap, before training: the export folder can never replace the run, the gate settings are valid."""
    from shearing.export.hf import check_export_target

    folder = export_folder(cfg)
    if folder is None:
        return None
    check_export_target(folder, run_folder=cfg.save_folder)
    gate_thresholds(cfg)
    if cfg.export.gguf is not None:
        from shearing.export.gguf import check_gguf_name

        try:
            check_gguf_name(cfg.export.gguf)
        except ValueError as e:
            raise ValueError(f"export.gguf: {e}".replace("--gguf ", "")) from None
    batches = cfg.export.gate_eval_batches
    if isinstance(batches, bool) or not isinstance(batches, int) or batches < 0:
        raise ValueError(
            f"export.gate_eval_batches must be an integer >= 0 (0 skips the loss half of the gate), got {batches!r}"
        )
    return folder


def gate_thresholds(cfg: Any) -> GateThresholds:
    """The gate's thresholds from the ``export:`` section (checked: a bad value names its key)."""
    e = cfg.export
    return GateThresholds(
        e.max_sparsity_gap, e.max_loss_gap, e.min_kept_probability, e.max_dropped_probability
    )


def build_export_callback(cfg: Any) -> ExportOnFitEnd | None:
    folder = check_export_config(cfg)
    if folder is None:
        return None
    return ExportOnFitEnd(
        folder,
        dtype=cfg.export.dtype,
        force=cfg.export.force,
        thresholds=gate_thresholds(cfg),
        eval_batches=cfg.export.gate_eval_batches,
        run_folder=cfg.save_folder,
        gguf=cfg.export.gguf,
    )
