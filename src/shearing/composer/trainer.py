"""``ShearingTrainer``: Composer's ``Trainer`` with one change, per-domain train losses of absent domains.

Composer computes and logs every train metric after every batch. A per-domain cross-entropy
(``shearing.metrics.DomainLanguageCrossEntropy``) of a domain that had no token in the batch, on any
rank, would log 0.0, a "perfect" loss on every dashboard (the reference code logged NaN). Here such a
metric is left out of that batch's logging: its key is absent at that step in every logger
(``metrics.jsonl``, W&B, MLflow, the console), and its entry in ``state.train_metric_values`` is
dropped rather than left at the previous batch's value. Which metrics are absent is decided from the
token counts summed over all ranks, so every rank computes (and syncs) the same metrics.

Only this hook is overridden (Composer 0.32.1's ``_compute_and_log_metrics``, called for the train
metrics after each batch and for each evaluator after an evaluation); evaluation is untouched, every
domain's eval split is read in full. ``tests/test_metrics.py`` runs a real tiny pruning run through it,
so a Composer upgrade that renames the hook fails there rather than silently logging 0.0 again.
"""

from __future__ import annotations

from composer import Trainer
from torchmetrics import Metric

from shearing.metrics import absent_domains


class ShearingTrainer(Trainer):
    """A Composer ``Trainer`` that logs no train loss for a domain absent from the batch."""

    def _compute_and_log_metrics(self, dataloader_label: str, metrics: dict[str, Metric]) -> None:
        if dataloader_label == "train":
            absent = absent_domains(metrics)
            if absent:
                for name in absent:
                    self.state.train_metric_values.pop(name, None)
                metrics = {name: metric for name, metric in metrics.items() if name not in absent}
        super()._compute_and_log_metrics(dataloader_label, metrics)
