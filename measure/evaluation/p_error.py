"""`p_error`: per token, a calibrated probability that the token is wrong, fitted on validation.

Features (`server.engine.p_error.P_ERROR_FEATURES`): eu, bias, variance (nats) and the target's
log-prob of the token — what both engines have for every emitted token (the vLLM engine's events
carry no entropy). Labels: the calculator-result tokens of GSM8K *train* problems
(`forced_labels.py`), never test. Model: logistic regression (scikit-learn, L2, C = 1) on the
standardized features, folded back into coefficients of the raw features so the server evaluates
one formula (`PErrorFit`). The shipped threshold is 0.5: a token is flagged when it is more
likely wrong than right (nothing about test is chosen).

On test: AUROC (against each single feature's), precision and recall at the threshold, Brier
score against the validation base rate, and a reliability table (10 equal-width bins of p_error:
mean p_error vs the rate of wrong tokens), all CIs by problem (`metrics.resamples` with groups).
"""

from __future__ import annotations

import numpy as np

from measure.evaluation import metrics
from server.bundle import P_ERROR_VERSION, PErrorFit
from server.engine.p_error import P_ERROR_FEATURES

THRESHOLD = 0.5
TOKEN_KEYS = {"eu": "ours.eu", "bias": "ours.bias", "variance": "ours.variance", "logprob": "logprob"}


def features(tokens: dict[str, np.ndarray]) -> np.ndarray:
    """[T, 4] in P_ERROR_FEATURES order, from scored token arrays (`tree_scores.Scorer`)."""
    return np.stack([np.asarray(tokens[TOKEN_KEYS[f]], dtype=np.float64) for f in P_ERROR_FEATURES], 1)


def fit(x: np.ndarray, y: np.ndarray, source: dict | None = None, threshold: float = THRESHOLD) -> PErrorFit:
    """The logistic fit of token labels y [T] (1 wrong) on x [T, 4] (P_ERROR_FEATURES)."""
    from sklearn.linear_model import LogisticRegression

    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=int)
    if x.ndim != 2 or x.shape != (len(y), len(P_ERROR_FEATURES)) or not 0 < y.sum() < len(y):
        raise ValueError(
            f"p_error needs features [T, {len(P_ERROR_FEATURES)}] and T labels of both classes, got "
            f"{x.shape} with {int(y.sum())} wrong of {len(y)}"
        )
    mu, sd = x.mean(0), x.std(0)
    sd[sd == 0] = 1.0
    model = LogisticRegression(C=1.0, max_iter=1000).fit((x - mu) / sd, y)
    w = model.coef_[0] / sd  # the same linear score on the raw features
    b = float(model.intercept_[0] - (model.coef_[0] * mu / sd).sum())
    return PErrorFit(
        version=P_ERROR_VERSION,
        kind="logistic",
        features=list(P_ERROR_FEATURES),
        coef=[float(c) for c in w],
        intercept=b,
        threshold=threshold,
        fitted_on={
            **(source or {}),
            "method": "logistic regression (scikit-learn, L2, C = 1, standardized features) of the token "
            "label on eu, bias, variance and the target's log-prob; threshold 0.5",
            "tokens": len(y),
            "wrong": int(y.sum()),
        },
    )


def predict(model: PErrorFit, x: np.ndarray) -> np.ndarray:
    """p_error of each row of x [T, 4], by the server's own formula. -> [T]"""
    rule = model.rule()
    return np.array(
        [rule.probability(**dict(zip(P_ERROR_FEATURES, map(float, row), strict=True))) for row in x]
    )


def reliability(p: np.ndarray, y: np.ndarray, bins: int = 10) -> list[dict]:
    """Per equal-width bin of p: tokens, mean p_error and rate of wrong tokens (empty bins left out)."""
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(p, edges[1:-1]), 0, bins - 1)
    return [
        {
            "bin": [float(edges[k]), float(edges[k + 1])],
            "tokens": int((which == k).sum()),
            "mean_p_error": float(p[which == k].mean()),
            "rate_wrong": float(y[which == k].mean()),
        }
        for k in range(bins)
        if (which == k).any()
    ]


def expected_calibration_error(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Σ_bins (tokens / T) · |mean p − rate wrong|."""
    return float(
        sum(r["tokens"] * abs(r["mean_p_error"] - r["rate_wrong"]) for r in reliability(p, y, bins)) / len(y)
    )


def evaluate(
    model: PErrorFit, x: np.ndarray, y: np.ndarray, groups: np.ndarray, base_rate: float, n_boot: int
) -> dict:
    """p_error on labelled tokens (test): AUROC, precision/recall at the threshold, Brier (and the
    base rate's), ECE and the reliability table; CIs resample problems (`groups`)."""
    from sklearn.metrics import brier_score_loss

    p, y = predict(model, x), np.asarray(y, dtype=int)
    t = model.threshold

    def precision(s, lab):
        return metrics.precision_recall_at(s, lab, t)["precision"]

    def recall(s, lab):
        return metrics.precision_recall_at(s, lab, t)["recall"]

    out = {"tokens": len(y), "wrong": int(y.sum()), "threshold": t}
    for name, fn in (("auroc", metrics.auroc), ("precision", precision), ("recall", recall)):
        r = metrics.with_ci(fn, p, y, n=n_boot, groups=groups)
        out[name], out[f"{name}_ci95"] = r["value"], r["ci95"]
    out["flagged"] = int((p > t).sum())
    out["brier"] = float(brier_score_loss(y, p))
    out["brier_constant_base_rate"] = float(brier_score_loss(y, np.full(len(y), base_rate)))
    out["ece"] = expected_calibration_error(p, y)
    out["reliability"] = reliability(p, y)
    out["single_feature_auroc"] = {
        f: metrics.auroc(-x[:, i] if f == "logprob" else x[:, i], y) for i, f in enumerate(P_ERROR_FEATURES)
    }
    out["_p"] = p
    return out


def write(bundle_dir, model: PErrorFit):
    """Set `p_error` in bundle_dir/bundle.json (other keys kept). -> the manifest's path"""
    from measure.evaluation.report import clean
    from server.bundle import read_manifest, write_manifest

    manifest = read_manifest(bundle_dir)
    manifest.p_error = model.model_copy(update={"fitted_on": clean(model.fitted_on)})
    return write_manifest(bundle_dir, manifest)
