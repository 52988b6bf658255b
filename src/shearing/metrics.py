"""Per-domain language-model cross-entropy, the signal dynamic batch loading reacts to.

``DomainLanguageCrossEntropy(i)`` accumulates the token-level cross-entropy of the samples whose
``domain_idx`` is i, and only those: ``update(logits [B,T,V], labels [B,T], domain_idx [B])`` with
unshifted labels (HF convention: position t predicts ``labels[t + 1]``; the last position predicts
nothing; ``ignore_index`` labels do not count). The states are a float64 summed loss and an integer
token count, both reduced by summation across ranks, so the value is the mean over every token of the
domain seen by any rank (not a mean of per-rank or per-batch means).

A domain absent from everything seen (count 0) computes to 0.0, never NaN: the reference code's
0/0 gave NaN training curves whenever a batch lacked a domain. ``total`` tells "no tokens" from a
real loss, and the ``DynamicLoading`` callback refuses to update from an evaluation in which a domain
had no tokens.

Training logs no value at all for a domain without tokens: Composer computes and logs every train
metric after every batch, so a batch without domain i would log ``<domain>_LanguageCrossEntropy = 0.0``,
which reads as a perfect loss on a dashboard. ``absent_domains`` finds the per-domain metrics whose
token count, summed over all ranks, is 0 (one small all-reduce, the same answer on every rank), and
``shearing.trainer.ShearingTrainer`` leaves them out of that batch's train metrics (no key at all in
any logger). Evaluation keeps every key: each domain's eval split is always read.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from composer.utils import dist
from torchmetrics import Metric


class DomainLanguageCrossEntropy(Metric):
    """Token-level cross-entropy of one domain's samples (see the module docstring)."""

    full_state_update = False
    higher_is_better = False
    per_domain = True  # tells the model to call update(logits, labels, domain_idx)

    sum_loss: torch.Tensor
    total: torch.Tensor

    def __init__(self, domain_idx: int, ignore_index: int = -100, **kwargs: Any):
        super().__init__(**kwargs)  # torchmetrics options: dist_sync_on_step, sync_on_compute, ...
        self.domain_idx = int(domain_idx)
        self.ignore_index = int(ignore_index)
        self.add_state("sum_loss", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def update(self, logits: Any, labels: torch.Tensor, domain_idx: torch.Tensor) -> None:
        if isinstance(logits, Mapping) or hasattr(logits, "logits"):
            logits = logits["logits"] if isinstance(logits, Mapping) else logits.logits
        if logits.dim() != 3 or logits.shape[:2] != labels.shape or domain_idx.shape != labels.shape[:1]:
            raise ValueError(
                f"expected logits [B,T,V], labels [B,T] and domain_idx [B], got {tuple(logits.shape)}, "
                f"{tuple(labels.shape)} and {tuple(domain_idx.shape)}"
            )
        rows = domain_idx.to(labels.device) == self.domain_idx
        predicted = logits[rows, :-1]
        targets = labels[rows, 1:]
        loss = F.cross_entropy(
            predicted.reshape(-1, predicted.shape[-1]).float(),
            targets.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        self.sum_loss += loss.to(self.sum_loss.dtype)
        self.total += (targets != self.ignore_index).sum()

    def compute(self) -> torch.Tensor:
        """Mean cross-entropy per token of this domain; 0.0 if none was seen."""
        mean = self.sum_loss / self.total.clamp(min=1)
        return torch.where(self.total > 0, mean, torch.zeros_like(mean)).float()


def absent_domains(metrics: Mapping[str, Metric]) -> set[str]:
    """Names of the per-domain metrics that saw no token on any rank since their last reset.

    A collective when the run is distributed: every rank must call it, with the same metric names.
    """
    names = [name for name, metric in metrics.items() if getattr(metric, "per_domain", False)]
    if not names:
        return set()
    counts = torch.stack(
        [metrics[name].total.detach().to(torch.int64) for name in names]
    )  # on the metrics' device
    if dist.get_world_size() > 1:
        dist.all_reduce(counts, reduce_operation="SUM")
    return {name for name, count in zip(names, counts.tolist()) if count == 0}
