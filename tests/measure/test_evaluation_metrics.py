"""Detection and regression metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from measure.evaluation.metrics import (
    auprc,
    auroc,
    average_ranks,
    bootstrap_ci,
    pearson,
    precision_recall_at,
    prr,
    resamples,
    rmse,
    scale_fit,
    spearman,
    top_decile_rmse,
)

# sorted by score: 0.8 (wrong), 0.4 (ok), 0.35 (wrong), 0.1 (ok)
SCORES = [0.1, 0.4, 0.35, 0.8]
LABELS = [0, 0, 1, 1]


def test_auroc_counts_ordered_pairs():
    # wrong 0.35 beats 0.1 only; wrong 0.8 beats both: 3 of 4 pairs
    assert auroc(SCORES, LABELS) == pytest.approx(0.75)


def test_auroc_ties_count_half():
    assert auroc([0.5, 0.5, 0.5], [0, 1, 0]) == pytest.approx(0.5)
    assert auroc([1, 2, 2], [0, 0, 1]) == pytest.approx(0.75)  # 1 win + 1 tie of 2 pairs


def test_auprc_is_average_precision():
    # recall 0.5 at precision 1/1, recall 1 at precision 2/3
    assert auprc(SCORES, LABELS) == pytest.approx(0.5 * 1 + 0.5 * 2 / 3)


def test_auprc_ties_step_once():
    # one threshold covering all: precision 1/3 at recall 1
    assert auprc([1.0, 1.0, 1.0], [1, 0, 0]) == pytest.approx(1 / 3)


def test_prr_by_hand():
    # remaining error mass after rejecting k = 0..3 (of n = 4), mean / n:
    # score order 1,0,1,0 -> 2,1,1,0 -> 0.25; oracle 2,1,0,0 -> 0.1875; random 2,1.5,1,.5 -> 0.3125
    assert prr(SCORES, LABELS) == pytest.approx((0.3125 - 0.25) / (0.3125 - 0.1875))


def test_prr_oracle_and_reversed():
    y = [1, 1, 0, 0, 0]
    assert prr([5, 4, 3, 2, 1], y) == pytest.approx(1.0)
    assert prr([1, 2, 3, 4, 5], y) < 0
    assert prr([1, 1, 1, 1, 1], y) == pytest.approx(0.0)  # all tied = random order


def test_rmse():
    assert rmse([1, 2, 3], [1, 2, 5]) == pytest.approx(math.sqrt(4 / 3))
    assert rmse([0.5], [0.5]) == 0.0


def test_undefined_with_one_class():
    assert math.isnan(auroc([0.1, 0.2], [0, 0]))
    assert math.isnan(auprc([0.1, 0.2], [1, 1]))
    assert math.isnan(prr([0.1, 0.2], [0, 0]))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="one length"):
        auroc([0.1, 0.2], [1])


def test_precision_recall_at_threshold():
    r = precision_recall_at(SCORES, LABELS, 0.3)  # flags 0.4, 0.35, 0.8
    assert r["flagged"] == 3
    assert r["precision"] == pytest.approx(2 / 3)
    assert r["recall"] == pytest.approx(1.0)
    assert r["false_positive_rate"] == pytest.approx(0.5)


def test_bootstrap_ci_brackets_the_estimate():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 400)
    s = y + rng.normal(0, 1.0, 400)
    lo, hi = bootstrap_ci(auroc, s, y, n=300)
    assert lo < auroc(s, y) < hi
    assert 0.5 < lo and hi < 1.0


def test_cluster_resamples_keep_clusters_whole():
    """Problems 7 (3 tokens), 8 (1) and 9 (2): every resample is 3 drawn clusters, each with all
    its tokens, so its length is the sum of the drawn clusters' sizes."""
    groups = np.array([7, 7, 9, 7, 8, 9])
    members = {7: {0, 1, 3}, 8: {4}, 9: {2, 5}}
    for idx in resamples(6, 50, seed=1, groups=groups):
        drawn = [g for g in (7, 8, 9) for _ in range(int(np.sum(groups[idx] == g) // len(members[g])))]
        assert len(drawn) == 3
        for g in (7, 8, 9):  # a cluster's tokens appear equally often
            counts = [int(np.sum(idx == i)) for i in members[g]]
            assert len(set(counts)) == 1
    # one token per cluster: exactly the item resamples of the same seed
    for a, b in zip(resamples(5, 20, seed=3), resamples(5, 20, seed=3, groups=np.arange(5)), strict=True):
        assert a.tolist() == b.tolist()


def test_cluster_bootstrap_widens_the_interval_of_correlated_tokens():
    """20 problems of 10 identical tokens each carry 20 items of information, not 200: the
    cluster interval of the mean matches the interval of 20 independent items and is about
    sqrt(10) times wider than the token bootstrap's."""
    rng = np.random.default_rng(0)
    per_problem = rng.normal(0, 1, 20)
    x, groups = np.repeat(per_problem, 10), np.repeat(np.arange(20), 10)
    tok = np.diff(bootstrap_ci(np.mean, x, n=2000))[0]
    clu = np.diff(bootstrap_ci(np.mean, x, n=2000, groups=groups))[0]
    ind = np.diff(bootstrap_ci(np.mean, per_problem, n=2000))[0]
    assert 2.5 < clu / tok < 4.0 and abs(clu / ind - 1) < 0.15
    with pytest.raises(ValueError, match="one cluster id per item"):
        next(resamples(5, 1, groups=[0, 1]))


# --- estimates against EU*


def test_spearman_of_a_monotone_transform_is_one():
    x = np.array([0.3, 0.01, 2.0, 0.5, 0.02])
    assert spearman(np.exp(3 * x), x) == pytest.approx(1.0)
    assert spearman(-(x**3), x) == pytest.approx(-1.0)
    assert pearson(np.exp(3 * x), x) < 1.0  # not linear


def test_spearman_with_ties_by_hand():
    # ranks of [1, 2, 2, 3]: 1, 2.5, 2.5, 4; of [1, 2, 3, 4]: 1..4
    # pearson of (−1.5, 0, 0, 1.5) and (−1.5, −.5, .5, 1.5): 4.5 / sqrt(4.5 · 5)
    assert spearman([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(4.5 / math.sqrt(4.5 * 5))


def test_average_ranks_share_ties():
    np.testing.assert_array_equal(average_ranks(np.array([3.0, 1.0, 3.0, 2.0, 3.0])), [4, 1, 4, 2, 4])


def test_pearson_by_hand_and_undefined_for_a_constant():
    # deviations (−1, 0, 1) and (−2, 1, 1): 3 / sqrt(2 · 6)
    assert pearson([1, 2, 3], [0, 3, 3]) == pytest.approx(3 / math.sqrt(12))
    assert math.isnan(pearson([0.2, 0.2, 0.2], [0, 1, 2]))
    assert math.isnan(spearman(np.zeros(4), [0, 1, 2, 3]))


def test_scale_fit_recovers_slope_and_intercept():
    x = np.array([0.0, 0.5, 1.0, 4.0])
    assert scale_fit(x, 2 * x + 1) == pytest.approx((2.0, 1.0))
    # least squares through (0,0), (1,1), (2,3): slope 1.5, intercept −1/6
    assert scale_fit([0, 1, 2], [0, 1, 3]) == pytest.approx((1.5, -1 / 6))
    assert all(math.isnan(v) for v in scale_fit([1, 1, 1], [0, 1, 2]))


def test_top_decile_rmse_uses_the_largest_truths():
    truth = np.arange(20, dtype=float)  # 0.9 quantile 17.1: items 18 and 19
    est = truth.copy()
    est[18], est[0] = 21.0, 100.0  # the error at 0 is outside the top decile
    assert top_decile_rmse(est, truth) == pytest.approx(math.sqrt(9 / 2))
    assert rmse(est, truth) > top_decile_rmse(est, truth)
