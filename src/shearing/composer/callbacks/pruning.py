"""Composer glue for stage 1: the pruning clock and the logging of the mask statistics.

``LagrangianPruning`` (an ``Algorithm``) sets the model's ``PruningClock`` before every batch: the step and
the warmup progress, with which the target t_m of every family ramps linearly from 0 over
``lagrangian_warmup``. Everything else happens in the model: the L0 module's clocked forward returns the
masks, the constraint term sum_m mean_rows[lambda1_m (s_m - t_m) + lambda2_m (s_m - t_m)^2] and its stats,
and ``ComposerShearedLlama.loss`` returns ``{"total", "lm_loss", "lagrangian"}``. The masks and weights
descend on the total; the multipliers ascend because their optimizer group has a negative learning rate
(the max player of the min-max problem). After every batch this logs the stats of the batch's last
forward (``state.outputs``): expected sparsity and current target per family, the multipliers and the
expected parameter count.
"""

from __future__ import annotations

import logging

import torch
from composer.core import Algorithm, Event, State, Time, TimeUnit
from composer.loggers import Logger

from shearing.composer.model import composer_model
from shearing.pruning.l0 import L0Module, PruningClock, warmup_progress

log = logging.getLogger(__name__)


def find_l0(model: torch.nn.Module) -> L0Module | None:
    """The model's L0 module (inside any FSDP/DDP wrapper), or None for a model that does not prune."""
    return next((m for m in model.modules() if isinstance(m, L0Module)), None)


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
        return event in (Event.BATCH_START, Event.BATCH_END)

    def progress(self, state: State) -> float:
        if self.warmup_batches is None:
            self.warmup_batches = resolve_batches(self.lagrangian_warmup, state.max_duration)
        return warmup_progress(int(state.timestamp.batch), self.warmup_batches)

    def apply(self, event: Event, state: State, logger: Logger) -> None:
        if event == Event.BATCH_START:
            model = composer_model(state.model)
            if find_l0(model) is None:
                raise ValueError("LagrangianPruning needs a model with an L0 module (a pruning run)")
            model.pruning_clock = PruningClock(step=int(state.timestamp.batch), progress=self.progress(state))
        elif event == Event.BATCH_END:
            stats = getattr(state.outputs, "pruning_stats", None)
            if stats is None:
                raise RuntimeError(
                    "the model's training forward returned no pruning stats: was it run in training mode?"
                )
            logger.log_metrics({name: float(value) for name, value in stats.items()})
