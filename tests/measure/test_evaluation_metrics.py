"""Detection and regression metrics against values computed by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from measure.evaluation.metrics import auprc, auroc, bootstrap_ci, precision_recall_at, prr, rmse

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
