"""Per-domain cross-entropy and perplexity of a causal LM on the held-out MDS eval split.

The loss is the token-level mean over every predicted position of a domain (T - 1 per sequence), as
computed by ``shearing.reference_losses.domain_eval_totals`` — the same numbers dynamic batch loading
compares against its reference losses. Perplexity is exp(loss). ``average_loss`` is the unweighted mean
over domains (each domain counts once, whatever its size), the paper's summary of per-domain losses.
"""

from __future__ import annotations

import math
import os
from typing import Any

from shearing.reference_losses import domain_eval_totals


def domain_results(
    model: Any,
    data_dir: str | os.PathLike,
    batch_size: int = 8,
    max_seqs: int | None = None,
    progress: bool = True,
) -> tuple[dict[str, dict[str, float | int]], float]:
    """``({domain: {"loss", "perplexity", "tokens"}}, average_loss)`` over ``data_dir`` (``DATA_DIR/eval``)."""
    totals = domain_eval_totals(model, data_dir, batch_size, max_seqs, progress)
    domains = {
        name: {"loss": result.loss, "perplexity": math.exp(result.loss), "tokens": result.tokens}
        for name, result in totals.items()
    }
    average = sum(result.loss for result in totals.values()) / len(totals)
    return domains, average
