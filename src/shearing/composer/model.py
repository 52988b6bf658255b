"""The Composer model: a mask-aware LLaMA, an optional L0 module, LM loss and metrics.

``ComposerShearedLlama`` wraps ``MaskedLlamaForCausalLM`` (as ``.model``, so Composer's FSDP and
activation-checkpointing hooks find its per-layer functions) and, during pruning, an ``L0Module``
(as ``.l0``). Without ``l0`` it is a plain LLaMA for continued pre-training. Under FSDP2 mixed precision
the L0 unit gathers and reduces in fp32 while the LLaMA computes in bf16 (``shearing.composer.parallelism.keep_fp32``,
applied at the first forward, before FSDP2's lazy initialisation of the unit).

Batches carry ``input_ids`` and ``labels`` (HF convention: labels are the inputs, the model shifts;
-100 is ignored), and optionally ``domain_idx`` for per-domain metrics.

The loss is assembled from parts. A training ``forward`` returns a ``ModelOutput``: the logits, plus every
term that needs parameters — the Lagrangian constraint of the L0 module at the current ``PruningClock``
(set once per batch by the ``LagrangianPruning`` algorithm) — computed inside forward, where FSDP has the
parameters materialised. ``loss()`` only combines: the token-level cross-entropy alone for continued
pre-training, ``{"total", "lm_loss", "lagrangian"}`` when pruning, so the plain LM loss is logged on its own.
With a frozen ``teacher`` (``shearing.distill.Teacher``, a child module so FSDP shards it with the student)
the total mixes in its KD term, ``alpha · kd + (1 - alpha) · lm_loss``, and ``kd_loss`` is logged too.

Run metadata (source config, target shape, mask families, tokenizer) is kept in the module's
``extra_state``, so a Composer checkpoint alone is enough to export the model later.
"""

from __future__ import annotations

import contextlib
import weakref
from typing import Any, NamedTuple

import torch
from composer.models import ComposerModel
from torchmetrics import Metric

from shearing.composer.parallelism import keep_fp32
from shearing.distill import Teacher, mix_losses
from shearing.metrics import (
    IGNORE_INDEX,
    DomainLanguageCrossEntropy,
    LanguageCrossEntropy,
    LanguagePerplexity,
    TokenCrossEntropy,
    TokenLosses,
    shift_labels,
    token_losses,
)
from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.pruning.l0 import L0Module, L0Output, PruningClock

METADATA_VERSION = 1


class ModelOutput(NamedTuple):
    """A forward's result: the logits and the loss terms computed with them (a tuple: FSDP/DDP see its tensors)."""

    logits: torch.Tensor
    lagrangian: torch.Tensor | None = None  # the L0 constraint term (training forwards of a pruning run)
    pruning_stats: dict[str, torch.Tensor] | None = None  # detached mask statistics to log


def composer_model(model: torch.nn.Module) -> torch.nn.Module:
    """The ``ComposerShearedLlama`` inside a DDP wrapper (FSDP wraps in place)."""
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def logits_of(outputs: Any) -> torch.Tensor:
    return outputs.logits if isinstance(outputs, ModelOutput) else outputs


