"""`p_wrong`: the validation fit, its evaluation in the server's own formula, and its place in
bundle.json."""

from __future__ import annotations

import json

import numpy as np
import pytest

from measure.evaluation import p_wrong
from server.bundle import BundleError, PWrongFit, read_manifest


def test_the_servers_formula_is_scikit_learns_fit():
    from sklearn.linear_model import LogisticRegression

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 2)) + [5.0, 9.0]  # mean, max eu (nats)
    y = (x[:, 0] + 0.5 * rng.normal(size=200) > 5).astype(int)
    fit = p_wrong.fit(x, y, {"data": "synthetic"})
    ref = LogisticRegression(C=1.0).fit(x, y).predict_proba(x)[:, 1]
    assert np.allclose(p_wrong.predict(fit, x), ref, atol=1e-9)
    assert fit.features == ["mean_eu", "max_eu"] and fit.fitted_on["responses"] == 200
    assert fit.probability({"mean_eu": None, "max_eu": 3.0}) is None


def test_one_class_gives_laplaces_constant():
    fit = p_wrong.fit(np.ones((9, 2)), np.ones(9, dtype=int))
    assert fit.coef == [0.0, 0.0]
    assert p_wrong.predict(fit, np.array([[0.0, 100.0]]))[0] == pytest.approx(10 / 11)
    assert "one class" in fit.fitted_on["method"]


def test_scores_are_proper():
    y = np.array([1, 0, 1, 1])
    s = p_wrong.scores(np.array([0.9, 0.1, 0.8, 0.7]), y, base_rate=0.75)
    assert s["brier"] == pytest.approx((0.01 + 0.01 + 0.04 + 0.09) / 4)
    assert s["brier_constant_base_rate"] == pytest.approx((3 * 0.0625 + 0.5625) / 4)
    assert s["auroc"] == 1.0


def _bundle(tmp_path, **extra):
    (tmp_path / "bundle.json").write_text(json.dumps({"format": 1, "target": {"path": "t"}, **extra}))
    return tmp_path


def test_written_into_bundle_json_and_read_back(tmp_path):
    folder = _bundle(tmp_path, future_key={"kept": True})
    assert read_manifest(folder).p_wrong is None  # an old bundle loads unchanged
    fit = p_wrong.fit(np.array([[1.0, 2.0], [3.0, 9.0], [2.0, 3.0]]), np.array([0, 1, 0]))
    fit.fitted_on["test"] = {"auroc": float("nan")}
    p_wrong.write(folder, fit)
    data = json.loads((folder / "bundle.json").read_text())
    assert data["future_key"] == {"kept": True} and data["schema_version"] == 1
    assert data["p_wrong"]["version"] == 1 and data["p_wrong"]["fitted_on"]["test"]["auroc"] is None
    back = read_manifest(folder).p_wrong
    assert back.coef == fit.coef and back.intercept == fit.intercept


@pytest.mark.parametrize(
    "entry",
    [
        {"version": 2, "features": ["mean_eu"], "coef": [1.0], "intercept": 0.0},
        {"features": ["mean_eu", "max_eu"], "coef": [1.0], "intercept": 0.0},
        {"features": ["median_eu"], "coef": [1.0], "intercept": 0.0},
    ],
)
def test_a_fit_this_epispec_cannot_apply_is_refused(tmp_path, entry):
    with pytest.raises(BundleError, match="p_wrong"):
        read_manifest(_bundle(tmp_path, p_wrong=entry))


def test_probability_is_the_logistic_of_the_linear_score():
    fit = PWrongFit(features=["mean_eu", "max_eu"], coef=[0.5, -0.25], intercept=-1.0)
    z = -1.0 + 0.5 * 4.0 - 0.25 * 2.0
    assert fit.probability({"mean_eu": 4.0, "max_eu": 2.0}) == pytest.approx(1 / (1 + np.exp(-z)))
    assert fit.probability({"mean_eu": -4000.0, "max_eu": 0.0}) == 0.0  # no overflow
