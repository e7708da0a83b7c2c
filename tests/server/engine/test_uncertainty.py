"""The uncertainty math against float64 formulas, identities, closed forms and degenerate cases."""

from __future__ import annotations

import math

import pytest
import torch

from server.engine.uncertainty import (
    bias_topk,
    decompose,
    decompose_topk,
    entropy,
    kl,
    mixture_logprobs,
    mutual_information,
    one_minus_max_prob,
    token_nll,
)


def _random_logprobs(*shape, scale=3.0, seed=0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    return torch.log_softmax(torch.randn(*shape, generator=g, dtype=torch.float64) * scale, -1).to(dtype)


def _naive(draft_lp, target_lp):
    """Direct float64 formulas with probabilities (no log-space tricks)."""
    q = draft_lp.double().exp()  # [..., M, V]
    p = target_lp.double().exp()  # [..., V]
    qbar = q.mean(-2)
    bias = (qbar * (qbar / p).log()).sum(-1)
    var = (q * (q / qbar.unsqueeze(-2)).log()).sum(-1).mean(-1)
    eu_direct = (q * (q / p.unsqueeze(-2)).log()).sum(-1).mean(-1)
    return bias, var, eu_direct


@pytest.mark.parametrize("m", [1, 2, 4])
def test_decompose_matches_float64_formulas(m):
    d = _random_logprobs(5, 3, m, 50)  # [5, 3, M, V]
    t = _random_logprobs(5, 3, 50, seed=1)
    u = decompose(d, t)
    bias, var, _ = _naive(d, t)
    assert u.bias.shape == (5, 3) and u.bias.dtype == torch.float32
    torch.testing.assert_close(u.bias.double(), bias, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u.variance.double(), var, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(u.eu, u.bias + u.variance)


def test_eu_equals_mean_kl_of_each_draft_to_target():
    """eu = KL(q̄‖p) + (1/M) Σ KL(q_m‖q̄) = (1/M) Σ KL(q_m‖p), exactly."""
    d = _random_logprobs(7, 4, 64, seed=2)
    t = _random_logprobs(7, 64, seed=3)
    u = decompose(d, t)
    direct = kl(d, t.unsqueeze(-2)).mean(-1)
    torch.testing.assert_close(u.eu, direct, rtol=1e-5, atol=1e-6)
    _, _, eu64 = _naive(d, t)
    torch.testing.assert_close(u.eu.double(), eu64, rtol=1e-4, atol=1e-5)


def test_closed_form_two_point_distributions():
    # drafts q1 = (1, 0), q2 = (0, 1): q̄ = (½, ½), variance = log 2; target p = (½, ½): bias 0
    d = torch.tensor([[0.0, -math.inf], [-math.inf, 0.0]])  # [M=2, V=2]
    t = torch.tensor([math.log(0.5), math.log(0.5)])
    u = decompose(d, t)
    assert u.variance.item() == pytest.approx(math.log(2), abs=1e-6)
    assert u.bias.item() == pytest.approx(0.0, abs=1e-7)
    # target (0.9, 0.1) against q̄ = (½, ½): bias = ½ log(½/0.9) + ½ log(½/0.1)
    t2 = torch.tensor([math.log(0.9), math.log(0.1)])
    expected = 0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1)
    assert decompose(d, t2).bias.item() == pytest.approx(expected, abs=1e-6)


def test_zero_probabilities_give_no_nan():
    d = torch.tensor([[[0.0, -math.inf, -math.inf], [-math.inf, 0.0, -math.inf]]])  # [1, 2, 3]
    t = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    u = decompose(d, t)
    assert torch.isfinite(u.eu).all()
    assert u.bias.item() == pytest.approx(0.0, abs=1e-7)
    assert u.variance.item() == pytest.approx(math.log(2), abs=1e-6)


def test_identical_drafts_have_zero_variance_and_drafts_equal_to_target_zero_eu():
    t = _random_logprobs(6, 30, seed=4)  # [6, V]
    d = t.unsqueeze(-2).expand(6, 3, 30)  # every draft equals the target
    u = decompose(d, t)
    assert u.variance.abs().max().item() < 1e-6
    assert u.eu.abs().max().item() < 1e-6
    other = _random_logprobs(6, 30, seed=5)
    u2 = decompose(other.unsqueeze(-2).expand(6, 4, 30), t)
    assert u2.variance.abs().max().item() < 1e-6
    assert u2.bias.min().item() > 0


def test_topk_is_exact_at_full_vocabulary():
    d = _random_logprobs(8, 3, 40, seed=6)
    t = _random_logprobs(8, 40, seed=7)
    vals, ids = t.topk(40)
    full, topk = decompose(d, t), decompose_topk(d, ids, vals)
    torch.testing.assert_close(topk.bias, full.bias, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(topk.variance, full.variance)


@pytest.mark.parametrize("k", [1, 3, 10, 39])
def test_topk_bias_is_a_lower_bound(k):
    # float64 throughout: the tail mass 1 − P_S is cancellation-prone in float32
    d = _random_logprobs(200, 2, 40, scale=2.0, seed=8, dtype=torch.float64)
    t = _random_logprobs(200, 40, scale=2.0, seed=9, dtype=torch.float64)
    vals, ids = t.topk(k)
    exact = decompose(d, t).bias
    bound = bias_topk(mixture_logprobs(d), ids, vals)
    assert (bound <= exact + 1e-9).all()
    if k == 39:  # a one-token tail is trivially proportional: the bound is attained
        torch.testing.assert_close(bound, exact)
    assert (bound >= 0).all()


def test_topk_exact_when_tails_are_proportional():
    """q̄ and p proportional on the tail: the one-bucket tail loses nothing."""
    p = torch.tensor([0.5, 0.2, 0.2, 0.1])
    q = torch.tensor([0.3, 0.3, 0.2 * 0.4 / 0.3, 0.1 * 0.4 / 0.3])  # tail (2, 3) ∝ p's tail
    d, t = q.log().view(1, 4), p.log()
    ids = torch.tensor([0, 1])
    exact = decompose(d, t).bias
    approx = decompose_topk(d, ids, t[ids]).bias
    assert approx.item() == pytest.approx(exact.item(), abs=1e-6)


def test_mutual_information_and_baselines():
    members = _random_logprobs(5, 6, 20, seed=10)  # [5, N=6, V]
    p = members.double().exp()
    pbar = p.mean(-2)
    h = lambda x: -(x * x.log()).sum(-1)  # noqa: E731
    expected = h(pbar) - h(p).mean(-1)
    torch.testing.assert_close(mutual_information(members).double(), expected, rtol=1e-4, atol=1e-5)
    lp = members[:, 0]
    torch.testing.assert_close(entropy(lp).double(), h(p[:, 0]), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(one_minus_max_prob(lp), 1 - lp.exp().max(-1).values)
    ids = torch.tensor([0, 1, 2, 3, 4])
    torch.testing.assert_close(token_nll(lp, ids), -lp[torch.arange(5), ids])
    uniform = torch.full((1, 8), -math.log(8))
    assert entropy(uniform).item() == pytest.approx(math.log(8), abs=1e-6)


def test_bias_on_a_support_equals_the_full_vocabulary_kl():
    """q̄ kept over a reduced vocabulary S (0 outside): KL(q̄ ‖ p) from S's columns and p's
    normalizer equals the KL over the whole vocabulary with q̄ expanded."""
    from server.engine.uncertainty import bias_on_support

    g = torch.Generator().manual_seed(0)
    V, S = 50, 12
    support = torch.randperm(V, generator=g)[:S]
    log_mix = torch.log_softmax(torch.randn(3, S, generator=g), -1)  # [3, S]
    logits = 4 * torch.randn(3, V, generator=g)  # [3, V] raw
    full = torch.full((3, V), float("-inf")).index_copy(1, support, log_mix)
    want = kl(full, torch.log_softmax(logits, -1))
    assert torch.allclose(bias_on_support(log_mix, logits, support), want, atol=1e-5)
    assert torch.allclose(bias_on_support(full, logits), want, atol=1e-5)
