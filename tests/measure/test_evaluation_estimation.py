"""Every estimate against EU*: the shared bootstrap gives exactly the per-metric values and CIs of
metrics.py, the constants are baselines, and the reduction is measured against the best of them."""

from __future__ import annotations

import numpy as np
import pytest

from measure.evaluation import estimation, metrics
from measure.evaluation.correction import fit_corrections


def _tokens(n: int = 60, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    truth = rng.exponential(0.05, n)
    t = {
        "ensemble": truth,
        "ours.bias": 0.5 + 3 * truth + rng.exponential(0.1, n),
        "ours.variance": rng.exponential(0.01, n),
    }
    t["ours.eu"] = t["ours.bias"] + t["ours.variance"]
    for k in ("no_ddd.eu", "no_osd.eu", "single.bias", "tokur", "mc_dropout"):
        t[k] = truth * rng.uniform(0.5, 1.5) + rng.exponential(0.02, n)
    t["tokur"][:5] = 0.0  # ties
    return t


def test_estimation_equals_metrics_with_the_same_resamples():
    t = _tokens()
    estimation.add_derived(t, fit_corrections(t["ours.bias"], t["ours.variance"], t["ensemble"]), 0.04)
    r = estimation.estimation(t, n_boot=40)
    fns = {
        "rmse": metrics.rmse,
        "rmse_top_decile": metrics.top_decile_rmse,
        "spearman": metrics.spearman,
        "pearson": metrics.pearson,
    }
    for m, key in estimation.present(t).items():
        for name, fn in fns.items():
            ref = metrics.with_ci(fn, t[key], t["ensemble"], n=40)
            np.testing.assert_equal([r[name][m], *r[f"{name}_ci95"][m]], [ref["value"], *ref["ci95"]])
        assert (r["scale_slope"][m], r["scale_intercept"][m]) == pytest.approx(
            metrics.scale_fit(t[key], t["ensemble"]), nan_ok=True
        )
    gap = metrics.with_ci(
        lambda a, b, y: metrics.spearman(a, y) - metrics.spearman(b, y),
        t["ours.eu"],
        t["tokur"],
        t["ensemble"],
        n=40,
    )
    assert r["spearman_gap_vs_ours"]["tokur"]["value"] == pytest.approx(gap["value"], abs=1e-12)
    assert r["spearman_gap_vs_ours"]["tokur"]["ci95"] == pytest.approx(gap["ci95"], abs=1e-12)
    assert "ours" not in r["spearman_gap_vs_ours"]
    assert np.isnan(r["spearman"]["constant_zero"]) and np.isnan(r["scale_slope"]["constant_val_mean"])


def test_constants_come_from_the_given_validation_mean():
    t = _tokens()
    estimation.add_derived(t, {}, val_mean=0.25)
    np.testing.assert_array_equal(t["constant_val_mean"], np.full(60, 0.25))
    np.testing.assert_array_equal(t["constant_zero"], np.zeros(60))
    m, sd = t["ensemble"].mean(), t["ensemble"].std()
    assert metrics.rmse(t["constant_val_mean"], t["ensemble"]) == pytest.approx(
        np.sqrt(sd**2 + (m - 0.25) ** 2)
    )


def test_reduction_counts_the_trivial_baselines():
    rmse = {m: 1.0 for m in estimation.ESTIMATES}
    rmse |= {"ours": 0.5, "ours_fit": 0.2, "tokur": 0.8, "constant_zero": 0.4}
    r = estimation.reductions(rmse)
    assert r["best_baseline"] == "constant_zero"
    assert r["rmse_reduction_vs_best_baseline"] == pytest.approx(1 - 0.5 / 0.4)
    assert r["rmse_reduction_vs_best_baseline_by_variant"]["ours_fit"] == pytest.approx(0.5)
    assert r["best_external_baseline"] == "tokur"  # corrections are never the bar
    assert set(estimation.BASELINES) >= {"constant_zero", "constant_val_mean", "tokur"}
    assert not set(estimation.BASELINES) & set(estimation.OURS_VARIANTS)
