"""The dynamic-batch-loading update of the domain proportions (SPEC §3), as a pure function.

With current weights w, per-domain eval losses l and reference losses l_ref over k domains:

    delta = max(l - l_ref, 0)        (paper, ``clamp=True``, the default)
          =      l - l_ref           (released code, ``clamp=False``)
    alpha = w * exp(eta * delta), normalised to sum 1
    w_new = (1 - c) * alpha + c / k  (c = ``smoothing``, a floor that keeps every domain alive)

Clamping is the default because it is what the paper describes and it has the property that a domain
already at or below its reference is never pushed down for being good: it only loses share to
domains that are behind. The released code lets such a domain shrink multiplicatively
(``exp(eta * (l - l_ref)) < 1``), which is kept as ``update: released``.

Everything is float64; alpha is computed in log space (``log w + eta * delta``, max subtracted) so
large gaps cannot overflow, which agrees with the direct formula to ~1e-16.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np

WEIGHT_TOLERANCE = 1e-6


def _vector(name: str, values: Sequence[float] | np.ndarray, k: int | None = None) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64)
    if out.ndim != 1 or (k is not None and len(out) != k):
        raise ValueError(
            f"{name} must be a flat list of {k if k is not None else 'k'} numbers, got shape {out.shape}"
        )
    if not np.all(np.isfinite(out)):
        raise ValueError(f"{name} must be finite numbers, got {out.tolist()}")
    return out


def update_domain_weights(
    weights: Sequence[float] | np.ndarray,
    losses: Sequence[float] | np.ndarray,
    ref_losses: Sequence[float] | np.ndarray,
    eta: float = 1.0,
    smoothing: float = 1e-4,
    clamp: bool = True,
) -> np.ndarray:
    """New domain weights (float64, summing to 1) from eval losses and reference losses."""
    w = _vector("weights", weights)
    k = len(w)
    if k == 0:
        raise ValueError("need at least one domain")
    loss = _vector("losses", losses, k)
    ref = _vector("ref_losses", ref_losses, k)
    if np.any(w < 0) or abs(w.sum() - 1.0) > WEIGHT_TOLERANCE:
        raise ValueError(f"weights must be >= 0 and sum to 1 (± {WEIGHT_TOLERANCE}), got {w.tolist()}")
    if not math.isfinite(eta) or eta < 0:
        raise ValueError(f"eta must be a finite number >= 0, got {eta}")
    if not 0.0 <= smoothing <= 1.0:
        raise ValueError(f"smoothing must be in [0, 1], got {smoothing}")
    delta = loss - ref
    if clamp:
        delta = np.maximum(delta, 0.0)
    with np.errstate(divide="ignore"):
        logits = np.log(w) + eta * delta  # a zero weight stays zero: log 0 = -inf
    alpha = np.exp(logits - logits.max())
    alpha /= alpha.sum()
    return (1.0 - smoothing) * alpha + smoothing / k
