"""Hard-concrete math: support, exact zeros and ones, the keep-probability formula, the clamp and the init."""

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


def test_stored_clamp_keeps_log_alpha_in_range():
    log_alpha = torch.tensor([-10.0, 0.0, 10.0])
    hc.clamp_log_alpha_(log_alpha)
    assert torch.allclose(log_alpha, torch.tensor([math.log(0.01), 0.0, math.log(100.0)]))


def test_functional_clamp_is_the_identity_with_gradient_one_in_range():
    log_alpha = torch.tensor([hc.LOG_ALPHA_MIN, 0.0, hc.LOG_ALPHA_MAX], requires_grad=True)
    out = hc.clamped(log_alpha)
    out.sum().backward()
    assert torch.equal(out.detach(), log_alpha.detach())
    assert torch.equal(log_alpha.grad, torch.ones(3))  # bounds included: the reference's math in range


def test_init_is_distinct_and_inside_the_clamp_range():
    log_alpha = torch.empty(4, 512)
    hc.init_log_alpha(log_alpha, generator=torch.Generator().manual_seed(0))
    assert log_alpha.max() <= hc.LOG_ALPHA_MAX + 1e-6 and log_alpha.min() >= hc.LOG_ALPHA_MAX - 0.1
    # Distinct up to float32 resolution: its spacing near ln 100 is 4.8e-7, so ~3% of 2048 draws of
    # |N(0, 0.01)| collide with a neighbour (a tie between equal logits, not a systematic index order).
    assert log_alpha.unique().numel() > 0.95 * log_alpha.numel()
    before = log_alpha.clone()
    hc.clamp_log_alpha_(log_alpha)  # a clamp keeps the noise (the reference's clamp erased it)
    assert torch.equal(log_alpha, before)


def test_topk_right_after_init_does_not_keep_the_last_indices():
    # Zero half of each row: with ties broken by index the first half would always go.
    log_alpha = torch.empty(64, 100)
    hc.init_log_alpha(log_alpha, generator=torch.Generator().manual_seed(1))
    kept = hc.topk_mask(hc.soft_value(hc.clamped(log_alpha)), 50) > 0
    first_half_share = float(kept[:, :50].float().mean())
    assert 0.4 < first_half_share < 0.6, first_half_share
    assert torch.equal(kept.sum(-1), torch.full((64,), 50))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_topk_mask_refuses_non_finite_values(bad):
    values = torch.tensor([[0.9, bad, 0.5, 0.7]])
    with pytest.raises(ValueError, match="non-finite mask logits"):
        hc.topk_mask(values, 1)


def test_stored_clamp_after_every_optimizer_step():
    log_alpha = torch.nn.Parameter(torch.full((8,), hc.LOG_ALPHA_MAX))
    optimizer = torch.optim.Adam([log_alpha], lr=1.0)
    hc.register_log_alpha_clamp(optimizer, [log_alpha])
    for _ in range(5):
        optimizer.zero_grad()
        (-hc.clamped(log_alpha).sum()).backward()  # pushes upward, past ln 100
        optimizer.step()
        assert float(log_alpha.max()) <= hc.LOG_ALPHA_MAX + 1e-6  # float32(ln 100) is 6e-8 above ln 100
        assert float(log_alpha.min()) > hc.LOG_ALPHA_MAX - 1e-6  # clamped, not left behind


def _clamp_with_zero_gradient_at_bounds(x, min=None, max=None):
    """``Tensor.clamp`` as torch 2.15 differentiates it: gradient 0 on the bounds (1 strictly inside)."""
    out = torch.clamp(x, min, max)
    inside = torch.ones_like(x, dtype=torch.bool)
    if min is not None:
        inside &= x > min
    if max is not None:
        inside &= x < max
    return torch.where(inside, x, out.detach())


@pytest.mark.parametrize("torch_2_15_clamp", [False, True])
def test_logit_on_a_bound_gets_the_gradient_it_gets_inside(monkeypatch, torch_2_15_clamp):
    # The post-step clamp leaves stored logits exactly at ln 0.01 / ln 100. On torch 2.15 clamp's
    # gradient there is 0, and a mask reading its logit through clamp would freeze (issue 19). The
    # forward clamp must pass the unclamped value's gradient whatever torch's clamp does on its bounds.
    if torch_2_15_clamp:
        monkeypatch.setattr(torch.Tensor, "clamp", _clamp_with_zero_gradient_at_bounds)
        probe = torch.tensor([1.0, 2.0], requires_grad=True)
        probe.clamp(1.0, 2.0).sum().backward()
        assert torch.equal(probe.grad, torch.zeros(2))  # the simulation does what torch 2.15 does
    bounds = torch.tensor([hc.LOG_ALPHA_MIN, hc.LOG_ALPHA_MAX])
    on_bound = bounds.clone().requires_grad_(True)
    plain = bounds.clone().requires_grad_(True)  # the same values, never clamped: the gradient "inside"

    def loss(log_alpha):
        gates = hc.sample_gates(log_alpha.expand(64, 2), generator=torch.Generator().manual_seed(3))
        return (gates * torch.arange(1.0, 65.0)[:, None]).sum() + hc.keep_probability(log_alpha).sum()

    loss(hc.clamped(on_bound)).backward()
    loss(plain).backward()
    assert plain.grad.abs().min() > 0
    assert torch.equal(on_bound.grad, plain.grad)


def test_functional_clamp_passes_gradient_beyond_the_bounds_too():
    log_alpha = torch.tensor([-9.0, 9.0], requires_grad=True)
    out = hc.clamped(log_alpha)
    (out * torch.tensor([2.0, 3.0])).sum().backward()
    assert torch.equal(out.detach(), torch.tensor([hc.LOG_ALPHA_MIN, hc.LOG_ALPHA_MAX]))
    assert torch.equal(log_alpha.grad, torch.tensor([2.0, 3.0]))
