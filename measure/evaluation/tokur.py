"""TokUR-style baseline: S randomly perturbed copies of the target, their mutual information.

TokUR (token-level uncertainty by low-rank weight perturbation) draws S instances of the target,
each with low-rank Gaussian noise W + σ·rms(W)·A Bᵀ/√r on its decoder weights, and scores a
token by the instances' mutual information H(p̄) − mean_s H(p_s). The instances are those of
OSD's `TeacherSampler` (mode "lowrank"; mode "dropout" gives the MC-dropout variant), drawn by
fixed seeds so every sequence meets the same S models. Cost: S extra full target passes per token.
"""

from __future__ import annotations

import torch

from drafts.osd import TeacherSampler
from server.engine.uncertainty import mutual_information


class PerturbedTarget:
    def __init__(
        self, target, samples: int, *, mode: str = "lowrank", noise: float = 0.1, rank: int = 4, seed: int = 0
    ) -> None:
        if samples < 2:
            raise ValueError(f"A perturbation baseline needs at least 2 samples (got {samples}).")
        self.sampler = TeacherSampler(target, mode, noise=noise, rank=rank)
        self.samples, self.seed = samples, seed
        self.mode, self.noise, self.rank = mode, noise, rank

    @torch.no_grad()
    def member_logprobs(self, input_ids: torch.Tensor, positions: slice | None = None) -> torch.Tensor:
        """[1, L] -> [L, S, V] (with `positions`: [L', S, V], the head run there only)"""
        lps = [
            self.sampler.logprobs(self.seed * 1_000_003 + s, input_ids, positions=positions)[0]
            for s in range(self.samples)
        ]
        return torch.stack(lps, dim=1)

    def mutual_information(self, input_ids: torch.Tensor, positions: slice | None = None) -> torch.Tensor:
        """[1, L] -> [L] (with `positions`: [L'])"""
        return mutual_information(self.member_logprobs(input_ids, positions))

    def describe(self) -> dict:
        return {
            "mode": self.mode,
            "samples": self.samples,
            "noise": self.noise,
            "rank": self.rank if self.mode == "lowrank" else None,
        }
