"""Token-level cross-entropy computed once per batch, and the metrics that read it.

One pass. ``token_losses(logits, labels)`` computes the per-token cross-entropy of a batch once
(``TokenLosses``: ``loss [B,T]``, 0 where ignored, and ``valid [B,T]``; HF convention: unshifted labels,
position t predicts ``labels[t + 1]``, the last position predicts nothing, ``ignore_index`` labels do not
count). ``ComposerShearedLlama`` computes it in ``loss`` (the LM loss is its mean over valid tokens) and hands
the same tensor, detached, to every train metric of that micro-batch, and computes it once per eval batch
for every eval metric: the train LM loss, the overall and per-domain cross-entropy, the perplexity and the
dynamic-loading signal (the per-domain eval losses) all read one cross-entropy over the vocabulary, not one
pass each (at 32k vocabulary x 4096 tokens a pass is a large part of a step's non-matmul work).

The metrics. ``LanguageCrossEntropy`` (every token), ``LanguagePerplexity`` (its exp) and
``DomainLanguageCrossEntropy(i)`` (the tokens of the samples whose ``domain_idx`` is i, and only those)
accumulate a float64 summed loss and an integer token count, both reduced by summation across ranks, so the
value is the mean over every token seen by any rank (not a mean of per-rank or per-batch means). Their
``update`` takes a ``TokenLosses`` (plus ``domain_idx [B]`` for a domain's), or logits and unshifted labels,
from which it computes one.

A domain absent from everything seen (count 0) computes to 0.0, never NaN: the reference code's
0/0 gave NaN training curves whenever a batch lacked a domain. ``total`` tells "no tokens" from a
real loss, and the ``DynamicLoading`` callback refuses to update from an evaluation in which a domain
had no tokens.

Training logs no value at all for a domain without tokens: Composer computes and logs every train
metric after every batch, so a batch without domain i would log ``<domain>_LanguageCrossEntropy = 0.0``,
which reads as a perfect loss on a dashboard. ``absent_domains`` finds the per-domain metrics whose
token count, summed over all ranks, is 0 (one small all-reduce, the same answer on every rank), and
``shearing.composer.trainer.ShearingTrainer`` leaves them out of that batch's train metrics (no key at all in
any logger). Evaluation keeps every key: each domain's eval split is always read.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from composer.utils import dist
from torchmetrics import Metric

from shearing.data.labels import IGNORE_INDEX


class TokenLosses(NamedTuple):
    """A batch's one cross-entropy pass (``token_losses``). Position t predicts ``labels[t + 1]``."""

    loss: torch.Tensor  # [B,T] float32 per-token cross-entropy, 0 where not counted (detached)
    valid: torch.Tensor  # [B,T] bool, the positions that count
    sum: (
        torch.Tensor
    )  # float32 scalar: the summed loss, as cross_entropy(reduction="sum") gives it (detached)
    mean: torch.Tensor  # float32 scalar: the LM loss, as cross_entropy(reduction="mean") gives it (with grad)


