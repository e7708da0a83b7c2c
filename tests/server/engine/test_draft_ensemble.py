"""The batched draft ensemble against transformers run on each whole prefix.

Rounds are simulated with random acceptance (a random prefix of the proposal stands, then a
random token), so slots are cropped, extended by bonus tokens and fed uneven suffixes in one
batch. Every record must equal the exact variance and q̄ of its own prefix, every proposal
must be greedy on q̄, and finished requests must free their slots.
"""

from __future__ import annotations

import random

import pytest
import torch

from server.engine.draft_ensemble import DraftEnsemble, RowInput, log_mix_from_record
from server.engine.models import load_causal_lm
from server.engine.uncertainty import mixture_logprobs, variance


@pytest.fixture(scope="module")
def drafts(tiny_models):
    return [load_causal_lm(d) for d in tiny_models["drafts"]]


@torch.no_grad()
def _exact(drafts, history: list[int]) -> torch.Tensor:
    """All drafts' log-probs of the token after `history`. [M, V]"""
    return torch.stack([torch.log_softmax(d(input_ids=torch.tensor([history])).logits[0, -1], -1)
                        for d in drafts])


@pytest.mark.parametrize("top_n", [-1, 16, 0])
def test_records_and_proposals_match_full_recompute(tiny_models, drafts, top_n):
    ens = DraftEnsemble(tiny_models["drafts"], k=3, slots=4, max_len=256, top_n=top_n)
    rng = random.Random(0)
    hists = {"a": [1, 5, 7, 9, 11], "b": [1, 20, 30], "c": [1, 44, 45, 46, 47, 48, 49]}
    proposals = {r: [] for r in hists}
    for step in range(5):
        rows = []
        for rid, h in hists.items():
            p = proposals[rid]
            new = p[: rng.randint(0, len(p))] + [rng.randint(3, 300)]
            h.extend(new)
            rows.append(RowInput(rid, torch.tensor(h), len(new), final=(step == 4)))
        outs = ens.propose(rows)
        for row, out in zip(rows, outs, strict=True):
            h = hists[row.req_id]
            assert [r.position for r in out.records] == list(range(len(h) - row.num_emitted, len(h)))
            for rec in out.records:
                lp = _exact(drafts, h[: rec.position])  # [M, V]
                assert abs(float(variance(lp)) - rec.variance) < 1e-4
                q_mix = mixture_logprobs(lp).exp()  # [V]
                if top_n == 0:  # the whole of log q̄, no top-N
                    assert rec.ids is None and rec.log_mix.shape == q_mix.shape
                    assert (rec.log_mix.exp() - q_mix).abs().max() < 1e-5
                    continue
                got = log_mix_from_record(rec.ids, rec.probs, q_mix.shape[-1]).exp()
                known = got > 0
                assert known.sum() == (q_mix.shape[-1] if top_n < 0 else top_n)
                assert (got[known] - q_mix[known]).abs().max() < 1e-5
            hh = list(h)
            for t in out.proposal:
                assert int(mixture_logprobs(_exact(drafts, hh)).argmax()) == t
                hh.append(t)
            proposals[row.req_id] = out.proposal
            assert out.draft_passes == 3
    assert ens.num_states() == 0  # every row was final in the last step


def test_release_frees_slots_of_requests_gone_from_the_batch(tiny_models):
    ens = DraftEnsemble(tiny_models["drafts"], k=2, slots=2, max_len=64)
    ens.propose([RowInput("x", torch.tensor([1, 5, 6]), 1), RowInput("y", torch.tensor([1, 7]), 1)])
    assert ens.num_states() == 2
    ens.release({"y"})  # x was aborted
    assert ens.num_states() == 1
    ens.propose([RowInput("z", torch.tensor([1, 9]), 1)])  # x's slot is reused
    assert ens.num_states() == 2


def test_caches_grow_with_concurrency_and_keep_rows_in_use(tiny_models, drafts):
    ens = DraftEnsemble(tiny_models["drafts"], k=2, slots=20, max_len=64, top_n=-1)
    first = ens.propose([RowInput("r0", torch.tensor([1, 5, 6]), 1)])[0]
    rows = [RowInput(f"n{i}", torch.tensor([1, 7 + i]), 1) for i in range(2 * ens.INITIAL_SLOTS)]
    ens.propose(rows)  # needs more slots than allocated: the caches double twice
    assert ens.capacity == 20 and ens.num_states() == 2 * ens.INITIAL_SLOTS + 1
    # r0's cached keys survived the growth: its next record equals a full recompute
    h = [1, 5, 6, *first.proposal[:1], 9]
    out = ens.propose([RowInput("r0", torch.tensor(h), 2)])[0]
    for rec in out.records:
        assert abs(float(variance(_exact(drafts, h[: rec.position]))) - rec.variance) < 1e-4
