"""Hard-concrete math: support, exact zeros and ones, and the keep-probability formula."""

import math

import pytest
import torch

from shearing.pruning import hard_concrete as hc


@pytest.mark.parametrize("log_alpha", [-2.0, 0.0, 1.5, 4.0])
def test_sample_fractions_match_closed_form(log_alpha):
    gen = torch.Generator().manual_seed(0)
    z = hc.sample_gates(torch.full((200_000,), log_alpha), generator=gen)
    assert z.min() >= 0.0 and z.max() <= 1.0
    p_keep = float(hc.keep_probability(torch.tensor(log_alpha)))
    # z == 1 when s >= (1 - l) / (r - l): P = sigmoid(log_alpha - beta * logit((1 - l) / (r - l))).
    x1 = (1 - hc.LIMIT_LEFT) / (hc.LIMIT_RIGHT - hc.LIMIT_LEFT)
    p_one = 1 / (1 + math.exp(-(log_alpha - hc.TEMPERATURE * math.log(x1 / (1 - x1)))))
    assert abs(float((z == 0).float().mean()) - (1 - p_keep)) < 0.005
    assert abs(float((z == 1).float().mean()) - p_one) < 0.005
    # Monte-Carlo estimate of P(z > 0) agrees with the formula sigmoid(log_alpha + 1.5986).
    assert abs(float((z > 0).float().mean()) - p_keep) < 0.005
    assert abs(p_keep - 1 / (1 + math.exp(-(log_alpha + 1.5986)))) < 1e-4


def test_samples_are_differentiable():
    log_alpha = torch.zeros(16, requires_grad=True)
    hc.sample_gates(log_alpha).sum().backward()
    assert log_alpha.grad is not None and log_alpha.grad.abs().sum() > 0


def test_topk_mask_zeroes_exactly_k_smallest_per_row():
    values = torch.tensor([[0.9, 0.1, 0.5, 0.7], [0.2, 0.8, 0.3, 0.4]])
    out = hc.topk_mask(values, torch.tensor([1, 2]))
    assert torch.equal(out, torch.tensor([[0.9, 0.0, 0.5, 0.7], [0.0, 0.8, 0.0, 0.4]]))


def test_clamp_keeps_log_alpha_in_range():
    log_alpha = torch.tensor([-10.0, 0.0, 10.0])
    hc.clamp_log_alpha_(log_alpha)
    assert torch.allclose(log_alpha, torch.tensor([math.log(0.01), 0.0, math.log(100.0)]))
