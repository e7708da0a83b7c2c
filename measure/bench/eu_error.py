"""How far `epispec`'s served EU is from the exact value, token by token.

The exact value is recomputed by teacher forcing (`server.engine.teacher_forced`: the target and
every draft, transformers, float32, score the served token sequence once) at every generated
position. The served-vs-exact error is the figure the goals judge; it holds whatever the engine
does for the bias (exact KL from the target's full logits in vLLM's worker, or the top-k tail
bound from its returned log-probs) plus vLLM's bf16 target and any bug.

For context the same pass also gives the top-k tail-bucket bound (`decompose_topk`, k =
`target_logprobs`) against the exact value: what a bias from the target's top-k log-probs
alone would cost on these models (`topk_bound`), and the served value against that bound
(`served_vs_topk_bound`, near 0 when the engine serves the bound).

    abs error = |eu − eu*|        rel error = abs / max(eu*, REL_FLOOR)

The floor keeps near-certain positions (eu* ≈ 0, where any rounding is a huge ratio) from
dominating the relative figures; it is reported with them.
"""

from __future__ import annotations

import torch

from measure.bench.measure import percentile
from server.engine import models
from server.engine.teacher_forced import teacher_forced
from server.engine.uncertainty import decompose_topk

REL_FLOOR = 1e-3  # nats


def exact_eu(target: str, drafts: list[str], sequences: list[dict], k: int = 20) -> list[dict]:
    """Per sequence ({"prompt_ids", "tokens"}): {"eu", "eu_topk", "topk_mass"} of every
    generated token (exact eu, the top-k bound in float32, the target's top-k probability mass)."""
    lm = models.load_causal_lm(target, "cpu", torch.float32)
    draft_models = models.load_drafts(drafts, target, "cpu", torch.float32)  # either kind
    out = []
    with torch.inference_mode():
        for s in sequences:
            tf = teacher_forced(lm, draft_models, s["prompt_ids"], s["tokens"])
            lp, draft_lp, exact = tf.target, tf.drafts, tf.uncertainty.eu  # [n, V], [n, M, V], [n]
            n = len(s["tokens"])
            if k < 0 or k >= lp.shape[-1]:
                top_eu, mass = exact, torch.ones(n)
            else:
                top_lp, top_ids = lp.topk(k, -1)  # [n, k]
                top_eu = decompose_topk(draft_lp, top_ids, top_lp).eu
                mass = top_lp.exp().sum(-1)
            out.append({"eu": exact.tolist(), "eu_topk": top_eu.tolist(), "topk_mass": mass.tolist()})
    return out


def _errors(approx: list[float | None], exact: list[float]) -> tuple[list[float], list[float]]:
    pairs = [(a, e) for a, e in zip(approx, exact, strict=True) if a is not None]
    return [abs(a - e) for a, e in pairs], [abs(a - e) / max(e, REL_FLOOR) for a, e in pairs]


def error_summary(served: list[float | None], exact: list[float], k: int) -> dict:
    """{k, tokens, missing, median_abs, p95_abs, median_rel, p95_rel, rel_floor, median_exact_eu}."""
    abs_err, rel_err = _errors(served, exact)
    return {
        "k": k,
        "tokens": len(abs_err),
        "missing": len(served) - len(abs_err),
        "median_abs": percentile(abs_err, 50),
        "p95_abs": percentile(abs_err, 95),
        "median_rel": percentile(rel_err, 50),
        "p95_rel": percentile(rel_err, 95),
        "rel_floor": REL_FLOOR,
        "median_exact_eu": percentile(exact, 50),
    }


def eu_error(target: str, drafts: list[str], eu_tokens: list[dict], k: int) -> dict:
    """`error_summary` of the served eu, plus the top-k bound's own error for context."""
    exact = exact_eu(target, drafts, eu_tokens, k)
    flat = lambda key, seqs: [v for s in seqs for v in s[key]]  # noqa: E731
    served, eu_star, eu_k = flat("eu", eu_tokens), flat("eu", exact), flat("eu_topk", exact)
    out = error_summary(served, eu_star, k)
    _, bound_rel = _errors(eu_k, eu_star)
    _, served_rel = _errors(served, eu_k)
    out["topk_bound"] = {
        "median_rel": percentile(bound_rel, 50),
        "p95_rel": percentile(bound_rel, 95),
    }
    out["served_vs_topk_bound"] = {
        "median_rel": percentile(served_rel, 50),
        "p95_rel": percentile(served_rel, 95),
    }
    out["median_target_topk_mass"] = percentile(flat("topk_mass", exact), 50)
    return out
