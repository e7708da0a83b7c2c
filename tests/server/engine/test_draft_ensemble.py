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

from server.engine.draft_ensemble import DraftEnsemble, LogMix, RowInput, TopN, log_mix_from_record
from server.engine.draft_kernels import LlamaGroup
from server.engine.models import load_causal_lm, load_draft
from server.engine.uncertainty import mixture_logprobs, variance


@pytest.fixture(scope="module")
def drafts(tiny_models):
    return [load_causal_lm(d) for d in tiny_models["drafts"]]


@pytest.fixture(scope="module", params=["full", "reduced"])
def draft_set(request, tiny_models):
    """(folders, models over the target's vocabulary): the tiny drafts, or their reduced-vocabulary
    copies (draft_vocab.json) seen through load_draft."""
    paths = tiny_models["drafts"] if request.param == "full" else request.getfixturevalue("reduced_drafts")
    return paths, [load_draft(d) for d in paths]


@torch.no_grad()
def _exact(drafts, history: list[int]) -> torch.Tensor:
    """All drafts' log-probs of the token after `history`. [M, V]"""
    return torch.stack(
        [torch.log_softmax(d(input_ids=torch.tensor([history])).logits[0, -1], -1) for d in drafts]
    )


def _verified_rows(hists: dict[str, list[int]], proposals: dict[str, list[int]], rng) -> list[RowInput]:
    """One simulated verification step: each request accepts a random prefix of its last
    proposal plus one token of the target's; its history grows by them (in place)."""
    rows = []
    for rid, h in hists.items():
        p = proposals[rid]
        new = p[: rng.randint(0, len(p))] + [rng.randint(3, 300)]
        h.extend(new)
        rows.append(RowInput(rid, torch.tensor(h), len(new)))
    return rows


@pytest.mark.parametrize("summary", [TopN(None), TopN(16), LogMix()])
def test_records_and_proposals_match_full_recompute(draft_set, summary):
    paths, drafts = draft_set
    ens = DraftEnsemble(paths, k=3, slots=4, max_len=256, summary=summary)
    support = int(torch.isfinite(_exact(drafts, [1])[0]).sum())  # |S|: V, or V_d when reduced
    rng = random.Random(0)
    hists = {"a": [1, 5, 7, 9, 11], "b": [1, 20, 30], "c": [1, 44, 45, 46, 47, 48, 49]}
    proposals = {r: [] for r in hists}
    for _ in range(5):
        rows = _verified_rows(hists, proposals, rng)
        outs = ens.propose(rows)
        for row, out in zip(rows, outs, strict=True):
            h = hists[row.req_id]
            assert [r.position for r in out.records] == list(range(len(h) - row.num_emitted, len(h)))
            for rec in out.records:
                lp = _exact(drafts, h[: rec.position])  # [M, V]
                assert abs(float(variance(lp)) - rec.variance) < 1e-4
                q_mix = mixture_logprobs(lp).exp()  # [V]
                if isinstance(summary, LogMix):  # the whole of log q̄ over S, no top-N
                    assert rec.ids is None and rec.log_mix.shape == (support,)
                    assert (ens.target_log_mix(rec.log_mix).exp() - q_mix).abs().max() < 1e-5
                    continue
                got = log_mix_from_record(rec.ids, rec.probs, q_mix.shape[-1]).exp()
                known = got > 0
                assert known.sum() == (support if summary.n is None else summary.n)
                assert (got[known] - q_mix[known]).abs().max() < 1e-5
            hh = list(h)
            for t in out.proposal:
                assert int(mixture_logprobs(_exact(drafts, hh)).argmax()) == t
                hh.append(t)
            proposals[row.req_id] = out.proposal
            assert out.draft_passes == 3
    assert ens.forget(set(hists) | {"never-seen"}) == 3  # vLLM's finished set: all three end
    assert ens.num_states() == 0


def test_release_frees_slots_and_blocks_of_requests_gone_from_the_batch(tiny_models):
    ens = DraftEnsemble(tiny_models["drafts"], k=2, slots=2, max_len=64, block_size=4)
    ens.propose([RowInput("x", torch.tensor([1, 5, 6]), 1), RowInput("y", torch.tensor([1, 7]), 1)])
    assert ens.num_states() == 2 and ens.pool.blocks_in_use() == 2
    ens.release({"y"})  # x was aborted
    assert ens.num_states() == 1 and ens.pool.blocks_of("x") == [] and ens.pool.blocks_in_use() == 1
    ens.propose([RowInput("z", torch.tensor([1, 9]), 1)])  # x's block is reused
    assert ens.num_states() == 2 and ens.pool.blocks_in_use() == 2
    ens.propose([RowInput("z", torch.tensor([1, 9, 4]), 1)])
    assert ens.forget({"z"}) == 1  # vLLM's finished set names z
    assert ens.num_states() == 1 and ens.pool.blocks_of("z") == [] and ens.forget({"z"}) == 0
    ens.release(set())
    assert ens.num_states() == 0 and ens.pool.blocks_in_use() == 0 and ens.kv_bytes_held() == 0


