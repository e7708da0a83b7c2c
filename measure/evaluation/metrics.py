"""Detection and regression metrics in plain numpy, with bootstrap confidence intervals.

Conventions: `scores` are uncertainties (higher = more likely wrong), `labels` are 1 for a wrong
(hallucinated) item and 0 for a correct one. Ties are handled exactly: AUROC counts a tied
pair as 1/2, PRR averages over the random order of tied items, AUPRC steps at distinct scores.

    AUROC  P(score of a wrong item > score of a correct one)           (Mann–Whitney U)
    AUPRC  average precision: Σ_k (R_k − R_{k−1}) P_k over descending distinct thresholds
    PRR    prediction rejection ratio (Malinin 2019): rejecting the most uncertain items first,
           (AR_random − AR_score) / (AR_random − AR_oracle), AR = area under the curve of the
           remaining error mass; 1 = oracle order, 0 = random order
    RMSE   sqrt(mean((estimate − truth)²))
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def _check(scores, labels) -> tuple[np.ndarray, np.ndarray]:
    s, y = np.asarray(scores, dtype=np.float64), np.asarray(labels, dtype=np.float64)
    if s.shape != y.shape or s.ndim != 1:
        raise ValueError(f"scores and labels must be 1-d of one length, got {s.shape} and {y.shape}")
    return s, y


def _defined(y: np.ndarray) -> bool:
    return 0 < y.sum() < len(y)


def average_ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks, tied values sharing their mean rank."""
    order = np.argsort(x, kind="mergesort")
    xs = x[order]
    ranks = np.empty(len(x))
    starts = np.r_[0, np.flatnonzero(np.diff(xs)) + 1]
    ends = np.r_[starts[1:], len(x)]
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + 1 + b) / 2
    return ranks


def auroc(scores, labels) -> float:
    s, y = _check(scores, labels)
    if not _defined(y):
        return float("nan")
    pos = y == 1
    n1, n0 = pos.sum(), (~pos).sum()
    return float((average_ranks(s)[pos].sum() - n1 * (n1 + 1) / 2) / (n1 * n0))


def auprc(scores, labels) -> float:
    s, y = _check(scores, labels)
    if not _defined(y):
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]  # last index of each distinct score
    tp = np.cumsum(y)[last]
    precision, recall = tp / (last + 1), tp / y.sum()
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def _rejection_area(errors_in_rejection_order: np.ndarray) -> float:
    """Mean over k = 0 … n−1 of the error mass left after rejecting the first k items, / n."""
    n = len(errors_in_rejection_order)
    remaining = errors_in_rejection_order.sum() - np.r_[0.0, np.cumsum(errors_in_rejection_order)[:-1]]
    return float(remaining.mean() / n)


def prr(scores, labels) -> float:
    s, y = _check(scores, labels)
    if not _defined(y):
        return float("nan")
    order = np.argsort(-s, kind="mergesort")
    s_sorted, y_sorted = s[order], y[order].copy()
    starts = np.r_[0, np.flatnonzero(np.diff(s_sorted)) + 1]
    ends = np.r_[starts[1:], len(s)]
    for a, b in zip(starts, ends, strict=True):  # random order within ties: expected errors
        y_sorted[a:b] = y_sorted[a:b].mean()
    ar_score = _rejection_area(y_sorted)
    ar_oracle = _rejection_area(np.sort(y)[::-1])
    ar_random = _rejection_area(np.full(len(y), y.mean()))
    return float((ar_random - ar_score) / (ar_random - ar_oracle))


def rmse(estimate, truth) -> float:
    e, t = _check(estimate, truth)
    return float(np.sqrt(np.mean((e - t) ** 2)))


def precision_recall_at(scores, labels, threshold: float) -> dict:
    """Flag = score > threshold (as the server flags eu > threshold)."""
    s, y = _check(scores, labels)
    flag = s > threshold
    tp = float((flag & (y == 1)).sum())
    return {
        "threshold": float(threshold),
        "flagged": int(flag.sum()),
        "precision": tp / flag.sum() if flag.any() else float("nan"),
        "recall": tp / y.sum() if y.any() else float("nan"),
        "false_positive_rate": float((flag & (y == 0)).sum() / max(1, (y == 0).sum())),
    }


def bootstrap_ci(metric: Callable[..., float], *arrays, n: int = 1000, level: float = 0.95,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile interval of `metric(*resampled arrays)` over n resamples of the items.
    Resamples where the metric is undefined (NaN) are skipped."""
    arrs = [np.asarray(a) for a in arrays]
    rng = np.random.default_rng(seed)
    vals = []
    for _ in range(n):
        idx = rng.integers(0, len(arrs[0]), len(arrs[0]))
        v = metric(*(a[idx] for a in arrs))
        if not np.isnan(v):
            vals.append(v)
    if not vals:
        return float("nan"), float("nan")
    lo, hi = np.quantile(vals, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def with_ci(metric: Callable[..., float], *arrays, n: int = 1000, seed: int = 0) -> dict:
    lo, hi = bootstrap_ci(metric, *arrays, n=n, seed=seed)
    return {"value": metric(*arrays), "ci95": [lo, hi]}
