"""Stop a diverged run before it writes a checkpoint it cannot come back from.

``NonFiniteGuard`` is added to every run by ``train.build_callbacks`` (first in the list, so it runs
before the export and before Composer's checkpoint saver, which the trainer appends last).

- **Loss, every step** (``BATCH_END``): Composer has already all-reduced the step's losses and moved
  them to the host (``state.total_loss_dict``, python floats, the same on every rank), so the check costs
  no extra device sync and every rank reaches the same verdict at the same step. The run stops when any
  loss is NaN/inf, or when the LM loss exceeds ``max_loss`` (default ``10 * ln(vocab_size)``: ten times
  the loss of a uniform guess, which no healthy run reaches; lr 1e3 on the tiny run gives 2e7).
- **Weights and mask logits, at each checkpoint and at fit end**: one ``torch.isfinite`` pass over the
  local parameters (FSDP shards included), the count of bad values all-reduced (SUM) so all ranks agree,
  one device->host sync. Which steps write a checkpoint is decided by a private copy of Composer's own
  interval scheduler over ``save_interval``, so the check runs exactly on the steps the saver saves.

Stopping raises ``TrainingDiverged`` (a ``RuntimeError``: exit code 1) from ``BATCH_END``, which comes
before ``BATCH_CHECKPOINT``: the bad state is never saved and ``latest-rank0.pt`` still points at the
last good checkpoint, which the message names together with the likely causes.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, Event, State
from composer.loggers import Logger
from composer.utils import dist
from composer.utils.misc import create_interval_scheduler

from shearing.checkpoints import LATEST

log = logging.getLogger(__name__)


class TrainingDiverged(RuntimeError):
    """The loss or the model state became non-finite (or absurdly large)."""


def nonfinite_parameters(model: torch.nn.Module) -> tuple[torch.Tensor, list[str]]:
    """(count of NaN/inf values in this rank's parameters as a 1-element tensor, names of the bad ones)."""
    counts, names = [], []
    for name, param in model.named_parameters():
        local = param.to_local() if hasattr(param, "to_local") else param  # DTensor shard (FSDP2)
        counts.append((~torch.isfinite(local.detach())).sum())
        names.append(name)
    if not counts:
        return torch.zeros(1), []
    stacked = torch.stack(counts)
    bad = [n for n, c in zip(names, stacked.tolist()) if c]
    return stacked.sum().reshape(1), bad


class NonFiniteGuard(Callback):
    def __init__(
        self,
        save_folder: str | os.PathLike | None = None,
        save_interval: Any = None,
        max_loss: float | None = None,
        max_loss_factor: float = 10.0,
    ):
        self.save_folder = Path(save_folder) if save_folder is not None else None
        self.save_interval = save_interval
        self.max_loss = max_loss
        self.max_loss_factor = max_loss_factor
        self._checkpoint_due = None
        self._last_losses: dict | None = None

    def fit_start(self, state: State, logger: Logger) -> None:
        if self.save_folder is not None and self.save_interval is not None:
            self._checkpoint_due = create_interval_scheduler(self.save_interval)
        if self.max_loss is None:
            config = getattr(getattr(state.model, "model", None), "config", None)
            vocab = getattr(config, "vocab_size", None)
            if vocab:
                self.max_loss = self.max_loss_factor * math.log(vocab)

    def batch_end(self, state: State, logger: Logger) -> None:
        step = int(state.timestamp.batch)
        losses = state.total_loss_dict
        if losses and losses is not self._last_losses:  # unchanged when fp16 grad scaling skipped the step
            self._last_losses = losses
            bad = {k: v for k, v in losses.items() if not math.isfinite(v)}
            if bad:
                self._stop(state, step, f"non-finite loss {bad}")
            lm = losses.get("loss/train/lm_loss", losses.get("loss/train/total"))
            if self.max_loss is not None and lm is not None and lm > self.max_loss:
                self._stop(
                    state,
                    step,
                    f"LM loss {lm:.4g} above {self.max_loss:.4g} (max_loss_factor x ln(vocab): worse than a "
                    "uniform guess by that factor)",
                )
        if self._checkpoint_due is not None and self._checkpoint_due(state, Event.BATCH_CHECKPOINT):
            self.check_weights(state, step, "before writing a checkpoint")

    def epoch_end(self, state: State, logger: Logger) -> None:
        if self._checkpoint_due is not None and self._checkpoint_due(state, Event.EPOCH_CHECKPOINT):
            self.check_weights(state, int(state.timestamp.batch), "before writing a checkpoint")

    def fit_end(self, state: State, logger: Logger) -> None:
        self.check_weights(state, int(state.timestamp.batch), "at the end of training")

    def check_weights(self, state: State, step: int, when: str) -> None:
        count, names = nonfinite_parameters(state.model)
        if dist.get_world_size() > 1:
            dist.all_reduce(count, reduce_operation="SUM")
        total = int(count.item())
        if total:
            where = (
                f" (on this rank: {', '.join(names[:4])}{' ...' if len(names) > 4 else ''})" if names else ""
            )
            self._stop(state, step, f"{total} non-finite weight / mask-logit values {when}{where}")

    def last_good_checkpoint(self) -> str:
        if self.save_folder is None:
            return "There is no save_folder, so nothing to resume: restart from the beginning"
        latest = self.save_folder / LATEST
        if latest.exists():
            return (
                f"The last good checkpoint is {latest} -> {latest.resolve().name} (this step was not saved; the "
                "same command resumes from it once the cause is fixed)"
            )
        return f"No checkpoint was written to {self.save_folder} yet: the run restarts from the beginning"

    def _stop(self, state: State, step: int, what: str) -> None:
        lrs = [float(g["lr"]) for opt in state.optimizers for g in opt.param_groups]
        precision = str(state.precision.value if hasattr(state.precision, "value") else state.precision)
        causes = [
            f"learning rate too high (now, per optimizer group: {', '.join(f'{lr:.3g}' for lr in lrs)})"
        ]
        causes.append("bad data (a corrupt shard, or tokens outside the vocabulary)")
        if "fp16" in precision:
            causes.insert(0, f"fp16 overflow (precision {precision}: use amp_bf16 or fp32)")
        else:
            causes.append(f"numeric overflow (precision {precision})")
        message = (
            f"training stopped at step {step}: {what}. {self.last_good_checkpoint()}. "
            f"Likely causes: {'; '.join(causes)}."
        )
        log.error(message)
        raise TrainingDiverged(message)
