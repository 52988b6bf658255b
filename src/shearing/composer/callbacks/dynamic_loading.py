"""Dynamic batch loading: after each evaluation, re-weight the domains of the training mixture.

Thin Composer glue over ``shearing.data.weights.update_domain_weights`` and the mixture dataset:

- ``FIT_START``: checks everything before the first batch, with an error naming what to fix: the train
  dataset is a domain mixture (``train_loader.name: domain_mixture``), every domain has a reference
  loss, the evaluator ``eval_label`` exists, reports ``<domain>_LanguageCrossEntropy`` for every domain
  and (if it exposes ``domains``) lists the domains in the train loader's order. A fresh run may replace
  the loader's starting proportions with ``initial_proportions`` (e.g. the final proportions of the
  pruning run, by passing its ``dynamic_loading.json``).
- ``EVAL_END`` of the evaluator labelled ``eval_label`` during ``fit`` (other evaluators, and standalone
  ``trainer.eval()`` calls such as llm-foundry's ``eval_first``, are ignored): reads each domain's eval
  cross-entropy and token count (summed over ranks), computes the new proportions on rank 0,
  broadcasts them, and publishes them to the train dataset, which applies them from batch ``step`` on
  (0-based): the very next batch, since the loader builds each batch in the main process when the
  trainer asks for it (``shearing.data.dataloader``). Each history entry records both ``step`` and that
  ``effective_step``. A domain with no
  eval tokens is an error (``eval_subset_num_batches`` cutting the eval set short is the usual cause:
  use the eval loader's ``max_seqs_per_domain`` instead). ``update: constant`` logs but never changes.
- Every update logs ``metrics/dynamic_loading/proportion/<domain>`` and
  ``metrics/dynamic_loading/loss_gap/<domain>`` (eval loss minus reference), keeps the whole history in
  ``state_dict()`` (so it is checkpointed), and rank 0 rewrites ``dynamic_loading.json`` and
  ``dynamic_loading.csv`` in the run folder: ``output_dir`` if given, else the checkpoint folder
  (``save_folder``) if the run saves checkpoints, else ``./<run_name>/``.

``update: paper`` (default) clamps the loss gap at 0, ``released`` does not (``weights`` explains why).
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from composer.core import Callback, State
from composer.loggers import Logger
from composer.utils import dist

from shearing.data.mixture import validate_proportions
from shearing.data.weights import update_domain_weights
from shearing.folders import DYNAMIC_LOADING_STEM
from shearing.io import write_json_atomic

log = logging.getLogger(__name__)

UPDATES = ("paper", "released", "constant")
METRIC_SUFFIX = "_LanguageCrossEntropy"
FILE_STEM = DYNAMIC_LOADING_STEM


def _load_reference_losses(
    spec: Mapping[str, float] | str | os.PathLike, domains: Sequence[str]
) -> dict[str, float]:
    from shearing.reference_losses import load_reference_losses

    return load_reference_losses(spec, domains)


def _load_initial_proportions(spec: Any, domains: Sequence[str]) -> list[float]:
    """A list, a mapping, or a path to a JSON file: a previous run's ``dynamic_loading.json`` (its final
    proportions) or ``{"proportions": ...}``."""
    if isinstance(spec, str | os.PathLike):
        path = Path(spec)
        if not path.is_file():
            raise ValueError(f"initial_proportions file {path} does not exist")
        with open(path) as f:
            raw = json.load(f)
        if isinstance(raw, Mapping) and raw.get("history"):
            spec = raw["history"][-1]["proportions"]
        elif isinstance(raw, Mapping) and "proportions" in raw:
            spec = raw["proportions"]
        else:
            raise ValueError(f"{path} holds neither a dynamic-loading history nor 'proportions'")
    return validate_proportions(spec, domains)


def check_update_options(update: Any, eta: Any, smoothing: Any) -> None:
    """The update rule's options (the run validation calls this before the model loads, the callback again)."""
    where = "callbacks.dynamic_loading"
    if update not in UPDATES:
        raise ValueError(f"{where}.update must be one of {list(UPDATES)}, got {update!r}")
    for name, value, ok, bound in (
        ("eta", eta, lambda v: v >= 0, "a finite number >= 0 (the step size; 1.0 in the paper)"),
        (
            "smoothing",
            smoothing,
            lambda v: 0 <= v <= 1,
            "in [0, 1] (the uniform floor's weight; 1e-4 in the paper)",
        ),
    ):
        number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
        if not number or not ok(value):
            raise ValueError(f"{where}.{name}={value!r} must be {bound}")


