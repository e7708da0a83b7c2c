"""Per-token `p_error`: a calibrated probability that a token is wrong, from signals every engine
has for every token it emits — a logistic function of them,

    p_error = 1 / (1 + exp(−(intercept + Σ_i coef_i · x_i))),   x among P_ERROR_FEATURES

    eu, bias, variance   the drafts' estimate and its two terms (nats)
    logprob              the target's raw log-probability of the token

fitted on validation tokens whose correctness is known (`measure.evaluation.p_error`) and shipped
in bundle.json (`server.bundle.PErrorFit`). The target's entropy is not among them: the vLLM
engine's token events carry the token's log-prob and top log-probs, not the full distribution.
A token is flagged when p_error > `threshold` (docs/evaluation-at-scale.md).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

P_ERROR_FEATURES = ("eu", "bias", "variance", "logprob")


@dataclass(frozen=True)
class PErrorRule:
    features: tuple[str, ...]
    coef: tuple[float, ...]
    intercept: float
    threshold: float  # flag when p_error > threshold

    def probability(
        self, eu: float | None, bias: float | None, variance: float | None, logprob: float | None
    ) -> float | None:
        """p_error of one token; None when a feature is missing or not finite (no drafts)."""
        given = {"eu": eu, "bias": bias, "variance": variance, "logprob": logprob}
        values = [given[f] for f in self.features]
        if any(v is None or not math.isfinite(v) for v in values):
            return None
        return logistic(self.intercept + sum(c * float(v) for c, v in zip(self.coef, values, strict=True)))


def logistic(z: float) -> float:
    """1 / (1 + exp(−z)), without overflow for large |z|."""
    return 1.0 / (1.0 + math.exp(-z)) if z >= 0 else math.exp(z) / (1.0 + math.exp(z))