class ComposerShearedLlama(ComposerModel):
    def __init__(
        self,
        model: MaskedLlamaForCausalLM,
        l0: L0Module | None = None,
        metadata: dict[str, Any] | None = None,
        domains: list[str] | None = None,
        teacher: Teacher | None = None,
    ):
        super().__init__()
        self.model = model
        self.l0 = l0
        self.teacher = teacher  # frozen, out of the state dict (shearing.distill)
        self.metadata = dict(metadata or {})
        self.pruning_clock = PruningClock()  # set before each batch by LagrangianPruning
        self.train_metrics: dict[str, Metric] = {}
        self.eval_metrics: dict[str, Metric] = {}
        # the last batch's cross-entropy pass (see token_losses)
        self._token_losses: tuple[weakref.ref, TokenLosses] | None = None
        self.set_domains(domains or [])

    # ------------------------------------------------------------------------- Composer API
    def forward(self, batch: dict[str, torch.Tensor]) -> ModelOutput | torch.Tensor:
        """Logits in eval mode; a ``ModelOutput`` in training mode."""
        if self.l0 is None:
            logits = self.model(batch["input_ids"])
            return ModelOutput(logits) if self.training else logits
        keep_fp32(
            self.l0
        )  # under FSDP2 mixed precision the masks stay fp32 (see shearing.composer.parallelism)
        if not self.training:
            return self.model(batch["input_ids"], masks=self.l0())
        pruning: L0Output = self.l0(self.pruning_clock)
        logits = self.model(batch["input_ids"], masks=pruning.masks)
        return ModelOutput(logits, pruning.lagrangian, pruning.stats)

    def loss(self, outputs: ModelOutput | torch.Tensor, batch: dict[str, torch.Tensor]) -> Any:
        logits = logits_of(outputs)
        lm_loss = self.token_losses(logits, batch, grad=True).mean
        lagrangian = outputs.lagrangian if isinstance(outputs, ModelOutput) else None
        if lagrangian is None and self.teacher is None:
            return lm_loss
        total, parts = lm_loss, {"lm_loss": lm_loss.detach()}
        if self.teacher is not None:
            kd = self.teacher.kd_loss(batch["input_ids"], logits, shift_labels(batch["labels"]))
            total = mix_losses(lm_loss, kd, self.teacher.alpha)
            parts["kd_loss"] = kd.detach()
        if lagrangian is not None:
            total = total + lagrangian
            parts["lagrangian"] = lagrangian.detach()
        return {"total": total, **parts}

    def token_losses(
        self, logits: torch.Tensor, batch: dict[str, torch.Tensor], grad: bool = False
    ) -> TokenLosses:
        """The batch's one cross-entropy pass (``shearing.metrics``): computed for ``logits`` the first time they
        are seen (in ``loss`` with ``grad``, else for the first eval metric), then reused, detached, by every
        metric update on the same logits. The cache holds the [B,T] losses and a weak reference to the logits, so
        it never keeps a batch's logits alive."""
        cached = self._token_losses
        if cached is not None and cached[0]() is logits and not grad:
            return cached[1]
        with contextlib.nullcontext() if grad else torch.no_grad():
            losses = token_losses(logits, batch["labels"], IGNORE_INDEX)
        self._token_losses = (weakref.ref(logits), losses._replace(mean=losses.mean.detach()))
        return losses

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Any | None = None) -> torch.Tensor:
        return logits_of(outputs) if outputs is not None else logits_of(self.forward(batch))

    def parameter_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """Trainable parameters by optimizer group: model weights, mask logits, Lagrange multipliers."""
        groups: dict[str, list[torch.nn.Parameter]] = {
            "weights": [p for p in self.model.parameters() if p.requires_grad],
            "masks": [],
            "multipliers": [],
        }
        if self.l0 is not None:
            groups["masks"] = self.l0.mask_parameters()
            groups["multipliers"] = self.l0.multiplier_parameters()
        return groups

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: Any, metric: Metric) -> None:
        logits = logits_of(outputs)
        if not isinstance(metric, TokenCrossEntropy):  # another torchmetrics metric: logits, shifted targets
            metric.update(logits, shift_labels(batch["labels"]))
            return
        losses = self.token_losses(logits, batch)  # the loss's pass in training; one per batch in evaluation
        metric.update(losses, domain_idx=batch["domain_idx"] if metric.per_domain else None)

    # ----------------------------------------------------------------------------- metrics
    def set_domains(self, domains: list[str]) -> None:
        """(Re)build the metrics: LM cross-entropy and perplexity, plus one cross-entropy per domain."""
        self.domains = list(domains)
        for metrics in (self.train_metrics, self.eval_metrics):
            metrics.clear()
            metrics["LanguageCrossEntropy"] = LanguageCrossEntropy()
            metrics["LanguagePerplexity"] = LanguagePerplexity()
        if self.domains:
            for index, name in enumerate(self.domains):
                self.train_metrics[f"{name}_LanguageCrossEntropy"] = DomainLanguageCrossEntropy(index)
                self.eval_metrics[f"{name}_LanguageCrossEntropy"] = DomainLanguageCrossEntropy(index)

    # ------------------------------------------------------------------------ run metadata
    def get_extra_state(self) -> dict[str, Any]:
        return {"version": METADATA_VERSION, **self.metadata}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self.metadata = {k: v for k, v in state.items() if k != "version"}
