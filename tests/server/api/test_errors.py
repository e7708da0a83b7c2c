"""Every client mistake is a 4xx with an OpenAI-shaped body naming the field; never a 500;
the server keeps serving afterwards."""

from __future__ import annotations

import pytest
from prometheus_client.parser import text_string_to_metric_families

CHAT = "/v1/chat/completions"
MSG = [{"role": "user", "content": "hi"}]
LONG = "Question: " + "apples and pears " * 200  # far beyond max_model_len=96 tokens

CASES = [
    # (name, path, body (dict, or raw bytes), status, param)
    ("malformed json", "/generate", b'{"prompt": "hi",', 400, None),
    ("json not an object", "/generate", b"[1, 2]", 400, None),
    ("prompt wrong type", "/generate", {"prompt": 5}, 400, "prompt"),
    ("max_tokens wrong type", "/generate", {"prompt": "hi", "max_tokens": "many"}, 400, "max_tokens"),
    ("stream wrong type", "/generate", {"prompt": "hi", "stream": "yes"}, 400, "stream"),
    ("missing prompt", "/generate", {"max_tokens": 2}, 400, "prompt"),
    ("both prompts", "/generate", {"prompt": "hi", "prompt_token_ids": [1]}, 400, "prompt"),
    ("empty prompt", "/generate", {"prompt": ""}, 400, "prompt"),
    ("empty prompt ids", "/generate", {"prompt_token_ids": []}, 400, "prompt_token_ids"),
    ("token id outside vocabulary", "/generate", {"prompt_token_ids": [10**9]}, 400, "prompt_token_ids"),
    ("unknown field", "/generate", {"prompt": "hi", "temprature": 0}, 400, "temprature"),
    ("max_tokens zero", "/generate", {"prompt": "hi", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens negative", "/v1/completions", {"prompt": "hi", "max_tokens": -3}, 400, "max_tokens"),
    ("max_tokens beyond context", "/generate", {"prompt": "hi", "max_tokens": 500}, 400, "max_tokens"),
    ("prompt too long", "/generate", {"prompt": LONG}, 400, "prompt"),
    ("chat prompt too long", CHAT, {"messages": [{"role": "user", "content": LONG}]}, 400, "messages"),
    ("temperature NaN", "/generate", b'{"prompt": "hi", "temperature": NaN}', 400, "temperature"),
    (
        "temperature infinite",
        CHAT,
        b'{"messages": [{"role": "user", "content": "hi"}], "temperature": Infinity}',
        400,
        "temperature",
    ),
    ("seed beyond int64", "/generate", {"prompt": "hi", "seed": 2**70}, 400, "seed"),
    ("temperature negative", "/generate", {"prompt": "hi", "temperature": -0.1}, 400, "temperature"),
    ("top_p zero", "/generate", {"prompt": "hi", "top_p": 0}, 400, "top_p"),
    ("top_p above one", CHAT, {"messages": MSG, "top_p": 1.5}, 400, "top_p"),
    ("too many logprobs", "/generate", {"prompt": "hi", "logprobs": 21}, 400, "logprobs"),
    (
        "too many top_logprobs",
        CHAT,
        {"messages": MSG, "logprobs": True, "top_logprobs": 50},
        400,
        "top_logprobs",
    ),
    (
        "threshold out of bounds",
        "/generate",
        {"prompt": "hi", "thresholds": {"eu": -1}},
        400,
        "thresholds.eu",
    ),
    ("threshold too high", CHAT, {"messages": MSG, "thresholds": {"bias": 1e9}}, 400, "thresholds.bias"),
    ("missing messages", CHAT, {"model": "tiny"}, 400, "messages"),
    ("empty messages", CHAT, {"messages": []}, 400, "messages"),
    ("unknown role", CHAT, {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages[0].role"),
    (
        "image content part",
        CHAT,
        {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
        400,
        "messages[0].content[0].type",
    ),
    ("stop of numbers", "/generate", {"prompt": "hi", "stop": [1]}, 400, "stop[0]"),
    ("prompt of wrong type", "/v1/completions", {"prompt": 5}, 400, "prompt"),
    ("messages without text", CHAT, {"messages": [{"role": "user", "content": ""}]}, 400, "messages"),
    ("n above one", CHAT, {"messages": MSG, "n": 2}, 400, "n"),
    ("echo", "/v1/completions", {"prompt": "hi", "echo": True}, 400, "echo"),
    ("several prompts", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("unknown model", CHAT, {"model": "gpt-9", "messages": MSG}, 404, "model"),
    ("unknown model completions", "/v1/completions", {"model": "x", "prompt": "hi"}, 404, "model"),
    ("body too large", "/generate", {"prompt": "x" * 5000}, 413, None),
    ("temperature above two", "/generate", {"prompt": "hi", "temperature": 2.01}, 400, "temperature"),
    (
        "temperature above two streamed",
        "/generate",
        {"prompt": "hi", "temperature": 2.5, "stream": True},
        400,
        "temperature",
    ),
    ("temperature above two chat", CHAT, {"messages": MSG, "temperature": 3}, 400, "temperature"),
    (
        "stream_options without stream",
        "/v1/completions",
        {"prompt": "hi", "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    (
        "stream_options with stream false",
        CHAT,
        {"messages": MSG, "stream": False, "stream_options": {"include_usage": True}},
        400,
        "stream_options",
    ),
    ("prompt of nested token lists", "/v1/completions", {"prompt": [[1, 2], [3]]}, 400, "prompt"),
    ("prompt of mixed list", "/v1/completions", {"prompt": [1, "a"]}, 400, "prompt"),
]


@pytest.mark.parametrize("name,path,body,status,param", CASES, ids=[c[0] for c in CASES])
def test_client_mistakes_are_openai_shaped_4xx(client, name, path, body, status, param):
    if isinstance(body, bytes):
        r = client.post(path, content=body, headers={"content-type": "application/json"})
    else:
        r = client.post(path, json=body)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["message"] and err["type"] == "invalid_request_error"
    assert err["param"] == param


def test_prompt_error_says_what_is_accepted(client):
    err = client.post("/v1/completions", json={"prompt": {"text": "hi"}}).json()["error"]
    assert "a list of token ids" in err["message"] and "a list of one list" in err["message"]


def test_rejected_requests_hold_no_engine_state(client, engine):
    """Every kind of refusal, including the engine's own validation, leaves nothing running."""
    for _, path, body, _, _ in CASES:
        if isinstance(body, dict):
            client.post(path, json=body)
    assert engine.num_running() == 0
    assert client.get("/ready").json()["running"] == 0


def test_engine_validation_is_a_400_naming_the_field(engine):
    """The engines' own range check (the same in both): a request that reached an engine
    past the API schema is refused before it holds state."""
    import asyncio

    from server.engine.types import InvalidRequest, SamplingParams

    async def first():
        return await engine.generate("t", [1, 2], SamplingParams(temperature=2.5)).__anext__()

    with pytest.raises(InvalidRequest) as info:
        asyncio.run(first())
    assert info.value.param == "temperature" and engine.num_running() == 0


def test_chunked_body_over_the_limit_is_413(client):
    def chunks():
        for _ in range(10):
            yield b"x" * 1000

    r = client.post("/generate", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413


def test_unknown_route_is_openai_shaped_404(client):
    r = client.get("/v1/nothing")
    assert r.status_code == 404 and r.json()["error"]["type"] == "not_found_error"


def test_server_still_serves_after_the_mistakes(client):
    r = client.post("/generate", json={"prompt": "hi", "max_tokens": 2})
    assert r.status_code == 200
    assert client.get("/health").json() == {"status": "ok"}
    assert request_count(client.get("/metrics").text, "/generate", "rejected") >= 10


def request_count(metrics_text: str, endpoint: str, status: str) -> float:
    """epispec_requests_total{endpoint, status} from Prometheus text."""
    for family in text_string_to_metric_families(metrics_text):
        for s in family.samples:
            if (
                s.name == "epispec_requests_total"
                and s.labels.get("endpoint") == endpoint
                and s.labels.get("status") == status
            ):
                return s.value
    return 0.0
