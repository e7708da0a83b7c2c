"""EU* of a pretrained target (`posterior.py`): exact against the instances' stacked
distributions, seeds disjoint from every OSD training draw, and its cost."""

from __future__ import annotations

import pytest
import torch

from drafts.distill import step_seed
from drafts.osd import TeacherSampler
from measure.evaluation.posterior import MAX_TRAINING_SEED, SEED_BASE, TargetPosterior, check_disjoint
from server.engine.models import load_causal_lm
from server.engine.uncertainty import mutual_information

pytestmark = pytest.mark.usefixtures("few_threads")


@pytest.mark.parametrize("layers", [1, 2])  # the last layer only (cached prefix), every layer
def test_eu_star_equals_the_mutual_information_of_the_stacked_instances(tiny_models, layers):
    target = load_causal_lm(tiny_models["target"])
    post = TargetPosterior(target, 4, noise=0.3, layers=layers)
    ids, start = list(range(5, 30)), 17
    got = post.mutual_information(ids, start)  # [T]
    plain = TeacherSampler(target, "lowrank", noise=0.3, layers=layers)
    stacked = torch.stack(
        [plain.logprobs(s, torch.tensor([ids]))[0, start - 1 : len(ids) - 1] for s in post.seeds], 1
    )  # [T, S, V]
    assert got.shape == (len(ids) - start,)
    assert torch.allclose(got, mutual_information(stacked).double(), atol=1e-5)
    assert (got > 0).all()


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


def test_cost_counts_the_prefix_once_and_each_instance_s_noisy_layers_and_head(tiny_models):
    target = load_causal_lm(tiny_models["target"])
    layer = sum(p.numel() for p in target.model.layers[0].parameters())
    head = target.get_output_embeddings().weight.numel()
    n = len(target.model.layers)
    cost = TargetPosterior(target, 32, layers=1).cost()["target_passes_per_token"]
    assert cost == pytest.approx(((n - 1) * layer + 32 * (layer + head)) / (n * layer + head))
