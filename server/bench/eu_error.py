"""How far `epispec`'s served EU is from the exact value, token by token.

The exact value is recomputed by teacher forcing: the target and every draft (transformers,
float32) score the served token sequence once, and `uncertainty.decompose` gives the
full-vocabulary eu at every generated position. The served eu uses the target's top-k
log-probs (k = `target_logprobs`) and q̄'s top-N from the proposer, so the difference is the
price of the top-k bias plus any numerical difference between vLLM's and transformers' target.

    abs error = |eu − eu*|        rel error = abs / max(eu*, REL_FLOOR)

The floor keeps near-certain positions (eu* ≈ 0, where any rounding is a huge ratio) from
dominating the relative figures; it is reported with them.
"""

from __future__ import annotations

import torch

from server.bench.measure import percentile
from server.engine import models
from server.engine.uncertainty import decompose

REL_FLOOR = 1e-3  # nats


def exact_eu(target: str, drafts: list[str], sequences: list[dict]) -> list[list[float]]:
    """Exact eu of every generated token of every sequence ({"prompt_ids", "tokens"})."""
    lms = [models.load_causal_lm(p, "cpu", torch.float32) for p in [target, *drafts]]
    out = []
    with torch.inference_mode():
        for s in sequences:
            ids = torch.tensor([s["prompt_ids"] + s["tokens"]])  # [1, L]
            n_prompt, n = len(s["prompt_ids"]), len(s["tokens"])
            # logits at position i predict token i+1: the generated tokens are predicted by
            # positions n_prompt-1 .. n_prompt+n-2
            lp = [
                torch.log_softmax(
                    lm(input_ids=ids).logits[0, n_prompt - 1 : n_prompt + n - 1].float(), -1
                )
                for lm in lms
            ]  # each [n, V]
            u = decompose(torch.stack(lp[1:], dim=1), lp[0])  # [n, M, V], [n, V] -> [n]
            out.append(u.eu.tolist())
    return out


def error_summary(served: list[float], exact: list[float], k: int) -> dict:
    """{k, tokens, median_abs, p95_abs, median_rel, p95_rel, rel_floor} over paired tokens."""
    pairs = [(s, e) for s, e in zip(served, exact, strict=True) if s is not None]
    abs_err = [abs(s - e) for s, e in pairs]
    rel_err = [abs(s - e) / max(e, REL_FLOOR) for s, e in pairs]
    return {
        "k": k,
        "tokens": len(pairs),
        "missing": len(served) - len(pairs),
        "median_abs": percentile(abs_err, 50),
        "p95_abs": percentile(abs_err, 95),
        "median_rel": percentile(rel_err, 50),
        "p95_rel": percentile(rel_err, 95),
        "rel_floor": REL_FLOOR,
        "median_exact_eu": percentile([e for _, e in pairs], 50),
    }


def eu_error(target: str, drafts: list[str], eu_tokens: list[dict], k: int) -> dict:
    exact = exact_eu(target, drafts, eu_tokens)
    served = [v for s in eu_tokens for v in s["eu"]]
    return error_summary(served, [v for e in exact for v in e], k)