def shift_labels(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> torch.Tensor:
    """Targets aligned with the logits: position t predicts labels[t + 1]; the last position is ignored."""
    return F.pad(labels[:, 1:], (0, 1), value=ignore_index)


def token_losses(logits: Any, labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> TokenLosses:
    """The one cross-entropy pass over ``logits [B,T,V]`` (or an HF output holding them) against unshifted
    ``labels [B,T]``, in float32: one ``log_softmax`` over the vocabulary, then per-token, summed and mean
    losses gathered from it (``cross_entropy`` is exactly ``log_softmax`` then ``nll_loss``, so ``mean`` and
    ``sum`` are bit-identical to ``cross_entropy``'s reductions, and ``mean``'s gradient to its)."""
    if isinstance(logits, Mapping) or hasattr(logits, "logits"):
        logits = logits["logits"] if isinstance(logits, Mapping) else logits.logits
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            f"expected logits [B,T,V] and labels [B,T], got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )
    targets = shift_labels(labels, ignore_index)
    log_probs = F.log_softmax(logits.flatten(0, 1).float(), dim=-1)
    flat = targets.flatten()
    mean = F.nll_loss(log_probs, flat, ignore_index=ignore_index)
    log_probs = log_probs.detach()
    per_token = F.nll_loss(log_probs, flat, ignore_index=ignore_index, reduction="none")
    total = F.nll_loss(log_probs, flat, ignore_index=ignore_index, reduction="sum")
    return TokenLosses(per_token.view(targets.shape), targets != ignore_index, total, mean)


class TokenCrossEntropy(Metric):
    """Mean token-level cross-entropy of the rows ``_rows`` selects, from ``TokenLosses`` (module docstring)."""

    full_state_update = False
    higher_is_better = False
    per_domain = False  # the model passes domain_idx only to per-domain metrics
    state_dtype = torch.float64

    sum_loss: torch.Tensor
    total: torch.Tensor

    def __init__(self, ignore_index: int = IGNORE_INDEX, **kwargs: Any):
        super().__init__(**kwargs)  # torchmetrics options: dist_sync_on_step, sync_on_compute, ...
        self.ignore_index = int(ignore_index)
        self.add_state("sum_loss", default=torch.tensor(0.0, dtype=self.state_dtype), dist_reduce_fx="sum")
        self.add_state("total", default=torch.tensor(0, dtype=torch.int64), dist_reduce_fx="sum")

    def _rows(self, domain_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
        """The rows counted (a bool mask [B]), or None for every row."""
        return None

    def update(
        self, outputs: Any, labels: torch.Tensor | None = None, domain_idx: torch.Tensor | None = None
    ) -> None:
        """``outputs``: a ``TokenLosses`` (``labels`` unused), or logits [B,T,V] with unshifted ``labels`` [B,T]."""
        if isinstance(outputs, TokenLosses):
            losses = outputs
        else:
            with torch.no_grad():
                losses = token_losses(outputs, labels, self.ignore_index)
        batch = losses.loss.shape[0]
        if domain_idx is not None and tuple(domain_idx.shape) != (batch,):
            raise ValueError(f"expected domain_idx [{batch}], got {tuple(domain_idx.shape)}")
        rows = self._rows(domain_idx, losses.loss.device)
        if rows is None:  # the pass's own sum, as cross_entropy(reduction="sum") gives it
            self.sum_loss += losses.sum.detach().to(self.state_dtype)
            self.total += losses.valid.sum()
        else:
            self.sum_loss += losses.loss[rows].detach().sum(dtype=torch.float64).to(self.state_dtype)
            self.total += losses.valid[rows].sum()

    def compute(self) -> torch.Tensor:
        """Mean cross-entropy per token; 0.0 if none was seen."""
        mean = self.sum_loss / self.total.clamp(min=1)
        return torch.where(self.total > 0, mean, torch.zeros_like(mean)).float()


class LanguageCrossEntropy(TokenCrossEntropy):
    """Mean token-level cross-entropy over every token: Composer's metric of that name (a float32 sum of each
    batch's summed loss over an integer count, the same value to the bit), fed from the one pass."""

    state_dtype = torch.float32


class LanguagePerplexity(LanguageCrossEntropy):
    """``exp`` of ``LanguageCrossEntropy``, with its float32 state (Composer's metric of that name, from the one
    pass)."""

    def compute(self) -> torch.Tensor:
        return torch.exp(super().compute()) if int(self.total) else torch.tensor(math.nan)


class DomainLanguageCrossEntropy(TokenCrossEntropy):
    """Token-level cross-entropy of one domain's samples (see the module docstring)."""

    per_domain = True  # tells the model to call update(token_losses, domain_idx=...)

    def __init__(self, domain_idx: int, ignore_index: int = IGNORE_INDEX, **kwargs: Any):
        super().__init__(ignore_index, **kwargs)
        self.domain_idx = int(domain_idx)

    def _rows(self, domain_idx: torch.Tensor | None, device: torch.device) -> torch.Tensor:
        if domain_idx is None:
            raise ValueError(f"{type(self).__name__} needs the batch's domain_idx [B]")
        return domain_idx.to(device) == self.domain_idx


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