def test_blocks_follow_tokens_held_and_rows_keep_their_keys(tiny_models, drafts):
    """Requests take blocks as their histories grow, from wherever the pool has them; a row
    whose blocks are not adjacent still reads its own keys (records equal a full recompute)."""
    ens = DraftEnsemble(tiny_models["drafts"], k=2, slots=20, max_len=64, summary=TopN(None), block_size=4)
    first = ens.propose([RowInput("r0", torch.tensor([1, 5, 6]), 1)])[0]
    assert len(ens.pool.blocks_of("r0")) == 1  # ⌈(3 + k − 1) / 4⌉
    ens.propose([RowInput(f"n{i}", torch.tensor([1, 7 + i]), 1) for i in range(16)])
    assert ens.num_states() == 17 and ens.pool.blocks_in_use() == 17
    assert ens.kv_bytes_held("r0") == 4 * ens.kv_bytes_per_token
    h = [1, 5, 6, *first.proposal[:1], 9]
    out = ens.propose([RowInput("r0", torch.tensor(h), 2)])[0]
    table = ens.pool.blocks_of("r0")
    assert len(table) == 2 and table[1] != table[0] + 1  # ⌈(5 + 1) / 4⌉, the second taken last
    for rec in out.records:
        assert abs(float(variance(_exact(drafts, h[: rec.position]))) - rec.variance) < 1e-4
    _assert_records_exact(drafts, h, out, 2)


def test_a_full_pool_parks_a_row_which_later_resumes_exactly(tiny_models, drafts):
    """With room for one request, a second one is parked (no proposal, no records, nothing
    held) and, once the first is released, recomputes its history: exact records again."""
    ens = DraftEnsemble(
        tiny_models["drafts"], k=2, slots=1, max_len=64, summary=TopN(None), kv_tokens=8, block_size=4
    )
    ens.propose([RowInput("a", torch.tensor([1, 5, 6, 7, 8]), 1)])  # 2 blocks: the whole pool
    a, b = [1, 5, 6, 7, 8, 9], [1, 20, 21]
    outs = ens.propose([RowInput("a", torch.tensor(a), 1), RowInput("b", torch.tensor(b), 1)])
    assert outs[1].parked and outs[1].proposal == [] and outs[1].records == []
    assert not outs[0].parked and outs[0].proposal and ens.pool.blocks_of("b") == []
    ens.release({"b"})  # a ends
    b.append(22)
    out = ens.propose([RowInput("b", torch.tensor(b), 1)])[0]
    assert not out.parked
    _assert_records_exact(drafts, b, out, 1)


def test_feed_groups_keep_decode_rows_apart_from_long_feeds():
    from server.engine.draft_ensemble import _feed_groups

    assert _feed_groups([1, 200, 2, 4, 5, 190, 40, 1], short=4) == [[0, 2, 3, 7], [1, 5], [6], [4]]
    assert _feed_groups([1, 2], short=4) == [[0, 1]]
    assert _feed_groups([30], short=4) == [[0]]


def _assert_records_exact(drafts, h, out, num_emitted):
    """TopN(None) records and greedy proposals against transformers on each whole prefix."""
    assert [r.position for r in out.records] == list(range(len(h) - num_emitted, len(h)))
    for rec in out.records:
        lp = _exact(drafts, h[: rec.position])
        assert abs(float(variance(lp)) - rec.variance) < 1e-4
        q_mix = mixture_logprobs(lp).exp()
        got = log_mix_from_record(rec.ids, rec.probs, q_mix.shape[-1]).exp()
        assert (got - q_mix).abs().max() < 1e-5
    hh = list(h)
    for t in out.proposal:
        assert int(mixture_logprobs(_exact(drafts, hh)).argmax()) == t
        hh.append(t)


