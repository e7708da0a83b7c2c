"""`p_error`: the validation fit is scikit-learn's, evaluated by the server's own formula; its
place in bundle.json (round trip, refusals); its test report."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from measure.evaluation import p_error
from server.bundle import BundleError, load_bundle, read_manifest


def _data(n: int = 400, seed: int = 0):
    rng = np.random.default_rng(seed)
    logprob = -rng.exponential(1.0, n)
    bias, variance = rng.exponential(5.0, n), rng.exponential(0.2, n)
    x = np.stack([bias + variance, bias, variance, logprob], 1)  # eu, bias, variance, logprob
    y = (rng.random(n) < 1 / (1 + np.exp(-(-1.5 * logprob - 1.0)))).astype(int)
    return x, y


def test_the_servers_formula_is_scikit_learns_fit():
    from sklearn.linear_model import LogisticRegression

    x, y = _data()
    fit = p_error.fit(x, y, {"data": "synthetic"})
    z = (x - x.mean(0)) / x.std(0)
    ref = LogisticRegression(C=1.0, max_iter=1000).fit(z, y).predict_proba(z)[:, 1]
    np.testing.assert_allclose(p_error.predict(fit, x), ref, atol=1e-9)
    assert fit.features == ["eu", "bias", "variance", "logprob"] and fit.threshold == 0.5
    assert fit.coef[3] < 0  # a lower log-prob, a likelier error
    assert fit.rule().probability(eu=None, bias=1.0, variance=0.0, logprob=-1.0) is None


def test_one_class_is_refused():
    x, _ = _data(20)
    with pytest.raises(ValueError, match="both classes"):
        p_error.fit(x, np.ones(20, dtype=int))


def test_evaluation_counts_and_reliability():
    x, y = _data(600, seed=1)
    fit = p_error.fit(*_data(600, seed=2))
    r = p_error.evaluate(fit, x, y, groups=np.arange(600) // 3, base_rate=float(y.mean()), n_boot=50)
    p = p_error.predict(fit, x)
    assert r["flagged"] == int((p > 0.5).sum()) and r["tokens"] == 600
    assert sum(b["tokens"] for b in r["reliability"]) == 600
    assert r["brier"] < r["brier_constant_base_rate"] and r["ece"] < 0.1
    assert r["auroc"] >= r["single_feature_auroc"]["logprob"] - 0.02
    lo, hi = r["auroc_ci95"]
    assert lo < r["auroc"] < hi


def _bundle(tmp_path, **extra):
    (tmp_path / "bundle.json").write_text(json.dumps({"format": 1, "target": {"path": "t"}, **extra}))
    return tmp_path


def test_written_into_bundle_json_and_read_back(tmp_path):
    folder = _bundle(tmp_path, future_key={"kept": True})
    assert read_manifest(folder).p_error is None and load_bundle(folder, prepare=False).p_error is None
    fit = p_error.fit(*_data())
    fit.fitted_on["test"] = {"auroc": float("nan")}
    p_error.write(folder, fit)
    data = json.loads((folder / "bundle.json").read_text())
    assert data["future_key"] == {"kept": True} and data["p_error"]["version"] == 1
    assert data["p_error"]["fitted_on"]["test"]["auroc"] is None
    rule = load_bundle(folder, prepare=False).p_error
    assert rule == fit.rule()
    x = (3.0, 2.5, 0.5, -0.7)
    z = fit.intercept + sum(c * v for c, v in zip(fit.coef, x, strict=True))
    assert rule.probability(*x) == pytest.approx(1 / (1 + math.exp(-z)), rel=1e-12)


GOOD = {"features": ["eu", "logprob"], "coef": [0.1, -1.0], "intercept": 0.0, "threshold": 0.5}


@pytest.mark.parametrize(
    "entry",
    [
        {**GOOD, "version": 2},
        {**GOOD, "kind": "isotonic"},
        {**GOOD, "features": ["eu", "entropy"]},
        {**GOOD, "features": ["eu", "eu"]},
        {**GOOD, "coef": [0.1]},
        {**GOOD, "threshold": 1.0},
        {**GOOD, "coef": [0.1, float("nan")]},
        {k: v for k, v in GOOD.items() if k != "threshold"},
    ],
)
def test_a_p_error_this_epispec_cannot_apply_is_refused(tmp_path, entry):
    (tmp_path / "bundle.json").write_text(
        json.dumps({"format": 1, "target": {"path": "t"}, "p_error": entry})
    )
    with pytest.raises(BundleError, match="p_error"):
        read_manifest(tmp_path)
