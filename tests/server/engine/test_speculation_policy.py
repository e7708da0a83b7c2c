"""The speculation policies on scripted inputs: the cost fit, acceptance by confidence, and the
choice per row (exact counts, no timing)."""

from __future__ import annotations

import pytest

from server.engine import speculation_policy as sp


def test_fixed_and_off():
    confs, seeded = [[0.9, 0.8], [0.1], []], [False, True, False]
    assert sp.make("fixed").choose(confs, seeded) == [2, 1, 0]
    assert sp.make("off").choose(confs, seeded) == [0, 0, 0]
    with pytest.raises(ValueError, match="speculation must be one of adaptive, fixed, off"):
        sp.make("sometimes")


def test_step_cost_recovers_a_linear_step_time():
    cost = sp.StepCost()
    for i in range(40):
        t = 8 + 8 * (i % 2)  # 8 or 16 positions
        cost.observe(t, 0.05 + 0.004 * t)
    a, b = cost.fitted
    assert a == pytest.approx(0.05, rel=1e-6) and b == pytest.approx(0.004, rel=1e-6)


def test_step_cost_keeps_its_fit_while_positions_do_not_vary():
    cost = sp.StepCost()
    for _ in range(40):
        cost.observe(32, 0.05 + 0.004 * 32)
    assert cost.fitted is None  # a and b cannot be told apart
    for i in range(40):
        cost.observe(8 + 8 * (i % 2), 0.05 + 0.004 * (8 + 8 * (i % 2)))
    fit = cost.fitted
    for _ in range(400):
        cost.observe(16, 0.05 + 0.004 * 16)  # the spread fades away: the fit moves no more
    assert cost.fitted[0] == pytest.approx(fit[0], rel=1e-6)
    assert cost.fitted[1] == pytest.approx(fit[1], rel=1e-6)
    last = cost.fitted
    cost.observe(16, 0.5)
    assert cost.fitted == last


def test_acceptance_counts_tested_tokens_by_confidence_bin():
    acc = sp.Acceptance(decay=1.0, prior=0.5, prior_n=2.0)
    acc.observe([0.9, 0.3, 0.95], accepted=1)  # 0.9 accepted, 0.3 rejected, 0.95 never tested
    assert acc.rate(0.85) == pytest.approx(2 / 3)  # (1 + 1) / (2 + 1)
    assert acc.rate(0.25) == pytest.approx(1 / 3)  # (1 + 0) / (2 + 1)
    assert acc.rate(0.5) == pytest.approx(0.5)  # untouched bin: the prior


def _adaptive(a: float, b: float, rate_hi: float = 0.9, rate_lo: float = 0.1) -> sp.Adaptive:
    pol = sp.Adaptive()
    pol.cost.fitted = (a, b)
    pol.acceptance = sp.Acceptance(decay=1.0, prior_n=1e9)
    n = len(pol.acceptance.tested)
    pol.acceptance.accepted = [rate_lo * 1e9] * (n - 1) + [rate_hi * 1e9]  # confidence ≥ 0.8: rate_hi
    return pol


def test_adaptive_speculates_while_a_step_is_fixed_cost_and_stops_when_positions_cost():
    confs = [[0.9]] * 8
    # 8 rows, a = 50 ms, b = 0.1 ms: a proposal (0.9 accepted) costs next to nothing
    assert _adaptive(0.05, 0.0001).choose(confs, [False] * 8) == [1] * 8
    # b = 100 ms per position: one more position costs more than 0.9 tokens' share of the step
    assert _adaptive(0.05, 0.1).choose(confs, [False] * 8) == [0] * 8


def test_adaptive_drafts_where_the_drafts_agree():
    """Equal cost per position: only confident rows pay (acceptance 0.9 against 0.1)."""
    pol = _adaptive(0.05, 0.004)
    assert pol.choose([[0.9], [0.3], [0.95], [0.1]], [False] * 4) == [1, 0, 1, 0]


def test_adaptive_cuts_a_proposal_where_its_product_no_longer_pays():
    pol = _adaptive(0.05, 0.006)  # 2nd token: 0.9 · 0.9 = 0.81; 3rd: 0.081
    assert pol.choose([[0.9, 0.9, 0.3]], [False]) == [2]


def test_seeded_rows_propose_everything_whatever_the_load():
    pol = _adaptive(0.05, 0.02)
    assert pol.choose([[0.3, 0.3], [0.3, 0.3]], [True, False]) == [2, 0]


def test_without_a_fit_adaptive_speculates_and_explores():
    pol = sp.Adaptive()
    ks = [pol.choose([[0.5]] * 4, [False, False, False, True]) for _ in range(sp.EXPLORE_EVERY)]
    assert ks[:-1] == [[1, 1, 1, 1]] * (sp.EXPLORE_EVERY - 1)
    assert ks[-1] == [1, 0, 1, 1]  # the 16th step: the odd rows flip, but for the seeded 3
    ks = [pol.choose([[0.5]] * 4, [False, False, False, True]) for _ in range(sp.EXPLORE_EVERY)]
    assert ks[-1] == [0, 1, 0, 1]  # the 32nd: the even ones
