"""What a response reports besides its tokens: token usage, the response-level uncertainty
summary, and numbers made JSON-safe.

The summary is `{mean_eu, max_eu, num_tokens, num_flagged, flagged}` (eu in nats, over the
response's tokens), plus `p_wrong` — the probability that the response is wrong, from the
bundle's validation-fitted `p_wrong` (`server.bundle.PWrongFit`) — only when the served bundle
has that fit (null when no token had an eu)."""

from __future__ import annotations

import math
from dataclasses import dataclass

from server.bundle import EuCorrection, PWrongFit
from server.engine.types import Finished, TokenEvent


def number(x: float | None) -> float | None:
    """JSON has no inf/nan: those become null."""
    return x if x is None or math.isfinite(x) else None


def corrected(ev: TokenEvent, correction: EuCorrection | None) -> dict:
    """`{"eu_corrected": nats}` — the bundle's validation-fitted map of eu onto the ground truth's
    scale (`server.bundle.EuCorrection`) — or `{}` when the bundle has none."""
    if correction is None:
        return {}
    return {"eu_corrected": number(correction.apply(ev.bias, ev.variance))}


def calibrated(ev: TokenEvent) -> dict:
    """`{"p_error": probability}` — the bundle's calibrated probability that the token is wrong
    (`server.engine.p_error`) — or `{}` when the bundle has no p_error rule."""
    return {} if ev.p_error is None else {"p_error": number(ev.p_error)}


@dataclass
class Summary:
    """Response-level uncertainty: mean and max eu over tokens, flagged tokens, and p_wrong when
    `p_wrong` (the bundle's fit) is given."""

    p_wrong: PWrongFit | None = None
    num_tokens: int = 0
    eu_sum: float = 0.0
    eu_count: int = 0
    max_eu: float | None = None
    num_flagged: int = 0

    def add(self, ev: TokenEvent) -> None:
        self.num_tokens += 1
        self.num_flagged += ev.flagged
        if ev.eu is not None and math.isfinite(ev.eu):
            self.eu_sum += ev.eu
            self.eu_count += 1
            self.max_eu = ev.eu if self.max_eu is None else max(self.max_eu, ev.eu)

    def as_dict(self) -> dict:
        out = {
            "mean_eu": self.eu_sum / self.eu_count if self.eu_count else None,
            "max_eu": self.max_eu,
            "num_tokens": self.num_tokens,
            "num_flagged": self.num_flagged,
            "flagged": self.num_flagged > 0,
        }
        if self.p_wrong is not None:
            out["p_wrong"] = self.p_wrong.probability(out)
        return out


def usage(fin: Finished) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }
