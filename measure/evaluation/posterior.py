"""Ground truth EU* for a pretrained target: the mutual information of the target's posterior
approximated by S stochastic instances of itself.

A pretrained target has no deep ensemble of independently trained copies (the small-scale
setting's EU*, `scores.py`). Its posterior is taken instead as the family OSD distils from
(`drafts.osd.TeacherSampler`, mode "lowrank"): W + σ·rms(W)·A Bᵀ/√r on every linear of the last
K decoder layers, A, B standard normal per instance. For a token position

    EU*  = H(p̄) − (1/S) Σ_s H(p_s),   p̄ = (1/S) Σ_s p_s     (nats; the instances' mutual
                                                             information, S ≥ 32)

Cost, per sequence: the first L − K layers run once (their output is the same in every
instance, `TeacherSampler.prefix`), then per instance the K noisy layers over the sequence and
the output head at the scored positions only. In parameters touched per scored token that is
(L − K)·P_layer + S·(K·P_layer + P_head) against the target's L·P_layer + P_head (`cost()`): for SmolLM2-135M
(L = 30, K = 2, a 49,152 × 576 head) about 9.4 target passes at S = 32 — the head dominates.

Instances are drawn by the seeds `SEED_BASE + s`, s < S, with SEED_BASE = 2⁶²: OSD training draws
`drafts.distill.step_seed(seed, m, step) = seed·2⁴⁰ ^ m·2³² ^ step` with m < 2⁸ and step < 2³²,
all below 2⁶² while the training seed is below 2²² — `check_disjoint` refuses drafts whose
recorded training seed is not, so no EU* instance is one a draft was distilled from.
"""

from __future__ import annotations

import torch

from drafts.osd import TeacherSampler
from server.engine.uncertainty import entropy

SEED_BASE = 1 << 62
MAX_TRAINING_SEED = 1 << 22  # training seeds below this draw step seeds below SEED_BASE


class TargetPosterior:
    """EU* of a sequence's scored positions under S low-rank instances of `target`."""

    def __init__(self, target, samples: int = 32, *, noise: float = 0.1, rank: int = 4, layers: int = 2):
        if samples < 2:
            raise ValueError(f"The posterior needs at least 2 instances (got {samples}).")
        self.sampler = TeacherSampler(target, "lowrank", noise=noise, rank=rank, layers=layers)
        self.samples, self.noise, self.rank = samples, noise, rank

    @property
    def seeds(self) -> range:
        return range(SEED_BASE, SEED_BASE + self.samples)

    @torch.no_grad()
    def mutual_information(self, ids: list[int], start: int) -> torch.Tensor:
        """EU* of ids[t], t ∈ [start, L), from the distributions of the prefixes ids[:t]. -> [T]

        The instances' distributions are accumulated (Σ p_s and Σ H(p_s)), never stacked, so a
        long sequence costs [T, V] of memory, not [T, S, V]."""
        if not 1 <= start < len(ids):
            raise ValueError(f"start must be in [1, {len(ids) - 1}], got {start}")
        x = torch.tensor([ids])  # [1, L]
        prefix = self.sampler.prefix(x) if self.sampler.prefix_layers else None  # [1, L, E]
        at = slice(start - 1, len(ids) - 1)
        p_sum = h_sum = None
        for seed in self.seeds:
            lp = self.sampler.logprobs(seed, x, prefix=prefix, positions=at)[0]  # [T, V]
            p, h = lp.double().exp(), entropy(lp).double()  # [T, V], [T]
            p_sum = p if p_sum is None else p_sum + p
            h_sum = h if h_sum is None else h_sum + h
        p_bar = p_sum / self.samples  # [T, V]
        h_bar = -(p_bar * torch.log(p_bar.clamp_min(1e-300))).sum(-1)  # [T]
        return (h_bar - h_sum / self.samples).clamp_min(0.0)

    def cost(self) -> dict:
        """Parameters touched per scored token, in target passes (see the module docstring)."""
        model = self.sampler.target
        layers = model.model.layers
        per_layer = [sum(p.numel() for p in layer.parameters()) for layer in layers]
        head = model.get_output_embeddings().weight.numel()
        total = sum(per_layer) + head  # a target pass: every layer and the head (the embedding is a lookup)
        k = self.sampler.layers
        once = sum(per_layer[: len(layers) - k])
        each = sum(per_layer[len(layers) - k :]) + head
        return {
            "target_passes_per_token": (once + self.samples * each) / total,
            "instances": self.samples,
            "rule": "(first L−K layers once + S·(K noisy layers + head)) / (all layers + head), "
            "parameters touched per scored token",
        }

    def describe(self) -> dict:
        return {
            "kind": "target posterior (low-rank weight noise in the last K layers)",
            "samples": self.samples,
            "noise": self.noise,
            "rank": self.rank,
            "layers": self.sampler.layers,
            "seeds": [self.seeds.start, self.seeds.stop],
            **self.cost(),
        }


def training_seeds(records: list[dict]) -> list[int]:
    """The OSD training seeds recorded by drafts (their training.json: `settings.seed`)."""
    return [int(r.get("settings", {}).get("seed", r.get("seed", 0)) or 0) for r in records]


def check_disjoint(records: list[dict]) -> None:
    """ValueError when a draft's training could have drawn an instance among EU*'s seeds."""
    bad = [s for s in training_seeds(records) if not 0 <= s < MAX_TRAINING_SEED]
    if bad:
        raise ValueError(
            f"Drafts trained with seed(s) {bad} may have drawn OSD instances with seeds ≥ 2⁶² "
            "(the ground truth's); EU* would not be independent of their training."
        )
