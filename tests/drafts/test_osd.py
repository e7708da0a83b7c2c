"""OSD teacher instances: a fresh instance per step (counted), reproducible per seed, and the
target's own weights untouched after each draw."""

from __future__ import annotations

import pytest
import torch

from drafts.osd import TeacherSampler
from server.engine.models import load_causal_lm


@pytest.fixture(scope="module")
def target(tiny_models):
    return load_causal_lm(tiny_models["target"])


@pytest.fixture(scope="module")
def ids():
    return torch.randint(3, 300, (2, 12), generator=torch.Generator().manual_seed(0))  # [B, S]


@pytest.mark.parametrize("mode", ["lowrank", "dropout"])
def test_each_step_draws_a_new_instance(target, ids, mode):
    t = TeacherSampler(target, mode, noise=0.2)
    outs = [t.logprobs(seed, ids) for seed in range(6)]  # [B, S, V] each
    assert t.instances == 6 and t.describe()["draws"] == 6
    for a in range(6):
        for b in range(a + 1, 6):
            assert not torch.allclose(outs[a], outs[b], atol=1e-4), (a, b)
    # the same seed is the same instance (resumed runs redraw what they drew)
    assert torch.allclose(t.logprobs(3, ids), outs[3], atol=1e-5)
    assert t.instances == 6


def test_draws_leave_the_target_unchanged(target, ids):
    before = {k: v.clone() for k, v in target.state_dict().items()}
    clean = TeacherSampler(target, "none").logprobs(0, ids)
    t = TeacherSampler(target, "lowrank", noise=0.5, rank=2)
    noisy = t.logprobs(1, ids)
    assert (noisy - clean).abs().max() > 1e-3  # the perturbation does something
    for k, v in target.state_dict().items():
        assert torch.equal(v, before[k]), k
    assert torch.allclose(TeacherSampler(target, "none").logprobs(0, ids), clean)


def test_no_osd_is_the_fixed_target(target, ids):
    t = TeacherSampler(target, "none")
    a, b = t.logprobs(0, ids), t.logprobs(1, ids)
    assert torch.equal(a, b) and t.instances == 1


def test_ensemble_draws_members_uniformly(tiny_models, ids):
    members = [load_causal_lm(tiny_models["target"]), load_causal_lm(tiny_models["target"])]
    with torch.no_grad():
        members[1].lm_head.weight.mul_(0.5)  # a visibly different second member
    t = TeacherSampler(members[0], "ensemble", members=members)
    outs = {}
    for seed in range(40):
        k = random_member(seed, 2)
        outs.setdefault(k, t.logprobs(seed, ids))
    d = t.describe()
    assert d["members"] == 2 and t.instances == 2
    # 40 uniform draws of 2 members: each drawn at least 10 times except with probability < 1e-3
    assert all(v >= 10 for v in d["draws_per_member"].values())
    assert not torch.allclose(outs[0], outs[1])


def random_member(seed: int, n: int) -> int:
    import random

    return random.Random(seed).randrange(n)


@pytest.mark.parametrize(
    ("mode", "kwargs", "message"),
    [
        ("gaussian", {}, "must be one of"),
        ("ensemble", {}, "at least one ensemble member"),
        ("dropout", {"noise": 0.0}, "noise > 0"),
        ("lowrank", {"layers": 99}, "noise-layers must be within"),
        ("dropout", {"layers": 1}, "mode 'lowrank' only"),
    ],
)
def test_bad_modes(target, mode, kwargs, message):
    with pytest.raises(ValueError, match=message):
        TeacherSampler(target, mode, **kwargs)


def test_noise_in_the_last_layers_leaves_the_prefix_fixed_and_the_tail_exact(target, ids):
    """layers=1: only the last layer's weights move; prefix + tail = the whole instance, exactly."""
    n = len(target.model.layers)
    sampler = TeacherSampler(target, "lowrank", noise=0.3, layers=1)
    assert sampler.prefix_layers == n - 1 and sampler.describe()["layers"] == 1
    assert {name.split(".")[2] for name, _ in sampler._linears} == {str(n - 1)}
    prefix = sampler.prefix(ids)  # [B, S, E]
    cols = torch.arange(3, 60)
    for seed in (1, 2):
        assert torch.equal(sampler.logprobs(seed, ids), sampler.logprobs(seed, ids, prefix=prefix))
        assert torch.equal(sampler.logprobs(seed, ids, cols), sampler.logprobs(seed, ids, cols, prefix))
    assert not torch.allclose(sampler.logprobs(1, ids), sampler.logprobs(2, ids))  # fresh instances
    fixed = TeacherSampler(target, "none").logprobs(0, ids)
    assert not torch.allclose(sampler.logprobs(1, ids), fixed)
    with pytest.raises(ValueError, match="cached prefix"):
        TeacherSampler(target, "lowrank", noise=0.3).logprobs(1, ids, prefix=prefix)
