"""Corrections of the drafts' eu = bias + variance, fitted on validation tokens, applied to test.

The bias term KL(q̄ ‖ p) carries the drafts' distillation error, a systematic part that the
ground truth EU* does not have (issue #14). Two corrections, each fitted by least squares
against EU* on validation only — `fit_corrections` never receives a test array:

    offset   eu_offset = max(eu − c, 0), with c minimising Σ (max(eu − c, 0) − EU*)² exactly
             (the loss is piecewise quadratic in c; every piece's minimiser is checked)
    fit      eu_fit = max(a · bias + b · variance + c, 0), a, b ≥ 0 (more disagreement never
             lowers the estimate), c free; non-negative least squares solved exactly by trying
             every subset of {a, b} held at 0 (scipy is not a dependency of this package)

Clipping at 0 never adds error: EU* is a mutual information, ≥ 0.

`epispec eval --bundle B --calibrate-bundle B` writes the one with the lower validation RMSE into
B/bundle.json as `eu_correction` (`server.bundle.EuCorrection`, versioned); the server then
returns `eu_corrected` per token.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

from server.bundle import EU_CORRECTION_VERSION, EuCorrection


@dataclass(frozen=True)
class Correction:
    kind: str  # "offset" or "fit"
    params: dict[str, float]
    validation_tokens: int
    validation_rmse: dict[str, float] = field(default_factory=dict)  # "before" (eu) and "after"

    def served(self, source: dict | None = None) -> EuCorrection:
        """The correction as bundle.json's `eu_correction`, which the server applies per token."""
        return EuCorrection(
            version=EU_CORRECTION_VERSION,  # given, so bundle.json (set fields only) carries it
            kind=self.kind,
            params=dict(self.params),
            fitted_on={
                **(source or {}),
                "method": "least squares against EU* on validation tokens (never test)",
                "validation_tokens": self.validation_tokens,
                "validation_rmse": dict(self.validation_rmse),
            },
        )

    def apply(self, bias: np.ndarray, variance: np.ndarray) -> np.ndarray:
        """[T], [T] -> [T] nats, as the server computes it token by token."""
        return np.maximum(self.served().raw(bias, variance), 0.0)

    def describe(self) -> dict:
        return {
            "kind": self.kind,
            "params": dict(self.params),
            "fitted_on": "validation",
            "validation_tokens": self.validation_tokens,
            "validation_rmse": dict(self.validation_rmse),
        }


def fit_offset(eu: np.ndarray, truth: np.ndarray) -> float:
    """The c minimising Σ (max(eu − c, 0) − truth)²."""
    order = np.argsort(-eu, kind="mergesort")
    e, t = eu[order], truth[order]  # e descending
    n = len(e)
    r = e - t
    k = np.arange(n + 1)  # the k largest eu are above c: c ∈ [e[k], e[k−1]]
    s1, s2 = np.r_[0.0, np.cumsum(r)], np.r_[0.0, np.cumsum(r * r)]
    rest = np.r_[np.cumsum((t * t)[::-1])[::-1], 0.0]  # Σ_{i ≥ k} t_i²: items at 0
    lo, hi = np.r_[e, -np.inf], np.r_[np.inf, e]
    c = np.clip(np.divide(s1, k, out=np.full(n + 1, e[0] if n else 0.0), where=k > 0), lo, hi)
    loss = s2 - 2 * c * s1 + k * c * c + rest
    return float(c[np.argmin(loss)])


def fit_combination(bias: np.ndarray, variance: np.ndarray, truth: np.ndarray) -> dict[str, float]:
    """a, b ≥ 0 and c minimising Σ (a · bias + b · variance + c − truth)²."""
    cols = np.stack([bias, variance], axis=1)  # [T, 2]
    best, best_sse = np.zeros(3), np.inf
    for size in range(3):
        for free in combinations(range(2), size):
            x = np.c_[cols[:, list(free)], np.ones(len(truth))]  # [T, |free| + 1]
            coef = np.linalg.lstsq(x, truth, rcond=None)[0]
            if np.any(coef[:-1] < 0):
                continue  # infeasible: the optimum has this coefficient at 0, another subset holds it
            sse = float(np.sum((x @ coef - truth) ** 2))
            if sse < best_sse:  # ties keep the smaller support, tried first
                w = np.zeros(3)
                w[list(free)], w[2] = coef[:-1], coef[-1]
                best, best_sse = w, sse
    return {"a_bias": float(best[0]), "b_variance": float(best[1]), "c": float(best[2])}


def _rmse(x: np.ndarray, t: np.ndarray) -> float:
    return float(np.sqrt(np.mean((x - t) ** 2)))


def fit_corrections(bias: np.ndarray, variance: np.ndarray, truth: np.ndarray) -> dict[str, Correction]:
    """Both corrections from validation tokens: ours.bias, ours.variance and EU* (each [T])."""
    bias, variance, truth = (np.asarray(a, dtype=np.float64) for a in (bias, variance, truth))
    if not len(truth) or not bias.shape == variance.shape == truth.shape:
        raise ValueError(
            f"validation arrays must be non-empty and of one shape, got "
            f"{bias.shape}, {variance.shape}, {truth.shape}"
        )
    out = {}
    for name, c in (
        ("ours_offset", Correction("offset", {"c": fit_offset(bias + variance, truth)}, len(truth))),
        ("ours_fit", Correction("fit", fit_combination(bias, variance, truth), len(truth))),
    ):
        rmse = {"before": _rmse(bias + variance, truth), "after": _rmse(c.apply(bias, variance), truth)}
        out[name] = Correction(c.kind, c.params, c.validation_tokens, rmse)
    return out


def best(corrections: dict[str, Correction]) -> tuple[str, Correction]:
    """The correction with the lowest validation RMSE after it is applied (ties: the first)."""
    return min(corrections.items(), key=lambda kv: kv[1].validation_rmse.get("after", np.inf))


def write(bundle_dir, name: str, correction: Correction, source: dict | None = None):
    """Set `eu_correction` in bundle_dir/bundle.json to `correction` (other keys kept); `source`
    (the evaluation's data and ground truth) is recorded in its `fitted_on`. -> the manifest's path"""
    from measure.evaluation.report import clean
    from server.bundle import read_manifest, write_manifest

    manifest = read_manifest(bundle_dir)
    served = correction.served({"correction": name, **(source or {})})
    manifest.eu_correction = served.model_copy(update={"fitted_on": clean(served.fitted_on)})
    return write_manifest(bundle_dir, manifest)
