"""The Composer model: a mask-aware LLaMA, an optional L0 module, LM loss and metrics.

``ComposerShearedLlama`` wraps ``MaskedLlamaForCausalLM`` (as ``.model``, so Composer's FSDP and
activation-checkpointing hooks find its per-layer functions) and, during pruning, an ``L0Module``
(as ``.l0``). Without ``l0`` it is a plain LLaMA for continued pre-training. Under FSDP2 mixed precision
the L0 unit gathers and reduces in fp32 while the LLaMA computes in bf16 (``shearing.parallelism.keep_fp32``,
applied at the first forward, before FSDP2's lazy initialisation of the unit).

Batches carry ``input_ids`` and ``labels`` (HF convention: labels are the inputs, the model shifts;
-100 is ignored), and optionally ``domain_idx`` for per-domain metrics. The loss is the token-level
cross-entropy; the Lagrangian constraint is added to it by the ``LagrangianPruning`` algorithm, not
here, so the model's loss stays the plain LM loss.

Run metadata (source config, target shape, mask families, tokenizer) is kept in the module's
``extra_state``, so a Composer checkpoint alone is enough to export the model later.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from composer.metrics.nlp import LanguageCrossEntropy, LanguagePerplexity
from composer.models import ComposerModel
from torchmetrics import Metric

from shearing.models.llama import MaskedLlamaForCausalLM
from shearing.parallelism import keep_fp32
from shearing.pruning.l0 import L0Module

IGNORE_INDEX = -100
METADATA_VERSION = 1


def shift_labels(labels: torch.Tensor) -> torch.Tensor:
    """Targets aligned with the logits: position t predicts labels[t + 1]; the last position is ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)


class ComposerShearedLlama(ComposerModel):
    def __init__(
        self,
        model: MaskedLlamaForCausalLM,
        l0: L0Module | None = None,
        metadata: dict[str, Any] | None = None,
        domains: list[str] | None = None,
    ):
        super().__init__()
        self.model = model
        self.l0 = l0
        self.metadata = dict(metadata or {})
        self.train_metrics: dict[str, Metric] = {}
        self.eval_metrics: dict[str, Metric] = {}
        self.set_domains(domains or [])

    # ------------------------------------------------------------------------- Composer API
    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        if self.l0 is not None:
            keep_fp32(self.l0)  # under FSDP2 mixed precision the masks stay fp32 (see shearing.parallelism)
        masks = self.l0() if self.l0 is not None else None
        return self.model(batch["input_ids"], masks=masks)

    def loss(self, outputs: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        targets = shift_labels(batch["labels"])
        return F.cross_entropy(outputs.flatten(0, 1).float(), targets.flatten(), ignore_index=IGNORE_INDEX)

    def eval_forward(self, batch: dict[str, torch.Tensor], outputs: Any | None = None) -> torch.Tensor:
        return outputs if outputs is not None else self.forward(batch)

    def get_metrics(self, is_train: bool = False) -> dict[str, Metric]:
        return self.train_metrics if is_train else self.eval_metrics

    def update_metric(self, batch: dict[str, torch.Tensor], outputs: torch.Tensor, metric: Metric) -> None:
        targets = shift_labels(batch["labels"])
        if getattr(metric, "per_domain", False):
            metric.update(outputs, batch["labels"], batch["domain_idx"])
        else:
            metric.update(outputs, targets)

    # ----------------------------------------------------------------------------- metrics
    def set_domains(self, domains: list[str]) -> None:
        """(Re)build the metrics: LM cross-entropy and perplexity, plus one cross-entropy per domain."""
        self.domains = list(domains)
        for metrics in (self.train_metrics, self.eval_metrics):
            metrics.clear()
            metrics["LanguageCrossEntropy"] = LanguageCrossEntropy(ignore_index=IGNORE_INDEX)
            metrics["LanguagePerplexity"] = LanguagePerplexity(ignore_index=IGNORE_INDEX)
        if self.domains:
            from shearing.metrics import DomainLanguageCrossEntropy

            for index, name in enumerate(self.domains):
                self.train_metrics[f"{name}_LanguageCrossEntropy"] = DomainLanguageCrossEntropy(index)
                self.eval_metrics[f"{name}_LanguageCrossEntropy"] = DomainLanguageCrossEntropy(index)

    # ------------------------------------------------------------------------ run metadata
    def get_extra_state(self) -> dict[str, Any]:
        return {"version": METADATA_VERSION, **self.metadata}

    def set_extra_state(self, state: Any) -> None:
        if isinstance(state, dict):
            self.metadata = {k: v for k, v in state.items() if k != "version"}
