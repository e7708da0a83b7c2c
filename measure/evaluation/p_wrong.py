"""`p_wrong`: a calibrated probability that a response is wrong, from its eu statistics.

Fitted on validation responses only (their final answers checked, `labels.response_wrong`):
a logistic regression (scikit-learn, L2 with C = 1) of the label on the features of
`server.bundle.P_WRONG_FEATURES` — the mean and max eu over the response's tokens (nats), as the
server's response summary reports them — then scored on test (Brier score, log loss, AUROC,
against the constant validation base rate). The fit is stored in bundle.json as
`server.bundle.PWrongFit`, which the server evaluates itself (no scikit-learn in the server).

When validation holds one class only (a weak target gets every answer wrong), a logistic fit is
undefined; the fit is then the constant (k + 1)/(n + 2) (Laplace's rule: k wrong of n), coef 0,
and `fitted_on.method` says so.
"""

from __future__ import annotations

import math

import numpy as np

from measure.evaluation import metrics
from server.bundle import P_WRONG_FEATURES, P_WRONG_VERSION, PWrongFit


def features(eu_per_response: list[np.ndarray]) -> np.ndarray:
    """[n, 2]: (mean, max) eu of each response's tokens (nats)."""
    return np.array([[float(e.mean()), float(e.max())] for e in eu_per_response], dtype=np.float64)


def fit(x: np.ndarray, y: np.ndarray, source: dict | None = None) -> PWrongFit:
    """The logistic fit of labels y [n] (1 wrong) on features x [n, 2] (P_WRONG_FEATURES)."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=int)
    if x.ndim != 2 or x.shape != (len(y), len(P_WRONG_FEATURES)) or not len(y):
        raise ValueError(f"p_wrong needs features [n, {len(P_WRONG_FEATURES)}] and n labels, got {x.shape}")
    k, n = int(y.sum()), len(y)
    if 0 < k < n:
        from sklearn.linear_model import LogisticRegression

        model = LogisticRegression(C=1.0).fit(x, y)
        coef, intercept = [float(c) for c in model.coef_[0]], float(model.intercept_[0])
        method = "logistic regression (scikit-learn, L2, C = 1) of the answer label on mean and max eu"
    else:
        rate = (k + 1) / (n + 2)
        coef, intercept = [0.0] * len(P_WRONG_FEATURES), math.log(rate / (1 - rate))
        method = f"constant (k + 1)/(n + 2) = {rate:.4f}: validation has one class only ({k} wrong of {n})"
    return PWrongFit(
        version=P_WRONG_VERSION,  # given, so bundle.json (written with set fields only) carries them
        kind="logistic",
        features=list(P_WRONG_FEATURES),
        coef=coef,
        intercept=intercept,
        fitted_on={**(source or {}), "method": method, "responses": n, "wrong": k},
    )


def predict(model: PWrongFit, x: np.ndarray) -> np.ndarray:
    """p_wrong of each row of x [n, 2], as the server computes it. -> [n]"""
    return np.array([model.probability(dict(zip(model.features, row, strict=True))) for row in x])


def scores(p: np.ndarray, y: np.ndarray, base_rate: float) -> dict:
    """Brier score, log loss and AUROC of probabilities p against labels y, and the Brier score of
    the constant `base_rate` (the validation rate) for reference."""
    from sklearn.metrics import brier_score_loss, log_loss

    y = np.asarray(y, dtype=int)
    if not len(y):
        return {"responses": 0}
    return {
        "responses": len(y),
        "wrong": int(y.sum()),
        "brier": float(brier_score_loss(y, p)),
        "brier_constant_base_rate": float(brier_score_loss(y, np.full(len(y), base_rate))),
        "log_loss": float(log_loss(y, p, labels=[0, 1])),
        "auroc": metrics.auroc(p, y),
        "mean_p_wrong": float(np.mean(p)),
        "rate_wrong": float(y.mean()),
    }


def write(bundle_dir, model: PWrongFit):
    """Set `p_wrong` in bundle_dir/bundle.json (other keys kept). -> the manifest's path"""
    from measure.evaluation.report import clean
    from server.bundle import read_manifest, write_manifest

    manifest = read_manifest(bundle_dir)
    manifest.p_wrong = model.model_copy(update={"fitted_on": clean(model.fitted_on)})
    return write_manifest(bundle_dir, manifest)
