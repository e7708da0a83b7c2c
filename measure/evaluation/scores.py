"""Per-token scores of a sequence, teacher-forced: every estimate of epistemic uncertainty and
every single-model baseline, plus the ground truth EU*.

Teacher-forced as in `server.engine.teacher_forced` (one pass per model scores a whole sequence;
for the first scored index `start`, position t ∈ [start, L) is scored with the distributions of
the prefix ids[:t]).

Keys of `score_sequence` (each an array [T]):
    ensemble            EU* = mutual information of the deep ensemble (ground truth)
    {set}.eu/.bias/.variance   decompose(drafts of that set, target)
    single.bias         KL(q_1 ‖ p) of one draft (M = 1: bias only)
    entropy, max_prob, nll     target H(p), 1 − max p, −log p(x_t)
    tokur, mc_dropout   mutual information of S perturbed target copies
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from measure.evaluation.tokur import PerturbedTarget
from server.engine.teacher_forced import forced_logprobs, forced_member_logprobs
from server.engine.uncertainty import (
    decompose,
    entropy,
    mutual_information,
    one_minus_max_prob,
    token_nll,
)


@dataclass
class ScoringModels:
    target: torch.nn.Module
    ensemble: list  # the deep ensemble p_1 … p_N
    draft_sets: dict[str, list]  # name -> M drafts; the first is "ours"
    perturbed: dict[str, PerturbedTarget] = field(default_factory=dict)  # "tokur", "mc_dropout"
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))

    @property
    def ours(self) -> str:
        return next(iter(self.draft_sets))


def _timed(models: ScoringModels, key: str, fn):
    t0 = time.perf_counter()
    out = fn()
    models.seconds[key] += time.perf_counter() - t0
    return out


@torch.no_grad()
def score_sequence(models: ScoringModels, ids: list[int], start: int) -> dict[str, np.ndarray]:
    x = torch.tensor([ids])  # [1, L]
    pos = slice(start - 1, len(ids) - 1)  # logits at t−1 predict ids[t]
    tok = torch.tensor(ids[start:])  # [T]
    out: dict[str, torch.Tensor] = {}

    p = _timed(models, "target", lambda: forced_logprobs(models.target, ids, start))  # [T, V]
    out["entropy"], out["max_prob"], out["nll"] = entropy(p), one_minus_max_prob(p), token_nll(p, tok)

    ens = _timed(models, "ensemble", lambda: forced_member_logprobs(models.ensemble, ids, start))  # [T, N, V]
    out["ensemble"] = mutual_information(ens)

    for name, drafts in models.draft_sets.items():
        q = _timed(
            models, f"drafts.{name}", lambda d=drafts: forced_member_logprobs(d, ids, start)
        )  # [T, M, V]
        u = decompose(q, p)
        out[f"{name}.eu"], out[f"{name}.bias"], out[f"{name}.variance"] = u.eu, u.bias, u.variance
        if name == models.ours:
            out["single.bias"] = decompose(q[:, :1], p).bias  # [T, 1, V]: variance is 0

    for name, pert in models.perturbed.items():
        out[name] = _timed(models, name, lambda pt=pert: pt.mutual_information(x)[pos])
    return {k: v.double().numpy() for k, v in out.items()}


@torch.no_grad()
def decode_seconds(model, ids: list[int], start: int) -> float:
    """Wall time of KV-cached decoding of ids[start:] one token at a time after a prefill of
    ids[:start] (the prefill is not counted): the per-token cost a method adds when run beside
    plain decoding."""
    out = model(input_ids=torch.tensor([ids[:start]]), use_cache=True)
    cache = out.past_key_values
    t0 = time.perf_counter()
    for t in range(start, len(ids)):
        cache = model(
            input_ids=torch.tensor([[ids[t]]]), past_key_values=cache, use_cache=True
        ).past_key_values
    return time.perf_counter() - t0