def test_new_long_prompt_next_to_decoding_rows_matches_separate_runs(tiny_models, drafts, monkeypatch):
    """A new 60-token prompt joins 4 decoding rows: step 1 splits into a decode forward and a
    prompt forward; proposals and records equal those of the rows run apart and a full recompute."""
    k = 3
    mixed = DraftEnsemble(tiny_models["drafts"], k=k, slots=8, max_len=256, summary=TopN(None))
    apart = DraftEnsemble(tiny_models["drafts"], k=k, slots=8, max_len=256, summary=TopN(None))
    rng = random.Random(1)
    hists = {f"d{i}": [1, 10 + i, 20 + i] for i in range(4)}
    proposals = {r: [] for r in hists}
    prompt = [1] + [rng.randint(3, 300) for _ in range(59)]
    for step in range(3):
        rows = _verified_rows(hists, proposals, rng)
        if step < 2:
            outs = mixed.propose(rows)
            apart.propose(rows)
        else:  # the long prompt arrives (its first emitted token) while the others decode
            long_row = RowInput("p", torch.tensor(prompt), 1)
            shapes = []
            forward = LlamaGroup.forward

            def spy(self, tokens, *a, shapes=shapes, forward=forward):
                shapes.append(tuple(tokens.shape))
                return forward(self, tokens, *a)

            monkeypatch.setattr(LlamaGroup, "forward", spy)
            outs = mixed.propose([rows[0], rows[1], long_row, rows[2], rows[3]])
            monkeypatch.undo()
            n_groups = len(mixed.drafts)  # stacked draft groups: forwards per batched step
            step1 = shapes[: 2 * n_groups]  # decode rows together, the prompt alone
            assert step1[0][0] == 4 and step1[0][1] <= k + 1 and step1[-1] == (1, 60)
            assert shapes[2 * n_groups :] == [(5, 1)] * ((k - 1) * n_groups)
            ref = apart.propose(rows) + apart.propose([long_row])
            ref = [ref[0], ref[1], ref[4], ref[2], ref[3]]
            for out, r in zip(outs, ref, strict=True):
                assert out.proposal == r.proposal and out.draft_passes == r.draft_passes == k
                assert [x.position for x in out.records] == [x.position for x in r.records]
                for x, y in zip(out.records, r.records, strict=True):
                    assert abs(x.variance - y.variance) < 1e-5
                    v = len(x.ids)  # TopN(None): all of q̄
                    assert (
                        log_mix_from_record(x.ids, x.probs, v).exp()
                        - log_mix_from_record(y.ids, y.probs, v).exp()
                    ).abs().max() < 1e-6
            _assert_records_exact(drafts, prompt, outs[2], 1)
            outs = [outs[0], outs[1], outs[3], outs[4]]
        for row, out in zip(rows, outs, strict=True):
            _assert_records_exact(drafts, hists[row.req_id], out, row.num_emitted)
            assert out.draft_passes == k
            proposals[row.req_id] = out.proposal


def _run_rounds(ens, seed: int, accept: bool = True, steps: int = 4) -> list:
    """Three requests over `steps` rounds (a random accepted prefix when `accept`), one of them
    joining late with a 40-token prompt; every round's outputs."""
    rng = random.Random(seed)
    hists = {"a": [1, 5, 7, 9, 11], "b": [1, 20, 30], "c": [1] + [rng.randint(3, 300) for _ in range(39)]}
    proposals = {r: [] for r in hists}
    rounds = []
    for step in range(steps):
        rows = []
        for rid, h in hists.items():
            if rid == "c" and step < 2:
                continue
            p = proposals[rid]
            new = (p[: rng.randint(0, len(p))] if accept else []) + [rng.randint(3, 300)]
            h.extend(new)
            rows.append(RowInput(rid, torch.tensor(h), len(new)))
        outs = ens.propose(rows)
        for row, out in zip(rows, outs, strict=True):
            proposals[row.req_id] = out.proposal
        rounds.append(outs)
    return rounds


