"""The optional bearer API key: required everywhere but /health, checked in constant time."""

from __future__ import annotations

import httpx
import openai
import pytest

from server.app import create_app
from server.config import Settings
from tests.server.api.live import LiveServer

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def guarded(engine):
    with LiveServer(create_app(Settings(api_key=KEY, default_max_tokens=2), engine)) as live:
        yield live


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": KEY}, {"Authorization": f"Basic {KEY}"}],
)
@pytest.mark.parametrize(
    "method,path",
    [
        ("POST", "/generate"),
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
        ("GET", "/ready"),
        ("GET", "/metrics"),
    ],
)
def test_without_the_key_is_401(guarded, headers, method, path):
    r = httpx.request(method, guarded.url + path, headers=headers, json={"prompt": "hi"})
    assert r.status_code == 401
    assert r.json()["error"]["type"] == "authentication_error"
    assert r.headers["www-authenticate"] == "Bearer"


def test_health_stays_open(guarded):
    assert httpx.get(f"{guarded.url}/health").status_code == 200


def test_with_the_key(guarded):
    auth = {"Authorization": f"Bearer {KEY}"}
    r = httpx.post(f"{guarded.url}/generate", headers=auth, json={"prompt": "hi"}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] >= 1
    assert httpx.get(f"{guarded.url}/ready", headers=auth).status_code == 200
    client = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key=KEY, max_retries=0)
    out = client.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "hi"}])
    assert out.choices[0].finish_reason in ("length", "stop")
    bad = openai.OpenAI(base_url=f"{guarded.url}/v1", api_key="nope", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()


def test_key_is_checked_before_the_body_is_read(guarded):
    r = httpx.post(
        f"{guarded.url}/generate", content=b'{"broken', headers={"content-type": "application/json"}
    )
    assert r.status_code == 401
    r = httpx.post(f"{guarded.url}/generate", content=b"x" * (2 << 20))
    assert r.status_code == 401
