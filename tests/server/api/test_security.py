"""Security defaults: the API key guards every route but /health (including any route added
later), CORS is off unless configured, error bodies carry no stack traces or internal
details, and prompts and outputs are not logged."""

from __future__ import annotations

import logging

import httpx
import pytest
from fastapi.routing import APIRoute

from server.api.auth import OPEN_PATHS
from server.app import create_app
from server.config import Settings
from tests.server.api.live import LiveServer
from tests.server.scripted_engine import ScriptedEngine

KEY = "k-9f8e7d"
DATA_PATHS = {"/ready", "/metrics", "/v1/models", "/generate", "/v1/completions", "/v1/chat/completions"}
ORIGIN = "https://ui.example"
PREFLIGHT = {
    "Origin": ORIGIN,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization,content-type",
}


def test_every_route_but_the_open_ones_needs_the_key(tokenizer):
    """Open: /health (and static pages without data, if any); every other route, including any
    added later, answers 401 without the right key."""
    assert "/health" in OPEN_PATHS and not OPEN_PATHS & DATA_PATHS
    app = create_app(Settings(api_key=KEY), ScriptedEngine(tokenizer))
    routes = [(m, r.path) for r in app.routes if isinstance(r, APIRoute) for m in r.methods]
    assert {p for _, p in routes} >= DATA_PATHS | {"/health"}
    with LiveServer(app) as live:
        for method, path in routes:
            r = httpx.request(method, live.url + path, json={})
            if path in OPEN_PATHS:
                assert r.status_code == 200 and method == "GET", (method, path)
            else:
                assert r.status_code == 401, (method, path)
                assert (
                    httpx.request(
                        method, live.url + path, json={}, headers={"Authorization": f"Bearer {KEY}x"}
                    ).status_code
                    == 401
                )
        # FastAPI's own pages, if any were left on, are guarded too
        for path in ("/docs", "/openapi.json", "/redoc", "/nonexistent"):
            assert httpx.get(live.url + path).status_code == 401


def test_cors_is_off_by_default(tokenizer):
    with LiveServer(create_app(Settings(), ScriptedEngine(tokenizer))) as live:
        r = httpx.options(f"{live.url}/v1/chat/completions", headers=PREFLIGHT)
        assert "access-control-allow-origin" not in r.headers
        r = httpx.post(f"{live.url}/generate", json={"prompt": "hi"}, headers={"Origin": ORIGIN})
        assert r.status_code == 200 and "access-control-allow-origin" not in r.headers


def test_cors_allows_only_the_configured_origins(tokenizer):
    settings = Settings(cors_origins=[ORIGIN], api_key=KEY)
    with LiveServer(create_app(settings, ScriptedEngine(tokenizer))) as live:
        r = httpx.options(f"{live.url}/v1/chat/completions", headers=PREFLIGHT)  # no key needed
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = httpx.options(
            f"{live.url}/v1/chat/completions", headers={**PREFLIGHT, "Origin": "https://evil.example"}
        )
        assert r.headers.get("access-control-allow-origin") != "https://evil.example"
        r = httpx.post(
            f"{live.url}/generate",
            json={"prompt": "hi"},
            headers={"Origin": ORIGIN, "Authorization": f"Bearer {KEY}"},
        )
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == ORIGIN
        r = httpx.post(f"{live.url}/generate", json={"prompt": "hi"}, headers={"Origin": ORIGIN})
        assert r.status_code == 401  # CORS does not lift the key


class LeakyEngine(ScriptedEngine):
    """Fails with an exception whose message holds something secret."""

    async def generate(self, request_id, prompt_token_ids, params):
        if params.max_tokens == 2:
            raise RuntimeError("cannot open /srv/secrets/token=hunter2")
        async for item in super().generate(request_id, prompt_token_ids, params):
            yield item


@pytest.mark.parametrize("stream", [False, True])
def test_error_bodies_hold_no_stack_trace_or_internal_detail(tokenizer, stream, caplog):
    app = create_app(Settings(), LeakyEngine(tokenizer))
    with LiveServer(app) as live:
        r = httpx.post(f"{live.url}/generate", json={"prompt": "hi", "max_tokens": 2, "stream": stream})
    assert r.status_code == (200 if stream else 500)
    assert "RuntimeError" in r.text  # the kind of failure, nothing more
    for leak in ("hunter2", "/srv/secrets", "Traceback", ".py", 'File "'):
        assert leak not in r.text
    assert "hunter2" in caplog.text  # the details went to the server's log


def test_prompts_and_outputs_are_not_logged(engine, caplog):
    caplog.set_level(logging.DEBUG)
    marker = "Zanzibar quokka 7731"
    with LiveServer(create_app(Settings(log_level="debug"), engine)) as live:
        for path, body in [
            ("/generate", {"prompt": marker, "max_tokens": 8}),
            ("/v1/completions", {"prompt": marker, "max_tokens": 8, "stream": True}),
            ("/v1/chat/completions", {"messages": [{"role": "user", "content": marker}], "max_tokens": 8}),
        ]:
            r = httpx.post(live.url + path, json=body, timeout=60)
            assert r.status_code == 200
        out = httpx.post(
            f"{live.url}/generate", json={"prompt": marker, "max_tokens": 12, "temperature": 0}, timeout=60
        ).json()["text"]
    logged = caplog.text + "\n".join(str(r.args) for r in caplog.records)
    assert marker not in logged and "quokka" not in logged
    if len(out.strip()) >= 8:
        assert out not in logged
