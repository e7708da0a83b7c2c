"""Overload: beyond `max_pending_requests` generation requests, new ones get 429 with
Retry-After at once (counted in the metrics); probes stay open; capacity comes back."""

from __future__ import annotations

import threading

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings
from tests.server.api.live import LiveServer, wait_until
from tests.server.api.test_errors import request_count
from tests.server.scripted_engine import ScriptedEngine

CHAT = {"model": "scripted", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}


@pytest.fixture
def gated(tokenizer):
    gate = threading.Event()
    engine = ScriptedEngine(tokenizer, gate=gate)
    settings = Settings(max_pending_requests=2, retry_after_s=3)
    with LiveServer(create_app(settings, engine)) as live:
        yield live, engine, gate
        gate.set()


def test_beyond_the_bound_new_requests_get_429_with_retry_after(gated):
    live, engine, gate = gated
    with httpx.Client(base_url=live.url, timeout=30) as a, httpx.Client(base_url=live.url, timeout=30) as b:
        with (
            a.stream("POST", "/generate", json={"prompt": "hi", "stream": True}) as ra,
            b.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True}) as rb,
        ):
            assert ra.status_code == rb.status_code == 200
            lines_a, lines_b = ra.iter_lines(), rb.iter_lines()  # (a dropped iterator disconnects)
            assert next(lines_a).startswith("data: ") and next(lines_b).startswith("data: ")
            assert engine.running == 2
            for path, body in [
                ("/generate", {"prompt": "hi"}),
                ("/v1/completions", {"prompt": "hi"}),
                ("/v1/chat/completions", CHAT),
            ]:
                r = httpx.post(live.url + path, json=body, timeout=5)
                assert r.status_code == 429, r.text
                assert r.headers["retry-after"] == "3"
                assert r.json()["error"]["code"] == "overloaded"
            client = openai.OpenAI(base_url=f"{live.url}/v1", api_key="x", max_retries=0, timeout=5)
            with pytest.raises(openai.RateLimitError):
                client.chat.completions.create(**CHAT)
            for probe in ("/health", "/ready", "/metrics", "/v1/models"):
                assert httpx.get(live.url + probe).status_code == 200
            gate.set()
            assert [x for x in lines_a if x][-1].startswith('data: {"summary"')
            assert [x for x in lines_b if x][-1] == "data: [DONE]"
    assert wait_until(lambda: engine.running == 0)
    r = httpx.post(f"{live.url}/generate", json={"prompt": "hi"}, timeout=10)
    assert r.status_code == 200 and r.json()["finish_reason"] == "length"
    metrics = httpx.get(f"{live.url}/metrics").text
    assert request_count(metrics, "/generate", "overloaded") == 1
    assert request_count(metrics, "/v1/chat/completions", "overloaded") == 2
    assert request_count(metrics, "/v1/completions", "overloaded") == 1
    assert 'epispec_engine_requests{model="scripted"} 0.0' in metrics  # read from the engine


def test_rejected_and_abandoned_requests_free_their_place(gated):
    live, engine, gate = gated
    for _ in range(5):  # more than the bound: 4xx answers give their place back
        assert httpx.post(f"{live.url}/generate", json={"prompt": 5}).status_code == 400
    for _ in range(3):  # so do streams the client leaves
        with httpx.Client(base_url=live.url, timeout=30) as c:
            with c.stream("POST", "/generate", json={"prompt": "hi", "stream": True}) as r:
                lines = r.iter_lines()
                assert next(lines).startswith("data: ")
    assert wait_until(lambda: engine.running == 0)
    gate.set()
    assert httpx.post(f"{live.url}/generate", json={"prompt": "hi"}, timeout=10).status_code == 200
