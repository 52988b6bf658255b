"""Composer glue for stage 1: the Lagrangian constraint, its logging, and the export at the end.

``LagrangianPruning`` (an ``Algorithm``) adds, after every micro-batch loss, the constraint term
sum_m mean_rows[lambda1_m (s_m - t_m) + lambda2_m (s_m - t_m)^2] (``L0Module.lagrangian``), where the
target t_m ramps linearly from 0 over ``lagrangian_warmup``. The term is computed inside the model's
forward (``L0Module.forward``), where FSDP has the mask parameters materialised; the algorithm sets
the warmup progress before each batch and moves the term into the loss. The masks and weights descend on the
total; the multipliers ascend because their optimizer group has a negative learning rate (the max
player of the min-max problem). The loss becomes ``{"total", "lm_loss", "lagrangian"}`` so the
plain LM loss is logged on its own. Every batch it logs the expected sparsity and current target per
family, the multipliers and the expected parameter count.
"""

from __future__ import annotations

import logging

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from shearing.pruning.l0 import L0Module, warmup_progress

log = logging.getLogger(__name__)


def find_l0(model: torch.nn.Module) -> L0Module:
    for module in model.modules():
        if isinstance(module, L0Module):
            return module
    raise ValueError("LagrangianPruning needs a model with an L0 module (a pruning run)")


def resolve_batches(duration: str | Time, max_duration: Time | None) -> int:
    """A duration in batches: '640ba', or a fraction of a max_duration given in batches ('0.2dur')."""
    time = Time.from_timestring(duration) if isinstance(duration, str) else duration
    if time.unit == TimeUnit.BATCH:
        return int(time.value)
    if time.unit == TimeUnit.DURATION:
        if max_duration is None or max_duration.unit != TimeUnit.BATCH:
            raise ValueError(f"a duration of {duration} needs max_duration in batches (e.g. '3200ba')")
        return int(round(time.value * max_duration.value))
    raise ValueError(
        f"pruning.lagrangian_warmup must be in batches ('640ba') or a fraction ('0.2dur'), got {duration}"
    )


class LagrangianPruning(Algorithm):
    def __init__(self, lagrangian_warmup: str | int = "0.2dur"):
        self.lagrangian_warmup = (
            f"{lagrangian_warmup}ba" if isinstance(lagrangian_warmup, int) else lagrangian_warmup
        )
        self.warmup_batches: int | None = None

    def match(self, event: Event, state: State) -> bool:
        return event in (Event.BATCH_START, Event.AFTER_LOSS, Event.BATCH_END)

    def progress(self, state: State) -> float:
        if self.warmup_batches is None:
            self.warmup_batches = resolve_batches(self.lagrangian_warmup, state.max_duration)
        return warmup_progress(int(state.timestamp.batch), self.warmup_batches)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        l0 = find_l0(state.model)
        if event == Event.BATCH_START:
            l0.progress = self.progress(state)
            l0.step = int(state.timestamp.batch)
            l0.micro_batch = 0
        elif event == Event.AFTER_LOSS:
            term = l0.pending_lagrangian
            if term is None:
                raise RuntimeError(
                    "the L0 module computed no Lagrangian term: was the model run in training mode?"
                )
            l0.pending_lagrangian = None
            lm_loss = state.loss["total"] if isinstance(state.loss, dict) else state.loss
            state.loss = {"total": lm_loss + term, "lm_loss": lm_loss.detach(), "lagrangian": term.detach()}
        elif event == Event.BATCH_END:
            logger.log_metrics({name: float(value) for name, value in l0.last_stats.items()})
