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

Bootstrap CIs resample items, or with `groups` (one cluster id per item: the problem a token
comes from) whole clusters with replacement, every item of a drawn cluster kept — tokens of one
problem are not independent, and resampling them one by one makes intervals too narrow.

Estimates of EU against the ground truth EU* (`truth`): RMSE alone cannot rank them when EU* is
small (a constant 0 scores about as well as anything), so also

    top-decile RMSE  RMSE on the items whose truth is at least its 0.9 quantile (where it matters)
    Pearson          linear correlation; NaN for a constant estimate (it ranks nothing)
    Spearman         Pearson of the average ranks (ties share their mean rank)
    scale fit        least squares truth ≈ slope · estimate + intercept: slope 1, intercept 0 is a
                     calibrated scale; NaN for a constant estimate
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
    if len(x) == 0:
        return np.empty(0)
    order = np.argsort(x, kind="mergesort")
    new = np.r_[True, np.diff(x[order]) != 0]  # first item of each run of equal values
    starts = np.flatnonzero(new)
    ends = np.r_[starts[1:], len(x)]
    ranks = np.empty(len(x))
    ranks[order] = ((starts + 1 + ends) / 2)[np.cumsum(new) - 1]
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


def top_decile_rmse(estimate, truth, q: float = 0.9) -> float:
    """RMSE on the items with truth ≥ its q quantile (ties at the cut are all kept)."""
    e, t = _check(estimate, truth)
    top = t >= np.quantile(t, q)
    return rmse(e[top], t[top])


def pearson(estimate, truth) -> float:
    e, t = _check(estimate, truth)
    if len(e) < 2 or e.min() == e.max() or t.min() == t.max():  # a mean's rounding is not variation
        return float("nan")
    de, dt = e - e.mean(), t - t.mean()
    return float((de * dt).sum() / np.sqrt((de * de).sum() * (dt * dt).sum()))


def spearman(estimate, truth) -> float:
    e, t = _check(estimate, truth)
    return pearson(average_ranks(e), average_ranks(t))


def scale_fit(estimate, truth) -> tuple[float, float]:
    """(slope, intercept) of the least-squares line truth ≈ slope · estimate + intercept."""
    e, t = _check(estimate, truth)
    if len(e) < 2 or e.min() == e.max():
        return float("nan"), float("nan")
    de = e - e.mean()
    slope = (de * (t - t.mean())).sum() / (de * de).sum()
    return float(slope), float(t.mean() - slope * e.mean())


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


def bootstrap_ci(
    metric: Callable[..., float],
    *arrays,
    n: int = 1000,
    level: float = 0.95,
    seed: int = 0,
    groups=None,
) -> tuple[float, float]:
    """Percentile interval of `metric(*resampled arrays)` over n resamples of the items (of the
    clusters, with `groups`). Resamples where the metric is undefined (NaN) are skipped."""
    arrs = [np.asarray(a) for a in arrays]
    vals = [metric(*(a[idx] for a in arrs)) for idx in resamples(len(arrs[0]), n, seed, groups)]
    return percentile_interval(vals, level)


def resamples(size: int, n: int, seed: int = 0, groups=None):
    """n bootstrap index arrays; the same seed gives the same resamples to every metric. Without
    `groups`: items drawn with replacement, [size] each. With `groups` [size] (a cluster id per
    item): clusters drawn with replacement, as many as there are, each contributing all its
    items (so a resample's length varies); with one item per cluster, the item resamples."""
    rng = np.random.default_rng(seed)
    if groups is None:
        for _ in range(n):
            yield rng.integers(0, size, size)
        return
    g = np.asarray(groups)
    if g.shape != (size,):
        raise ValueError(f"groups must hold one cluster id per item ({size}), got shape {g.shape}")
    _, inverse = np.unique(g, return_inverse=True)
    order = np.argsort(inverse, kind="stable")
    members = np.split(order, np.cumsum(np.bincount(inverse))[:-1])  # items of each cluster
    k = len(members)
    for _ in range(n):
        yield np.concatenate([members[c] for c in rng.integers(0, k, k)])


def percentile_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of bootstrap values, the undefined (NaN) ones skipped."""
    v = np.asarray(values, dtype=np.float64)
    v = v[~np.isnan(v)]
    if not len(v):
        return float("nan"), float("nan")
    lo, hi = np.quantile(v, [(1 - level) / 2, (1 + level) / 2])
    return float(lo), float(hi)


def with_ci(metric: Callable[..., float], *arrays, n: int = 1000, seed: int = 0, groups=None) -> dict:
    lo, hi = bootstrap_ci(metric, *arrays, n=n, seed=seed, groups=groups)
    return {"value": metric(*arrays), "ci95": [lo, hi]}