def test_block_size_changes_nothing_but_memory(tiny_models):
    """Blocks of 1, 16 and 256 tokens (one block: a contiguous cache) give identical outputs."""
    runs = [
        _run_rounds(
            DraftEnsemble(
                tiny_models["drafts"], k=3, slots=4, max_len=256, summary=TopN(None), block_size=bs
            ),
            3,
        )
        for bs in (1, 16, 256)
    ]
    for other in runs[1:]:
        for outs, ref in zip(other, runs[0], strict=True):
            for x, y in zip(outs, ref, strict=True):
                assert x.proposal == y.proposal and [r.position for r in x.records] == [
                    r.position for r in y.records
                ]
                for p, q in zip(x.records, y.records, strict=True):
                    assert abs(p.variance - q.variance) < 1e-6 and torch.equal(p.ids, q.ids)
                    assert (p.probs - q.probs).abs().max() < 1e-6


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_drafts_stay_close_to_float32(tiny_models, dtype):
    """bf16/fp16 weights and caches (norms, log-softmax and the EU math in float32): every
    record's variance within 0.02 nats + 5 % and q̄ within 0.02 of float32 (nothing is accepted,
    so each ensemble's own proposal never enters the history)."""
    ref = _run_rounds(
        DraftEnsemble(tiny_models["drafts"], k=3, slots=4, max_len=256, summary=TopN(None)), 5, False
    )
    half = _run_rounds(
        DraftEnsemble(tiny_models["drafts"], k=3, slots=4, max_len=256, summary=TopN(None), dtype=dtype),
        5,
        False,
    )
    for outs, refs in zip(half, ref, strict=True):
        for x, y in zip(outs, refs, strict=True):
            for p, q in zip(x.records, y.records, strict=True):
                assert abs(p.variance - q.variance) < 0.02 + 0.05 * q.variance
                v = max(int(p.ids.max()), int(q.ids.max())) + 1
                got = log_mix_from_record(p.ids, p.probs, v).exp()
                want = log_mix_from_record(q.ids, q.probs, v).exp()
                assert (got - want).abs().max() < 0.02


@pytest.mark.parametrize("summary", [TopN(None), LogMix()])
def test_rows_proposing_fewer_or_none_keep_exact_records(draft_set, summary):
    """A speculation policy (`choose`) cuts proposals at random, to none for some rows and
    rounds: every emitted token still gets the exact variance and q̄ of its prefix, the proposal
    is the greedy prefix of the length chosen, a row that proposed nothing feeds exactly its one
    new token next round, and its draft state stays valid (records of later rounds exact too)."""
    paths, drafts = draft_set
    ens = DraftEnsemble(paths, k=3, slots=4, max_len=256, summary=summary)
    rng = random.Random(7)
    hists = {"a": [1, 5, 7, 9, 11], "b": [1, 20, 30], "c": [1, 44, 45, 46]}
    proposals = {r: [] for r in hists}
    chosen: dict[str, int] = {}
    seen = {"none": 0, "cut": 0, "full": 0}

    def choose(rows, confs):
        assert [len(c) for c in confs] == [3] * len(rows)
        assert all(0 < q <= 1 for c in confs for q in c)
        ks = [rng.choice([0, 0, 1, 3]) for _ in rows]
        chosen.update({r.req_id: k for r, k in zip(rows, ks, strict=True)})
        return ks

    fed = []
    forward = LlamaGroup.forward

    def spy(self, tokens, *a):
        fed.append(tuple(tokens.shape))
        return forward(self, tokens, *a)

    for _ in range(8):
        rows = _verified_rows(hists, proposals, rng)
        none_before = [rid for rid in hists if chosen.get(rid) == 0]
        fed.clear()
        LlamaGroup.forward = spy
        try:
            outs = ens.propose(rows, choose)
        finally:
            LlamaGroup.forward = forward
        if len(none_before) == len(hists):  # every row proposed nothing: step 1 feeds one token each
            assert fed[0] == (len(hists), 1)
        for row, out in zip(rows, outs, strict=True):
            h = hists[row.req_id]
            assert [r.position for r in out.records] == list(range(len(h) - row.num_emitted, len(h)))
            for rec in out.records:
                lp = _exact(drafts, h[: rec.position])  # [M, V]
                assert abs(float(variance(lp)) - rec.variance) < 1e-4
                q_mix = mixture_logprobs(lp).exp()
                if isinstance(summary, LogMix):
                    assert (ens.target_log_mix(rec.log_mix).exp() - q_mix).abs().max() < 1e-5
                else:
                    got = log_mix_from_record(rec.ids, rec.probs, q_mix.shape[-1]).exp()
                    assert (got[got > 0] - q_mix[got > 0]).abs().max() < 1e-5
            k = chosen[row.req_id]
            assert len(out.proposal) == k and len(out.confidence) == k
            hh = list(h)
            for t, c in zip(out.proposal, out.confidence, strict=True):
                q_mix = mixture_logprobs(_exact(drafts, hh)).exp()
                assert int(q_mix.argmax()) == t and abs(float(q_mix.max()) - c) < 1e-5
                hh.append(t)
            seen["none" if k == 0 else "cut" if k < 3 else "full"] += 1
            proposals[row.req_id] = out.proposal
    assert min(seen.values()) > 0, seen
