"""Corrections of eu fitted on validation: exact least-squares values by hand, optimality against a
brute-force search, and proof that test arrays cannot reach the fit."""

from __future__ import annotations

import numpy as np
import pytest

from measure.evaluation import estimation
from measure.evaluation.correction import fit_combination, fit_corrections, fit_offset


def test_offset_removes_a_constant_excess():
    truth = np.array([0.0, 0.1, 0.4, 0.2])
    assert fit_offset(truth + 0.3, truth) == pytest.approx(0.3)


def test_offset_by_hand_when_the_clip_binds():
    # eu (1, 3), truth (0, 1). With c ∈ [1, 3) only the second is above c: loss 0 + (3 − c − 1)² = 0 at c = 2
    assert fit_offset(np.array([1.0, 3.0]), np.array([0.0, 1.0])) == pytest.approx(2.0)
    # the unclipped least-squares offset would be mean(eu − truth) = 1.5, which leaves error at both


def test_offset_is_the_exact_minimiser_of_the_clipped_loss():
    rng = np.random.default_rng(0)
    grid = np.linspace(-2, 6, 8001)
    for _ in range(30):
        n = int(rng.integers(1, 25))
        eu, truth = rng.exponential(1.0, n).round(1), np.abs(rng.normal(0, 0.5, n))  # rounding: ties in eu

        def loss(c, eu=eu, truth=truth):
            return float(np.sum((np.maximum(eu - c, 0) - truth) ** 2))

        assert loss(fit_offset(eu, truth)) <= min(loss(g) for g in grid) + 1e-12


def test_combination_recovers_an_exact_linear_truth():
    bias, variance = np.array([0.5, 1.0, 2.0, 0.7]), np.array([0.1, 0.0, 0.3, 0.2])
    p = fit_combination(bias, variance, 0.5 * bias + 2.0 * variance - 0.1)
    assert (p["a_bias"], p["b_variance"], p["c"]) == pytest.approx((0.5, 2.0, -0.1))


def test_combination_holds_a_negative_weight_at_zero():
    # truth falls with bias: unconstrained a < 0, so the fit sets a = 0 and regresses on variance alone
    bias, variance = np.array([0.0, 1.0, 2.0, 3.0]), np.array([0.0, 1.0, 0.0, 1.0])
    truth = 1.0 - 0.2 * bias + 3.0 * variance
    p = fit_combination(bias, variance, truth)
    assert p["a_bias"] == 0.0
    # least squares of truth (1, 3.8, 0.6, 3.4) on variance (0, 1, 0, 1): group means 0.8 and 3.6
    assert (p["b_variance"], p["c"]) == pytest.approx((2.8, 0.8))


def test_combination_is_optimal_among_non_negative_weights():
    rng = np.random.default_rng(1)
    bias, variance = rng.exponential(1.0, 40), rng.exponential(0.1, 40)
    truth = 0.3 * variance - 0.1 * bias + rng.normal(0, 0.05, 40) + 0.5
    p = fit_combination(bias, variance, truth)
    sse = np.sum((p["a_bias"] * bias + p["b_variance"] * variance + p["c"] - truth) ** 2)
    for a in np.linspace(0, 1, 41):
        for b in np.linspace(0, 3, 61):
            r = truth - a * bias - b * variance
            assert sse <= np.sum((r - r.mean()) ** 2) + 1e-12


def test_applied_corrections_are_clipped_at_zero():
    c = fit_corrections(np.array([1.0, 3.0]), np.array([0.0, 0.0]), np.array([0.0, 1.0]))["ours_offset"]
    np.testing.assert_allclose(c.apply(np.array([0.5, 5.0]), np.array([0.0, 0.0])), [0.0, 3.0])
    d = c.describe()
    assert d["kind"] == "offset" and d["fitted_on"] == "validation" and d["validation_tokens"] == 2
    assert d["params"] == {"c": pytest.approx(2.0)} and d["validation_rmse"]["after"] == pytest.approx(0.0)


