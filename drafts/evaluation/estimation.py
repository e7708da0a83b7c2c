"""Every estimate of the token EU against the ground truth EU* (the deep ensemble's mutual
information), and the per-token arrays of the estimates that are derived, not scored.

Methods (per-token key in the scored arrays):
    ours, ours_offset, ours_fit   eu of the OSD + DDD drafts, raw and with a correction fitted on
                                  validation (`correction.py`)
    no_ddd, no_osd, single_draft, variance_only   ablations
    tokur, mc_dropout             mutual information of S perturbed target copies
    constant_zero                 0 on every token
    constant_val_mean             the mean of EU* over the validation tokens, on every token

"Baselines" are all methods but ours and its corrections: the trivial constants count, so an
estimator that always says 0 sets the bar `rmse_reduction_vs_best_baseline` is measured against.
"""

from __future__ import annotations

import numpy as np

from drafts.evaluation import metrics
from drafts.evaluation.correction import Correction

ESTIMATES = {"ours": "ours.eu", "ours_offset": "ours_offset.eu", "ours_fit": "ours_fit.eu",
             "no_ddd": "no_ddd.eu", "no_osd": "no_osd.eu", "single_draft": "single.bias",
             "variance_only": "ours.variance", "tokur": "tokur", "mc_dropout": "mc_dropout",
             "constant_zero": "constant_zero", "constant_val_mean": "constant_val_mean"}
OURS_VARIANTS = ("ours", "ours_offset", "ours_fit")
BASELINES = tuple(m for m in ESTIMATES if m not in OURS_VARIANTS)
# metric name -> fn(estimate, truth); each gets a bootstrap 95% CI
WITH_CI = {"rmse": metrics.rmse, "rmse_top_decile": metrics.top_decile_rmse,
           "spearman": metrics.spearman, "pearson": metrics.pearson}


def add_derived(tokens: dict[str, np.ndarray], corrections: dict[str, Correction], val_mean: float) -> None:
    """Add the corrected eu and the two constants to a dict of test arrays, in place. Everything
    that parametrises them (`corrections`, `val_mean`) was fitted on validation."""
    n = len(tokens["ensemble"])
    tokens["constant_zero"] = np.zeros(n)
    tokens["constant_val_mean"] = np.full(n, val_mean)
    for name, c in corrections.items():
        tokens[f"{name}.eu"] = c.apply(tokens["ours.bias"], tokens["ours.variance"])


def _spearman_gap(ours, other, truth) -> float:
    return metrics.spearman(ours, truth) - metrics.spearman(other, truth)


def estimation(tokens: dict[str, np.ndarray], n_boot: int) -> dict:
    """{metric: {method: value}} and {metric_ci95: {method: [lo, hi]}} for the metrics in WITH_CI;
    scale_slope / scale_intercept (least squares EU* ≈ slope · estimate + intercept); and
    spearman_gap_vs_ours: Spearman(ours) − Spearman(method) with a paired bootstrap CI (the
    same resampled tokens for both), so "ours ranks better" can be read off one interval."""
    truth = tokens["ensemble"]
    out: dict = {}
    for name, fn in WITH_CI.items():
        out[name], out[f"{name}_ci95"] = {}, {}
        for m, key in ESTIMATES.items():
            r = metrics.with_ci(fn, tokens[key], truth, n=n_boot)
            out[name][m], out[f"{name}_ci95"][m] = r["value"], r["ci95"]
    out["scale_slope"], out["scale_intercept"] = {}, {}
    for m, key in ESTIMATES.items():
        out["scale_slope"][m], out["scale_intercept"][m] = metrics.scale_fit(tokens[key], truth)
    out["spearman_gap_vs_ours"] = {m: metrics.with_ci(_spearman_gap, tokens["ours.eu"], tokens[ESTIMATES[m]],
                                                      truth, n=n_boot)
                                   for m in ESTIMATES if m != "ours"}
    return out


def rmse_by_condition(tokens: dict[str, np.ndarray]) -> dict[str, float]:
    return {m: metrics.rmse(tokens[k], tokens["ensemble"]) for m, k in ESTIMATES.items()}


def reductions(rmse: dict[str, float]) -> dict:
    """1 − RMSE(variant) / RMSE(best baseline), for ours and each correction; and against the
    best perturbation baseline (TokUR, MC dropout)."""
    best = min(BASELINES, key=rmse.get)
    best_ext = min(("tokur", "mc_dropout"), key=rmse.get)
    return {"rmse_reduction_vs_best_baseline": 1 - rmse["ours"] / rmse[best], "best_baseline": best,
            "rmse_reduction_vs_best_external_baseline": 1 - rmse["ours"] / rmse[best_ext],
            "best_external_baseline": best_ext,
            "rmse_reduction_vs_best_baseline_by_variant": {v: 1 - rmse[v] / rmse[best] for v in OURS_VARIANTS}}
