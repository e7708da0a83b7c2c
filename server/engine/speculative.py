"""Speculative decoding math: the sampling distribution, the proposal, lossless verification.

Pure torch. Terms (Leviathan et al. 2023, Chen et al. 2023; vLLM's rejection sampler):
- proposed tokens d_1..d_k, drawn from the proposal distribution q̃ (built from the drafts'
  mixture q̄ under the request's temperature/top-p; a greedy proposal is a one-hot q̃);
- the target's sampling distribution p̃ at the k+1 positions (same temperature/top-p);
- **accepted**: d_i is kept with probability min(1, p̃(d_i)/q̃(d_i)), in order, until the
  first rejection;
- **recovered**: at the first rejection a token is drawn from the residual
  norm(max(0, p̃ − q̃)), which makes the output distributed exactly as p̃;
- **bonus**: when all k are accepted, one more token is drawn from p̃ at position k+1.
With temperature 0, p̃ is the one-hot argmax of p and the output equals the target's greedy
decoding exactly.
"""

from __future__ import annotations

import torch

GREEDY_BELOW = 1e-5  # temperatures below this decode greedily (vLLM's _SAMPLING_EPS)


def sampling_probs(logits: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    """The distribution a request samples from. [..., V] -> [..., V] (rows sum to 1).

    temperature 0 (or below `GREEDY_BELOW`, where logits / temperature would overflow float32)
    gives the one-hot argmax; top-p keeps the smallest set of most likely
    tokens whose mass reaches top_p (the most likely token is always kept)."""
    logits = logits.float()
    if temperature < GREEDY_BELOW:
        return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
    temperature = min(temperature, torch.finfo(torch.float32).max)  # inf would make -inf/inf NaN
    probs = torch.softmax(logits / temperature, dim=-1)  # [..., V]
    if top_p < 1.0:
        sorted_p, order = probs.sort(-1, descending=True)  # [..., V]
        mass_before = sorted_p.cumsum(-1) - sorted_p  # mass of strictly more likely tokens
        keep = mass_before < top_p
        keep[..., 0] = True  # even when top_p underflows float32
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_p)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


def sample(probs: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One draw per row. [..., V] -> [...] (long)"""
    flat = probs.reshape(-1, probs.shape[-1])
    return torch.multinomial(flat, 1, generator=generator).reshape(probs.shape[:-1])


def verify(
    draft_tokens: torch.Tensor,
    proposal_probs: torch.Tensor,
    target_probs: torch.Tensor,
    generator: torch.Generator | None,
) -> tuple[int, int]:
    """Lossless verification of one sequence's proposal.

    draft_tokens [k] (long), proposal_probs q̃ [k, V], target_probs p̃ [k+1, V].
    Returns (n accepted, the next token: recovered at position n+1 or bonus at k+1)."""
    k = draft_tokens.shape[0]
    idx = torch.arange(k)
    p_d = target_probs[idx, draft_tokens]  # [k]
    q_d = proposal_probs[idx, draft_tokens]  # [k]
    u = torch.rand(k, generator=generator, dtype=torch.float64)  # [k]
    # accept when u < p/q  <=>  u·q < p (q > 0 for a token the proposal drew)
    accept = (u * q_d.double()) < p_d.double()  # [k]
    rejected = (~accept).nonzero()
    n = int(rejected[0]) if len(rejected) else k
    if n == k:
        return k, int(sample(target_probs[k], generator))
    residual = (target_probs[n] - proposal_probs[n]).clamp(min=0)  # [V]
    if residual.sum() <= 0:  # p̃ == q̃ up to rounding: nothing to correct, draw from p̃
        residual = target_probs[n]
    return n, int(sample(residual / residual.sum(), generator))
