"""The dynamic-loading update rule (SPEC §3), against the formula written out by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from shearing.data.weights import update_domain_weights

W = [0.67, 0.15, 0.045, 0.045, 0.045, 0.025, 0.02]
REF = [1.8712, 2.0328, 0.6883, 2.0325, 1.6297, 1.3560, 1.5353]
LOSS = [2.10, 2.00, 0.90, 2.40, 1.50, 1.60, 1.60]


def by_hand(w, losses, refs, eta, c, clamp):
    k = len(w)
    alpha = []
    for wi, li, ri in zip(w, losses, refs):
        delta = max(li - ri, 0.0) if clamp else li - ri
        alpha.append(wi * math.exp(eta * delta))
    z = sum(alpha)
    return [(1 - c) * a / z + c / k for a in alpha]


@pytest.mark.parametrize("clamp", [True, False])
@pytest.mark.parametrize("eta,c", [(1.0, 1e-4), (0.3, 0.0), (2.5, 0.05)])
def test_matches_the_formula(clamp, eta, c):
    new = update_domain_weights(W, LOSS, REF, eta=eta, smoothing=c, clamp=clamp)
    assert new.dtype == np.float64
    np.testing.assert_allclose(new, by_hand(W, LOSS, REF, eta, c, clamp), rtol=0, atol=1e-12)
    assert abs(new.sum() - 1) < 1e-12


def test_paper_rule_never_punishes_a_domain_below_its_reference():
    losses = [r - 0.3 for r in REF]  # every domain better than its reference
    new = update_domain_weights(W, losses, REF, smoothing=1e-4)
    np.testing.assert_allclose(new, (1 - 1e-4) * np.asarray(W) + 1e-4 / 7, atol=1e-15)
    released = update_domain_weights(W, losses, REF, smoothing=1e-4, clamp=False)
    np.testing.assert_allclose(released, new, atol=1e-15)  # equal gaps: shares unchanged either way

    losses = list(REF)
    losses[0] -= 0.5  # cc below its reference, github below too, book above
    losses[1] -= 0.1
    losses[2] += 0.4
    paper = update_domain_weights(W, losses, REF, smoothing=0.0)
    assert paper[0] / paper[1] == pytest.approx(W[0] / W[1], rel=1e-12)  # below-reference ratio kept
    released = update_domain_weights(W, losses, REF, smoothing=0.0, clamp=False)
    assert released[0] / released[1] < W[0] / W[1]  # the released rule shrinks cc relative to github
    assert paper[0] > released[0]


def test_floor_keeps_every_domain_alive():
    losses = [10.0, 0, 0, 0, 0, 0, 0]  # one domain far behind: exp(10) swamps the others
    new = update_domain_weights(W, losses, [0.0] * 7, eta=1.0, smoothing=1e-4)
    assert np.all(new > 1e-4 / 7) and abs(new.sum() - 1) < 1e-12
    huge = update_domain_weights(W, [1e4, 0, 0, 0, 0, 0, 0], [0.0] * 7)  # no overflow in log space
    assert np.all(np.isfinite(huge)) and huge[0] == pytest.approx(1 - 1e-4 + 1e-4 / 7)
    zero = update_domain_weights([0.5, 0.5, 0.0], [3.0, 1.0, 9.0], [1.0] * 3, smoothing=0.0)
    assert zero[2] == 0.0


@pytest.mark.parametrize(
    "kwargs,message",
    [
        (dict(weights=[0.5, 0.6]), "sum to 1"),
        (dict(weights=[1.2, -0.2]), ">= 0"),
        (dict(losses=[1.0]), "2 numbers"),
        (dict(losses=[float("nan"), 1.0]), "finite"),
        (dict(eta=-1.0), "eta"),
        (dict(smoothing=1.5), "smoothing"),
    ],
)
def test_bad_input(kwargs, message):
    args = dict(weights=[0.5, 0.5], losses=[1.0, 2.0], ref_losses=[1.0, 1.0])
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        update_domain_weights(**args)
