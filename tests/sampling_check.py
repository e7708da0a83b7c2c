"""A statistical check shared by the engines' tests: sampled pairs of first tokens against the
target's exact processed distribution."""

from __future__ import annotations

import collections

import torch

from server.engine.speculative import sampling_probs


@torch.inference_mode()
def assert_pairs_follow_target(
    counts: collections.Counter, target, ids: list[int], temperature: float, top_p: float
) -> float:
    """`counts` of (t1, t2) over n seeded requests against n·p̃(t1)·p̃(t2|t1), p̃ the target's
    distribution after temperature and top-p. Pairs with expected count ≥ 10 are tested, the
    rest lumped; a chi-square above dof + 6·sqrt(2·dof) has p < 1e-4. Returns the chi-square."""
    n = sum(counts.values())
    p1 = sampling_probs(target(input_ids=torch.tensor([ids])).logits[0, -1], temperature, top_p)
    firsts = (p1 > 0).nonzero().flatten().tolist()
    batch = torch.tensor([ids + [t] for t in firsts])
    p2 = sampling_probs(target(input_ids=batch).logits[:, -1], temperature, top_p)  # [F, V]
    expected = {
        (t1, t2): (p1[t1] * p2[i, t2]).item() * n
        for i, t1 in enumerate(firsts)
        for t2 in (p2[i] > 0).nonzero().flatten().tolist()
    }
    big = [c for c, e in expected.items() if e >= 10]
    assert len(big) >= 3, "the test needs several likely pairs to mean anything"
    obs = [counts[c] for c in big] + [n - sum(counts[c] for c in big)]
    exp = [expected[c] for c in big] + [n - sum(expected[c] for c in big)]
    chi2 = sum((o - e) ** 2 / e for o, e in zip(obs, exp, strict=True) if e > 0)
    dof = len(obs) - 1
    print(f"\nT={temperature} top_p={top_p}: chi2 {chi2:.1f} over {dof} dof, {len(counts)} pairs seen")
    assert chi2 < dof + 6 * (2 * dof) ** 0.5, (chi2, dof)
    assert set(counts) <= set(expected), "a pair of probability zero was sampled"
    return chi2