def _tokens(rng, n: int, truth_scale: float) -> dict[str, np.ndarray]:
    bias, variance = rng.exponential(0.5, n), rng.exponential(0.05, n)
    return {
        "ours.bias": bias,
        "ours.variance": variance,
        "ours.eu": bias + variance,
        "ensemble": truth_scale * (variance + rng.exponential(0.02, n)),
    }


def test_test_arrays_cannot_change_what_is_fitted():
    """The fit's parameters and the constant come from validation arrays only: two very different
    test sets leave them unchanged, a different validation set changes them, and add_derived
    reads no truth from test (it runs on test arrays with EU* replaced by NaN)."""
    rng = np.random.default_rng(2)
    val = _tokens(rng, 50, 1.0)
    fitted = fit_corrections(val["ours.bias"], val["ours.variance"], val["ensemble"])
    val_mean = float(val["ensemble"].mean())
    refit = fit_corrections(val["ours.bias"], val["ours.variance"], 3 * val["ensemble"])
    assert refit["ours_fit"].params != fitted["ours_fit"].params

    outputs = []
    for scale in (1.0, 100.0):
        test = _tokens(rng, 30, scale)
        blind = {**test, "ensemble": np.full(30, np.nan)}
        estimation.add_derived(blind, fitted, val_mean)
        estimation.add_derived(test, fitted, val_mean)
        for key in ("ours_offset.eu", "ours_fit.eu", "constant_val_mean", "constant_zero"):
            np.testing.assert_array_equal(blind[key], test[key])
        outputs.append(test)
    np.testing.assert_array_equal(outputs[0]["constant_val_mean"], np.full(30, val_mean))
    np.testing.assert_array_equal(outputs[1]["constant_val_mean"], np.full(30, val_mean))


def test_fit_rejects_mismatched_arrays():
    with pytest.raises(ValueError, match="one shape"):
        fit_corrections(np.ones(3), np.ones(2), np.ones(3))


def test_the_served_correction_is_the_fitted_one_and_round_trips_through_bundle_json(tmp_path):
    import json

    from measure.evaluation import correction
    from server.bundle import BundleError, load_bundle, read_manifest

    rng = np.random.default_rng(1)
    bias, variance = rng.exponential(2.0, 50), rng.exponential(0.1, 50)
    truth = 0.01 * bias + 0.5 * variance + rng.normal(0, 0.01, 50)
    fits = fit_corrections(bias, variance, truth)
    name, best = correction.best(fits)
    assert name == min(fits, key=lambda n: fits[n].validation_rmse["after"])
    (tmp_path / "bundle.json").write_text(json.dumps({"schema_version": 1, "target": {"path": "t"}, "x": 1}))
    correction.write(tmp_path, name, best, {"questions": 3})
    served = read_manifest(tmp_path).eu_correction
    assert served.kind == best.kind and served.params == best.params
    assert served.fitted_on["correction"] == name and served.fitted_on["questions"] == 3
    assert json.loads((tmp_path / "bundle.json").read_text())["x"] == 1  # other keys kept
    token = [served.apply(float(b), float(v)) for b, v in zip(bias, variance, strict=True)]
    assert token == pytest.approx(best.apply(bias, variance), rel=1e-12, abs=1e-15)
    assert served.apply(None, 0.1) is None and served.apply(float("nan"), 0.1) is None
    for bad, words in (
        ({"version": 2, "kind": "fit", "params": served.params}, "upgrade epispec"),
        ({"version": 1, "kind": "scale", "params": {"c": 1.0}}, "upgrade epispec"),
        ({"version": 1, "kind": "offset", "params": {"a_bias": 1.0}}, "needs finite params"),
        ({"version": 1, "kind": "fit", "params": {"a_bias": -1.0, "b_variance": 0.0, "c": 0.0}}, ">= 0"),
    ):
        (tmp_path / "bundle.json").write_text(
            json.dumps({"schema_version": 1, "target": {"path": "t"}, "eu_correction": bad})
        )
        with pytest.raises(BundleError, match=words):
            load_bundle(tmp_path, prepare=False)
