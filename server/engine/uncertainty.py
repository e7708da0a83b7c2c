"""Epistemic uncertainty of one next-token prediction, from an ensemble of drafts and a target.

Pure torch: no vLLM, no FastAPI. Natural log (nats). Shapes: `...` is any batch shape,
M drafts (or ensemble members), V the vocabulary, K the number of known target log-probs.

Per position (Park et al., arXiv 2602.01956):
    q̄         = (1/M) Σ_m q_m                        the drafts' mixture
    variance  = (1/M) Σ_m KL(q_m ‖ q̄) = H(q̄) − (1/M) Σ_m H(q_m)   (generalized JSD)
    bias      = KL(q̄ ‖ p)                            mixture against the target
    eu        = bias + variance = (1/M) Σ_m KL(q_m ‖ p)   (an exact identity)

When only the target's top-K log-probs are known (S = those ids, P_S = p(S), Q_S = q̄(S)):
    bias_K = Σ_{x∈S} q̄(x) log(q̄(x)/p(x)) + (1−Q_S) log((1−Q_S)/(1−P_S))
which lumps the tail into one bucket: by the log-sum inequality a lower bound of KL(q̄ ‖ p),
exact when q̄ and p are proportional on the tail (in particular at K = V).

Zero-probability tokens (−inf log-probs) contribute 0 (0·log 0 = 0), never NaN.
Inputs may be log-probs or any logits-like tensor already normalized with log_softmax.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass
class Uncertainty:
    bias: torch.Tensor  # [...]
    variance: torch.Tensor  # [...]
    eu: torch.Tensor  # [...]


def _plogq_diff(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Elementwise p·(log p − log q) with 0 where p = 0 (so −inf − −inf gives no NaN)."""
    p = logp.exp()
    diff = torch.where(p > 0, logp - logq, torch.zeros_like(logp))
    return p * diff


def kl(logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """KL(p ‖ q) over the last dim. [..., V], [..., V] -> [...]"""
    return _plogq_diff(logp, logq).sum(-1)


def mixture_logprobs(member_logprobs: torch.Tensor) -> torch.Tensor:
    """log q̄ of an equal-weight mixture. [..., M, V] -> [..., V]"""
    m = member_logprobs.shape[-2]
    return torch.logsumexp(member_logprobs, dim=-2) - math.log(m)


def variance(member_logprobs: torch.Tensor, log_mix: torch.Tensor | None = None) -> torch.Tensor:
    """(1/M) Σ_m KL(q_m ‖ q̄). [..., M, V] -> [...]"""
    if log_mix is None:
        log_mix = mixture_logprobs(member_logprobs)  # [..., V]
    return kl(member_logprobs, log_mix.unsqueeze(-2)).mean(-1)  # [..., M] -> [...]


def bias_on_support(
    log_mix: torch.Tensor, target_logits: torch.Tensor, support: torch.Tensor | None = None
) -> torch.Tensor:
    """Exact KL(q̄ ‖ p), p = softmax(target_logits), for a q̄ that is 0 outside `support` (the
    target ids of log_mix's entries: a reduced draft vocabulary; None: log_mix covers the whole
    vocabulary). Only p's normalizer reads all V columns. [..., S], [..., V], [S] long -> [...]"""
    logits = target_logits.float()
    if support is None:
        return kl(log_mix, torch.log_softmax(logits, -1))
    log_p = logits[..., support.to(logits.device)] - torch.logsumexp(logits, -1, keepdim=True)  # [..., S]
    return kl(log_mix, log_p)


def bias_topk(log_mix: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor) -> torch.Tensor:
    """Tail-bucket KL(q̄ ‖ p) from the target's top-K log-probs. [..., V], [..., K], [..., K] -> [...]

    Exact at K = V; a lower bound below. Tail masses are computed in float64 (1 − Σ is
    cancellation-prone when the top-K carry almost all the mass)."""
    log_mix_s = log_mix.gather(-1, topk_ids)  # [..., K]
    head = _plogq_diff(log_mix_s, topk_logprobs).sum(-1)  # [...]
    q_tail = (1.0 - log_mix_s.double().exp().sum(-1)).clamp(min=0.0)  # [...]
    p_tail = (1.0 - topk_logprobs.double().exp().sum(-1)).clamp(min=0.0)  # [...]
    # (1−Q_S) log((1−Q_S)/(1−P_S)); 0 when the tail of q̄ is empty. A q̄-tail against an
    # empty p-tail is an infinite divergence in exact arithmetic; rounding makes p_tail hit 0
    # while q_tail is tiny, so floor it at the float64 resolution of 1.
    p_tail = p_tail.clamp(min=torch.finfo(torch.float64).eps)
    tail = torch.where(q_tail > 0, q_tail * (q_tail.clamp(min=1e-300).log() - p_tail.log()), 0.0)
    return (head.double() + tail).clamp(min=0.0).to(log_mix.dtype)


def decompose(draft_logprobs: torch.Tensor, target_logprobs: torch.Tensor) -> Uncertainty:
    """Exact bias/variance/eu over the full vocabulary. [..., M, V], [..., V] -> each [...]"""
    log_mix = mixture_logprobs(draft_logprobs)  # [..., V]
    var = variance(draft_logprobs, log_mix)
    b = kl(log_mix, target_logprobs)
    return Uncertainty(bias=b, variance=var, eu=b + var)


def decompose_topk(
    draft_logprobs: torch.Tensor, topk_ids: torch.Tensor, topk_logprobs: torch.Tensor
) -> Uncertainty:
    """Like `decompose` with only the target's top-K log-probs known.
    [..., M, V], [..., K] (long), [..., K] -> each [...]. Variance is exact; bias is `bias_topk`."""
    log_mix = mixture_logprobs(draft_logprobs)  # [..., V]
    var = variance(draft_logprobs, log_mix)
    b = bias_topk(log_mix, topk_ids, topk_logprobs)
    return Uncertainty(bias=b, variance=var, eu=b + var)


# --- ground truth and single-model baselines


def mutual_information(member_logprobs: torch.Tensor) -> torch.Tensor:
    """Ensemble EU* = (1/N) Σ_n KL(p_n ‖ p̄) = H(p̄) − mean_n H(p_n). [..., N, V] -> [...]"""
    return variance(member_logprobs)


def entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """H(p). [..., V] -> [...]"""
    return -_plogq_diff(logprobs, torch.zeros_like(logprobs)).sum(-1)


def one_minus_max_prob(logprobs: torch.Tensor) -> torch.Tensor:
    """1 − max_x p(x). [..., V] -> [...]"""
    return 1.0 - logprobs.max(-1).values.exp()


def token_nll(logprobs: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """−log p(x_t). [..., V], [...] (long) -> [...]"""
    return -logprobs.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
