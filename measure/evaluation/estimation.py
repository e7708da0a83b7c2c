"""Every estimate of the token EU against the ground truth EU* (the deep ensemble's mutual
information), and the per-token arrays of the estimates that are derived, not scored.

Methods (per-token key in the scored arrays):
    ours, ours_offset, ours_fit   eu of the OSD + DDD drafts, raw and with a correction fitted on
                                  validation (`correction.py`)
    no_ddd, no_osd, single_draft, variance_only   ablations
    tokur, mc_dropout             mutual information of S perturbed target copies
    constant_zero                 0 on every token
    constant_val_mean             the mean of EU* over the validation tokens, on every token
    upper_bound                   M instances of EU*'s own family (a bundle's evaluation)
    eu_star, truth2               a bundle's two ground truths, each scored against the other

"Baselines" are all methods but ours, its corrections and the references (the upper bound and the
ground truths): the trivial constants count, so an estimator that always says 0 sets the bar
`rmse_reduction_vs_best_baseline` is measured against. The ground truth itself is never a method.
"""

from __future__ import annotations

import numpy as np

from measure.evaluation import metrics
from measure.evaluation.correction import Correction

ESTIMATES = {
    "ours": "ours.eu",
    "ours_offset": "ours_offset.eu",
    "ours_fit": "ours_fit.eu",
    "no_ddd": "no_ddd.eu",
    "no_osd": "no_osd.eu",
    "single_draft": "single.bias",
    "variance_only": "ours.variance",
    "tokur": "tokur",
    "mc_dropout": "mc_dropout",
    "constant_zero": "constant_zero",
    "constant_val_mean": "constant_val_mean",
    "upper_bound": "upper_bound",
    "eu_star": "eu_star",
    "truth2": "truth2",
}
OURS_VARIANTS = ("ours", "ours_offset", "ours_fit")
REFERENCES = ("upper_bound", "eu_star", "truth2")
BASELINES = tuple(m for m in ESTIMATES if m not in OURS_VARIANTS + REFERENCES)
CI_METRICS = ("rmse", "rmse_top_decile", "spearman", "pearson")  # each gets a bootstrap 95% CI


def add_derived(tokens: dict[str, np.ndarray], corrections: dict[str, Correction], val_mean: float) -> None:
    """Add the corrected eu and the two constants to a dict of test arrays, in place. Everything
    that parametrises them (`corrections`, `val_mean`) was fitted on validation."""
    n = len(tokens["ours.eu"])
    tokens["constant_zero"] = np.zeros(n)
    tokens["constant_val_mean"] = np.full(n, val_mean)
    for name, c in corrections.items():
        tokens[f"{name}.eu"] = c.apply(tokens["ours.bias"], tokens["ours.variance"])


def _point(est: dict[str, np.ndarray], truth: np.ndarray) -> dict[str, dict[str, float]]:
    """{metric: {method: value}} for CI_METRICS and the Spearman gap to ours. Truth's ranks and
    top-decile mask are computed once and shared (the bootstrap calls this on every resample);
    the values are those of metrics.rmse, top_decile_rmse, spearman and pearson."""
    t_ranks = metrics.average_ranks(truth)
    top = truth >= np.quantile(truth, 0.9)
    out: dict[str, dict[str, float]] = {k: {} for k in (*CI_METRICS, "spearman_gap_vs_ours")}
    for m, e in est.items():
        out["rmse"][m] = metrics.rmse(e, truth)
        out["rmse_top_decile"][m] = metrics.rmse(e[top], truth[top])
        out["spearman"][m] = metrics.pearson(metrics.average_ranks(e), t_ranks)
        out["pearson"][m] = metrics.pearson(e, truth)
    for m in est:
        if m != "ours":
            out["spearman_gap_vs_ours"][m] = out["spearman"]["ours"] - out["spearman"][m]
    return out


def present(tokens: dict[str, np.ndarray]) -> dict[str, str]:
    """The methods of ESTIMATES whose arrays `tokens` has (a bundle's evaluation has no ablations)."""
    return {m: k for m, k in ESTIMATES.items() if k in tokens}


def estimation(
    tokens: dict[str, np.ndarray],
    n_boot: int,
    seed: int = 0,
    truth: str = "ensemble",
    groups: np.ndarray | None = None,
) -> dict:
    """Every method present in `tokens` against the ground truth `tokens[truth]`:
    {metric: {method: value}} and {metric_ci95: {method: [lo, hi]}} for CI_METRICS;
    scale_slope / scale_intercept (least squares EU* ≈ slope · estimate + intercept); and
    spearman_gap_vs_ours: Spearman(ours) − Spearman(method), {value, ci95}, from the same
    resampled tokens for both (a paired bootstrap), so "ours ranks better" is one interval.
    All CIs use the same n_boot resamples of the tokens (those of metrics.bootstrap_ci), of whole
    clusters with `groups` (a cluster id per token)."""
    est = {m: tokens[k] for m, k in present(tokens).items() if k != truth}
    truth = tokens[truth]
    point = _point(est, truth)
    boot = [
        _point({m: e[idx] for m, e in est.items()}, truth[idx])
        for idx in metrics.resamples(len(truth), n_boot, seed, groups)
    ]

    def ci(metric: str, m: str) -> list[float]:
        return list(metrics.percentile_interval([b[metric][m] for b in boot]))

    out: dict = {}
    for metric in CI_METRICS:
        out[metric] = point[metric]
        out[f"{metric}_ci95"] = {m: ci(metric, m) for m in est}
    out["scale_slope"], out["scale_intercept"] = {}, {}
    for m, e in est.items():
        out["scale_slope"][m], out["scale_intercept"][m] = metrics.scale_fit(e, truth)
    out["spearman_gap_vs_ours"] = {
        m: {"value": v, "ci95": ci("spearman_gap_vs_ours", m)}
        for m, v in point["spearman_gap_vs_ours"].items()
    }
    return out


def rmse_by_condition(tokens: dict[str, np.ndarray], truth: str = "ensemble") -> dict[str, float]:
    return {m: metrics.rmse(tokens[k], tokens[truth]) for m, k in present(tokens).items() if k != truth}


def reductions(rmse: dict[str, float]) -> dict:
    """1 − RMSE(variant) / RMSE(best baseline), for ours and each correction; and against the
    best perturbation baseline (TokUR, MC dropout); over the methods `rmse` has."""
    best = min((m for m in BASELINES if m in rmse), key=rmse.get)
    best_ext = min((m for m in ("tokur", "mc_dropout") if m in rmse), key=rmse.get)
    return {
        "rmse_reduction_vs_best_baseline": 1 - rmse["ours"] / rmse[best],
        "best_baseline": best,
        "rmse_reduction_vs_best_external_baseline": 1 - rmse["ours"] / rmse[best_ext],
        "best_external_baseline": best_ext,
        "rmse_reduction_vs_best_baseline_by_variant": {
            v: 1 - rmse[v] / rmse[best] for v in OURS_VARIANTS if v in rmse
        },
    }
