"""Ground truth EU* for a pretrained target: the mutual information of the target's posterior
approximated by S stochastic instances of itself — its seeds, and the check that no draft was
distilled from one of them. The instances are computed by `noise.py` (family "eu_star" of
`pretrained.families`).

A pretrained target has no deep ensemble of independently trained copies (the small-scale
setting's EU*, `scores.py`). Its posterior is taken instead as the family OSD distils from
(`drafts.osd.TeacherSampler`, mode "lowrank"): W + σ·rms(W)·A Bᵀ/√r on every linear of the last
K decoder layers, A, B standard normal per instance. For a token position

    EU*  = H(p̄) − (1/S) Σ_s H(p_s),   p̄ = (1/S) Σ_s p_s     (nats; S ≥ 32)

Instances are drawn by the seeds `SEED_BASE + s`, s < S, with SEED_BASE = 2⁶²: OSD training draws
`drafts.distill.step_seed(seed, m, step) = seed·2⁴⁰ ^ m·2³² ^ step` with m < 2⁸ and step < 2³²,
all below 2⁶² while the training seed is below 2²² — `check_disjoint` refuses drafts whose
recorded training seed is not, so no EU* instance is one a draft was distilled from.
"""

from __future__ import annotations

SEED_BASE = 1 << 62
MAX_TRAINING_SEED = 1 << 22  # training seeds below this draw step seeds below SEED_BASE


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
