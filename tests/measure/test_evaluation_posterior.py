"""EU* of a pretrained target (`posterior.py`, computed by `noise.py`): seeds disjoint from every
OSD training draw, TeacherSampler's positions and prefix, and the cost of the family."""

from __future__ import annotations

import pytest
import torch

from drafts.distill import step_seed
from drafts.osd import TeacherSampler
from measure.evaluation.noise import LowRankNoise, NoiseFamily
from measure.evaluation.posterior import MAX_TRAINING_SEED, SEED_BASE, check_disjoint
from server.engine.models import load_causal_lm

pytestmark = pytest.mark.usefixtures("few_threads")


def test_positions_give_the_same_logprobs_as_slicing(tiny_models):
    target = load_causal_lm(tiny_models["target"])
    t = TeacherSampler(target, "lowrank", noise=0.3, layers=1)
    x = torch.tensor([list(range(3, 20))])  # [1, 17]
    at = slice(6, 12)
    full = t.logprobs(7, x)  # [1, 17, V]
    assert torch.allclose(t.logprobs(7, x, positions=at), full[:, at], atol=1e-5)
    assert torch.allclose(t.logprobs(7, x, prefix=t.prefix(x), positions=at), full[:, at], atol=1e-5)


def test_seeds_are_beyond_every_training_draw():
    """step_seed(seed, m, step) < 2⁶² for every training seed < 2²², draft m < 2⁸, step < 2³²."""
    assert step_seed(MAX_TRAINING_SEED - 1, 255, (1 << 32) - 1) < SEED_BASE
    check_disjoint([{"settings": {"seed": 0}}, {"seed": 3}, {}])
    with pytest.raises(ValueError, match="seed"):
        check_disjoint([{"settings": {"seed": MAX_TRAINING_SEED}}])


def test_cost_counts_each_instance_s_noisy_layers_and_head(tiny_models):
    """Extra target passes per token: the first layers are the target's own pass, shared."""
    target = load_causal_lm(tiny_models["target"])
    layer = sum(p.numel() for p in target.model.layers[0].parameters())
    head = target.get_output_embeddings().weight.numel()
    n = len(target.model.layers)
    fam = NoiseFamily("eu_star", 0.1, 4, 1, None, SEED_BASE, 32)
    cost = LowRankNoise(target, fam).cost()["target_passes_per_token"]
    assert cost == pytest.approx(32 * (layer + head) / (n * layer + head))
