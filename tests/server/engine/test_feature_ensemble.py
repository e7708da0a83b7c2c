"""Feature drafts in the batched proposer (`DraftEnsemble` over the paged KV cache) against
teacher forcing: rounds are simulated as vLLM runs them (each step hands the target's features
of the positions it computed: a prompt, or the last token and the proposal, rejected tokens
included), and every record must equal the drafts' exact variance and q̄ read from the
target's own features."""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.draft_ensemble import DraftEnsemble, LogMix, RowInput, TopN
from server.engine.feature_draft import load_feature_drafts
from server.engine.models import load_causal_lm
from server.engine.teacher_forced import forced_feature_logprobs
from server.engine.uncertainty import mixture_logprobs, variance


@pytest.fixture(scope="module")
def models(tiny_models, feature_drafts):
    return load_causal_lm(tiny_models["target"]), load_feature_drafts(feature_drafts, tiny_models["target"])


@torch.no_grad()
def _features(target, ids: list[int]) -> torch.Tensor:
    return target.model(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [L, E]


def _simulate(ens, target, hists, steps, rng, withhold=()):
    """Rounds with random acceptance; yields (rows, outs) per step. `withhold`: request ids whose
    prompt features are not handed over (vLLM's prefix cache served them)."""
    proposals = {r: [] for r in hists}
    computed = {r: 0 for r in hists}  # positions the target has computed so far
    for step in range(steps):
        rows = []
        for rid, h in hists.items():
            p = proposals[rid]
            fed = h + p  # what the target computed this step: from position computed[rid]
            f = _features(target, fed)[computed[rid] :]
            start = computed[rid]
            if step == 0 and rid in withhold:
                f, start = f[len(h) - 1 :], len(h) - 1  # only the last prompt token's
            new = p[: rng.randint(0, len(p))] + [rng.randint(3, 300)]
            h.extend(new)
            computed[rid] = len(h) - 1
            rows.append(RowInput(rid, torch.tensor(h), len(new), features=f, feature_start=start))
        outs = ens.propose(rows)
        for row, out in zip(rows, outs, strict=True):
            proposals[row.req_id] = out.proposal
        yield rows, outs


@pytest.mark.parametrize("summary", [TopN(None), LogMix()])
def test_records_equal_teacher_forced_feature_drafts(tiny_models, feature_drafts, models, summary):
    target, fd = models
    ens = DraftEnsemble(
        feature_drafts, k=3, slots=4, max_len=256, summary=summary, target=tiny_models["target"]
    )
    hists = {"a": [1, 5, 7, 9, 11], "b": [1, 20, 30], "c": [1, 44, 45, 46, 47, 48, 49]}
    for rows, outs in _simulate(ens, target, hists, 5, random.Random(0)):
        for row, out in zip(rows, outs, strict=True):
            h = row.history.tolist()
            assert [r.position for r in out.records] == list(range(len(h) - row.num_emitted, len(h)))
            assert out.missing_features == 0 and len(out.proposal) == 3
            for rec in out.records:
                lp = forced_feature_logprobs(target, fd, h[: rec.position + 1], rec.position)[-1]  # [M, V]
                assert abs(float(variance(lp)) - rec.variance) < 1e-4
                q = mixture_logprobs(lp).exp()
                got = (
                    ens.target_log_mix(rec.log_mix).exp()
                    if isinstance(summary, LogMix)
                    else torch.zeros_like(q).index_put_((rec.ids.long(),), rec.probs)
                )
                assert (got - q).abs().max() < 1e-5
            first = forced_feature_logprobs(target, fd, h + [0], len(h))[-1]  # q at the next position
            assert int(mixture_logprobs(first).argmax()) == out.proposal[0]


def test_a_prefix_cache_hit_serves_with_zero_features_counted(tiny_models, feature_drafts, models):
    target, _ = models
    ens = DraftEnsemble(
        feature_drafts, k=2, slots=2, max_len=128, summary=LogMix(), target=tiny_models["target"]
    )
    hists = {"hit": [1, 5, 7, 9, 11, 13, 15], "cold": [1, 5, 7, 9, 11, 13, 15]}
    outs = [o for _, o in _simulate(ens, target, hists, 3, random.Random(1), withhold={"hit"})]
    assert outs[0][0].missing_features == 6 and outs[0][1].missing_features == 0  # f_0 … f_5 withheld
    for step in outs:
        for out in step:
            assert all(torch.isfinite(torch.tensor(r.variance)) for r in out.records) and out.proposal
    ens.release(set())
    assert ens.num_states() == 0 and not ens._feats


def test_a_parked_row_resumes_and_keeps_the_features_it_was_handed(tiny_models, feature_drafts, models):
    """With room for one request, a second is parked (no proposal, no records); its features stay
    buffered, so when the first ends it recomputes its history from the target's own features:
    exact records, nothing counted missing."""
    target, fd = models
    ens = DraftEnsemble(
        feature_drafts,
        k=2,
        slots=1,
        max_len=64,
        summary=LogMix(),
        kv_tokens=8,
        block_size=4,
        target=tiny_models["target"],
    )
    a, b = [1, 5, 6, 7, 8], [1, 20, 21]
    fa, fb = _features(target, a[:-1]), _features(target, b[:-1])
    ens.propose([RowInput("a", torch.tensor(a), 1, features=fa)])  # 2 blocks: the whole pool
    a.append(9)
    b_row = RowInput("b", torch.tensor(b), 1, features=fb)
    fa2 = _features(target, a[:-1])[-1:]
    outs = ens.propose([RowInput("a", torch.tensor(a), 1, features=fa2, feature_start=len(a) - 2), b_row])
    assert outs[1].parked and outs[1].proposal == [] and outs[1].records == []
    ens.release({"b"})  # a ends
    b.append(22)
    out = ens.propose(
        [RowInput("b", torch.tensor(b), 1, features=_features(target, b)[-2:-1], feature_start=2)]
    )[0]
    assert not out.parked and out.missing_features == 0 and [r.position for r in out.records] == [3]
    lp = forced_feature_logprobs(target, fd, b, 3)[-1]  # [M, V]
    assert abs(float(variance(lp)) - out.records[0].variance) < 1e-4
