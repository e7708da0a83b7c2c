"""Low-rank noise families (`noise.py`): the hooks give TeacherSampler's instances, the second
ground truth perturbs the attention projections of every layer and nothing else, the cached
prefix gives the full pass's values, and the mutual information is the instances' JSD."""

from __future__ import annotations

import pytest
import torch

from drafts.osd import TeacherSampler
from measure.evaluation.noise import ATTENTION, LowRankNoise, NoiseFamily
from measure.evaluation.tree import Branch, Tree, run_body
from server.engine.models import load_causal_lm
from server.engine.uncertainty import mutual_information

pytestmark = pytest.mark.usefixtures("few_threads")


def family(**kw) -> NoiseFamily:
    base = dict(name="f", noise=0.3, rank=2, layers=0, modules=None, seed_start=11, samples=3)
    return NoiseFamily(**{**base, **kw})


@pytest.fixture(scope="module")
def target(tiny_models):
    return load_causal_lm(tiny_models["target"])


def flat(n: int = 24) -> Tree:
    return Tree(list(range(5, 5 + n)), [Branch(n, [40, 41, 42])])


@pytest.mark.parametrize("layers", [0, 1])
def test_an_instance_is_teacher_samplers_instance_of_the_same_seed(target, layers):
    ids = list(range(5, 29)) + [40, 41, 42]
    t, at = flat(), torch.arange(23, 26)
    noise = LowRankNoise(target, family(layers=layers))
    got = noise.logprobs(7, t, at)
    want = TeacherSampler(target, "lowrank", noise=0.3, rank=2, layers=layers).logprobs(
        7, torch.tensor([ids]), positions=slice(23, 26)
    )[0]
    torch.testing.assert_close(got, want, atol=3e-5, rtol=0)
    # and the hooks are gone afterwards: the target is itself again
    h, _ = run_body(target, t)
    torch.testing.assert_close(h, run_body(target, t)[0])


def test_second_truth_noise_sits_on_every_layers_attention_projections_only(target):
    noise = LowRankNoise(target, family(modules=ATTENTION))
    n = len(target.model.layers)
    want = {f"model.layers.{i}.self_attn.{m}" for i in range(n) for m in ATTENTION}
    assert {name for name, _ in noise.linears} == want
    # in an instance, each attention projection's output moves and every other linear's does not
    x = {
        name: torch.randn(2, m.in_features)
        for name, m in target.named_modules()
        if isinstance(m, torch.nn.Linear)
    }
    mods = dict(target.named_modules())
    plain = {name: mods[name](v) for name, v in x.items()}
    with noise.instance(3):
        moved = {name for name, v in x.items() if not torch.equal(mods[name](v), plain[name])}
    assert moved == want
    assert noise.prefix_layers == 0


def test_prefix_gives_the_full_pass_and_mi_is_the_instances_jsd(target):
    t = flat()
    at = t.scored()[0]
    fam = family(layers=1, samples=4)
    noise = LowRankNoise(target, fam)
    _, prefix = run_body(target, t, hidden_at=noise.prefix_layers)
    for seed in fam.seeds:
        torch.testing.assert_close(
            noise.logprobs(seed, t, at, prefix), noise.logprobs(seed, t, at), atol=3e-5, rtol=0
        )
    members = torch.stack([noise.logprobs(s, t, at) for s in fam.seeds], 1)  # [T, S, V]
    torch.testing.assert_close(
        noise.mutual_information(t, at, prefix), mutual_information(members).double(), atol=1e-5, rtol=0
    )
    assert 0 < noise.cost()["target_passes_per_token"] < fam.samples  # two layers' worth + heads


def test_a_family_without_matching_linears_is_refused(target):
    with pytest.raises(ValueError, match="no linear"):
        LowRankNoise(target, family(modules=("w_nope",)))