class DynamicLoading(Callback):
    """Re-weights the train mixture after each evaluation (see the module docstring).

    Args:
        reference_losses: ``{domain: loss}`` or a path to ``ref.json`` (``{"reference_losses": {...}}``).
        update: ``paper`` (clamped gap), ``released`` (unclamped) or ``constant`` (log only).
        eta: step size of the exponentiated update.
        smoothing: weight of the uniform floor c (every domain keeps at least c/k).
        initial_proportions: starting proportions of a fresh run (list, mapping, or JSON path); default:
            the train loader's.
        eval_label: label of the evaluator whose per-domain losses drive the update.
        output_dir: where to write ``dynamic_loading.{json,csv}`` (default: see the module docstring).
    """

    def __init__(
        self,
        reference_losses: Mapping[str, float] | str | os.PathLike,
        update: str = "paper",
        eta: float = 1.0,
        smoothing: float = 1e-4,
        initial_proportions: Sequence[float] | Mapping[str, float] | str | os.PathLike | None = None,
        eval_label: str = "eval",
        output_dir: str | os.PathLike | None = None,
    ):
        check_update_options(update, eta, smoothing)
        self.reference_spec = reference_losses
        self.update = update
        self.eta = float(eta)
        self.smoothing = float(smoothing)
        self.initial_proportions = initial_proportions
        self.eval_label = eval_label
        self.output_dir = output_dir
        self.history: list[dict[str, Any]] = []
        self.domains: list[str] = []
        self.reference_losses: dict[str, float] = {}
        self._dataset: Any = None
        self._fitting = False
        self._folder: Path | None = None

    # ----------------------------------------------------------------------------------- events
    def fit_start(self, state: State, logger: Logger) -> None:
        dataset = _train_dataset(state)
        self.domains = list(dataset.domains)
        self.reference_losses = _load_reference_losses(self.reference_spec, self.domains)
        self._check_evaluator(state)
        fresh = not self.history and int(state.timestamp.batch) == 0
        if fresh and self.initial_proportions is not None:
            dataset.reset_proportions(_load_initial_proportions(self.initial_proportions, self.domains))
        if not self.history:
            self.history.append(self._entry(step=0, effective=0, proportions=dataset.proportions))
        self._dataset = dataset
        self._folder = self._output_folder(state)
        self._fitting = True
        self._write()

    def fit_end(self, state: State, logger: Logger) -> None:
        self._fitting = False

    def eval_end(self, state: State, logger: Logger) -> None:
        if not self._fitting or state.dataloader_label != self.eval_label:
            return
        step = int(state.timestamp.batch)
        if len(self.history) > 1 and self.history[-1]["step"] == step:
            return  # this step's evaluation already updated (e.g. an eval at fit end after one at batch end)
        losses, counts = self._eval_losses(state)
        absent = [d for d, n in zip(self.domains, counts) if n == 0]
        if absent:
            raise ValueError(
                f"domains {absent} had no tokens in evaluation {self.eval_label!r} at batch {step}: the eval set "
                "must cover every domain (eval_subset_num_batches may cut it short; use max_seqs_per_domain)"
            )
        current = self._dataset.proportions
        refs = [self.reference_losses[d] for d in self.domains]
        new = list(current)
        if self.update != "constant" and dist.get_global_rank() == 0:
            new = update_domain_weights(
                current, losses, refs, eta=self.eta, smoothing=self.smoothing, clamp=self.update == "paper"
            ).tolist()
        shared = [new]
        dist.broadcast_object_list(shared, src=0)
        new = shared[0]
        effective = None
        if self.update != "constant":
            effective = self._dataset.set_proportions(new, after_step=step)
        entry = self._entry(step=step, effective=effective, proportions=new, losses=losses, counts=counts)
        self.history.append(entry)
        metrics = {}
        for d in self.domains:
            metrics[f"metrics/dynamic_loading/proportion/{d}"] = entry["proportions"][d]
            metrics[f"metrics/dynamic_loading/loss_gap/{d}"] = entry["loss_gaps"][d]
        logger.log_metrics(metrics)
        self._write()

    # ------------------------------------------------------------------------------- internals
    def _check_evaluator(self, state: State) -> None:
        labels = [e.label for e in state.evaluators]
        if self.eval_label not in labels:
            raise ValueError(
                f"dynamic_loading reads evaluator {self.eval_label!r}, but the run has {labels or 'none'}: "
                "add an eval_loader (name: domain_eval) or set eval_label"
            )
        metrics = state.eval_metrics.get(self.eval_label, {})
        missing = [d + METRIC_SUFFIX for d in self.domains if d + METRIC_SUFFIX not in metrics]
        if missing:
            raise ValueError(
                f"evaluator {self.eval_label!r} does not report {missing}: the model must build its per-domain "
                "metrics from the train dataset's domains"
            )
        evaluator = state.evaluators[labels.index(self.eval_label)]
        eval_domains = getattr(getattr(evaluator.dataloader.dataloader, "dataset", None), "domains", None)
        if eval_domains is not None and list(eval_domains) != self.domains:
            raise ValueError(
                f"the eval loader's domains {list(eval_domains)} differ from the train loader's {self.domains}; "
                "list the same domains in the same order (domain_idx indexes that list)"
            )

    def _eval_losses(self, state: State) -> tuple[list[float], list[int]]:
        metrics = state.eval_metrics[self.eval_label]
        names = [d + METRIC_SUFFIX for d in self.domains]
        losses = [float(metrics[n].compute()) for n in names]  # already synced by Composer
        local = torch.tensor([int(getattr(metrics[n], "total", 1)) for n in names], dtype=torch.int64)
        counts = state.device.tensor_to_device(local)
        dist.all_reduce(counts, reduce_operation="SUM")
        return losses, [int(c) for c in counts.cpu().tolist()]

    def _entry(self, step, effective, proportions, losses=None, counts=None) -> dict[str, Any]:
        entry: dict[str, Any] = {
            "step": step,
            "effective_step": effective,
            "proportions": dict(zip(self.domains, map(float, proportions))),
        }
        if losses is not None:
            entry["losses"] = dict(zip(self.domains, losses))
            entry["loss_gaps"] = {d: loss - self.reference_losses[d] for d, loss in zip(self.domains, losses)}
            entry["eval_tokens"] = dict(zip(self.domains, counts))
        return entry

    def _output_folder(self, state: State) -> Path:
        if self.output_dir is not None:
            return Path(self.output_dir)
        from composer.callbacks import CheckpointSaver
        from composer.utils import format_name_with_dist

        for callback in state.callbacks:
            if isinstance(callback, CheckpointSaver):
                return Path(format_name_with_dist(str(callback.folder), state.run_name))
        return Path(state.run_name)

    def _write(self) -> None:
        if dist.get_global_rank() != 0 or self._folder is None:
            return
        self._folder.mkdir(parents=True, exist_ok=True)
        record = {
            "domains": self.domains,
            "update": self.update,
            "eta": self.eta,
            "smoothing": self.smoothing,
            "reference_losses": self.reference_losses,
            "history": self.history,
        }
        write_json_atomic(self._folder / f"{FILE_STEM}.json", record)
        columns = ["step", "effective_step"] + [
            f"{kind}/{d}" for kind in ("proportion", "loss", "loss_gap") for d in self.domains
        ]
        with open(self._folder / f"{FILE_STEM}.csv", "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(columns)
            for e in self.history:
                row = [e["step"], "" if e["effective_step"] is None else e["effective_step"]]
                row += [e["proportions"][d] for d in self.domains]
                row += [e.get("losses", {}).get(d, "") for d in self.domains]
                row += [e.get("loss_gaps", {}).get(d, "") for d in self.domains]
                writer.writerow(row)

    # ------------------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, Any]:
        return {"history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = list(state.get("history", []))


def _train_dataset(state: State) -> Any:
    loader = state.train_dataloader
    dataset = getattr(loader, "dataset", None)
    if dataset is None or not (hasattr(dataset, "domains") and hasattr(dataset, "set_proportions")):
        raise ValueError(
            "dynamic_loading needs the domain-mixture train loader (train_loader.name: domain_mixture); "
            f"the train dataset is {type(dataset).__name__}"
        )
    return dataset
