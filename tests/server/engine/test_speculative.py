"""Propose/verify math: hand-built cases and the statistical losslessness of verification."""

from __future__ import annotations

import pytest
import torch

from server.engine.speculative import sample, sampling_probs, verify


def test_sampling_probs_greedy_temperature_and_top_p():
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    assert sampling_probs(logits, 0.0, 1.0).tolist() == [[0.0, 1.0, 0.0, 0.0]]
    torch.testing.assert_close(sampling_probs(logits, 1.0, 1.0), torch.softmax(logits, -1))
    torch.testing.assert_close(sampling_probs(logits, 0.5, 1.0), torch.softmax(logits * 2, -1))
    p = torch.softmax(logits, -1)[0]  # ≈ [0.087, 0.644, 0.237, 0.032]
    nucleus = sampling_probs(logits, 1.0, 0.7)[0]  # top token alone has 0.644 < 0.7: keep two
    kept = p[[1, 2]] / p[[1, 2]].sum()
    torch.testing.assert_close(nucleus[[1, 2]], kept)
    assert nucleus[[0, 3]].tolist() == [0.0, 0.0]
    assert sampling_probs(logits, 1.0, 0.01)[0].tolist() == [0.0, 1.0, 0.0, 0.0]


def _onehot(i, v=5):
    return torch.nn.functional.one_hot(torch.tensor(i), v).float()


def test_sampling_probs_survive_extreme_temperature_and_top_p():
    """A request's tiny temperature or top_p (found by the API fuzz tests) must not produce NaN."""
    logits = torch.tensor([[2.0, 1.0, -3.0, float("-inf")]])
    for t, p in [(1e-300, 1.0), (5e-324, 0.9), (1.0, 1e-300), (1e-30, 5e-324), (1e308, 1.0)]:
        probs = sampling_probs(logits, t, p)
        assert torch.isfinite(probs).all() and probs.sum().item() == pytest.approx(1.0)
        if t < 1 or p < 1e-10:
            assert probs[0, 0].item() == 1.0  # the argmax
        sample(probs, None)  # multinomial accepts it


def test_greedy_perfect_match_accepts_all_and_adds_bonus():
    drafts = torch.tensor([1, 2, 3])
    q = torch.stack([_onehot(1), _onehot(2), _onehot(3)])
    p = torch.stack([_onehot(1), _onehot(2), _onehot(3), _onehot(4)])
    assert verify(drafts, q, p, None) == (3, 4)


def test_greedy_early_mismatch_recovers_target_token():
    drafts = torch.tensor([1, 2, 3])
    q = torch.stack([_onehot(1), _onehot(2), _onehot(3)])
    p = torch.stack([_onehot(1), _onehot(0), _onehot(3), _onehot(4)])
    assert verify(drafts, q, p, None) == (1, 0)
    p_first = torch.stack([_onehot(4), _onehot(2), _onehot(3), _onehot(4)])
    assert verify(drafts, q, p_first, None) == (0, 4)


def test_verification_output_follows_the_target_distribution():
    """With q̃ ≠ p̃, the first emitted token must be distributed as p̃ (Leviathan et al. Thm 1).
    20 000 draws, 6 categories: a chi-square with 5 dof exceeds 25 with probability < 2e-4."""
    g = torch.Generator().manual_seed(1234)
    p = torch.tensor([0.05, 0.4, 0.1, 0.2, 0.05, 0.2])
    q = torch.tensor([0.3, 0.1, 0.3, 0.1, 0.1, 0.1])
    n = 20_000
    counts = torch.zeros(6)
    for _ in range(n):
        d = sample(q, g).view(1)
        acc, nxt = verify(d, q.view(1, 6), torch.stack([p, p]), g)
        counts[int(d) if acc == 1 else nxt] += 1
    expected = p * n
    chi2 = ((counts - expected) ** 2 / expected).sum().item()
    assert chi2 < 25, (counts / n, p)


def test_acceptance_rate_is_one_minus_total_variation():
    """P(accept) = Σ min(p, q) = 1 − TV(p, q); 20 000 draws give a standard error < 0.004."""
    g = torch.Generator().manual_seed(7)
    p = torch.tensor([0.5, 0.3, 0.2])
    q = torch.tensor([0.2, 0.3, 0.5])
    n, accepted = 20_000, 0
    for _ in range(n):
        d = sample(q, g).view(1)
        accepted += verify(d, q.view(1, 3), torch.stack([p, p]), g)[0]
    assert accepted / n == pytest.approx(torch.minimum(p, q).sum().item(), abs=0.02)
