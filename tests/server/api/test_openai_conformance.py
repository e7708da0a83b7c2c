"""OpenAI-API conformance (docs/openai-compat.md): every response shape passes the `openai`
package's own models in strict mode, streamed chunks included; spec-nullable fields take `null`;
a stop on uncertainty keeps the spec's finish_reason; what this server cannot honour is a 400
naming the field. Through the real `openai` client where a user would meet it, on the
reference engine (which cannot constrain output to JSON, so it refuses response_format)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
from openai.types import Completion, Model
from openai.types.chat import ChatCompletion, ChatCompletionChunk

CHAT, COMPLETIONS = "/v1/chat/completions", "/v1/completions"
MSG = [{"role": "user", "content": "Tom has 3 apples and buys 2. How many?"}]
PROMPT = "Question: Tom has 3 apples"
ALWAYS_FLAG = {"thresholds": {"eu": 0.0}, "stop_on_uncertainty": True}  # stops at the first token


@pytest.fixture
def oai(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def sse(client: httpx.Client, path: str, body: dict) -> list[dict]:
    """The data events of a streamed response, [DONE] excluded."""
    with client.stream("POST", path, json={**body, "stream": True}) as r:
        assert r.status_code == 200, r.read()
        lines = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


def bad_request(create, **kw) -> dict:
    """The error body of a call that must be a 400."""
    with pytest.raises(openai.BadRequestError) as info:
        create(**kw)
    assert info.value.status_code == 400
    return info.value.body


# --- every response shape, strictly


@pytest.mark.parametrize("logprobs", [False, True])
def test_chat_shapes_pass_the_openai_models_strictly(client, logprobs):
    body = {"messages": MSG, "max_tokens": 4, "temperature": 0, "logprobs": logprobs}
    whole = client.post(CHAT, json=body).json()
    ChatCompletion.model_validate(whole, strict=True)
    events = sse(client, CHAT, {**body, "stream_options": {"include_usage": True}})
    for chunk in events:
        ChatCompletionChunk.model_validate(chunk, strict=True)
    assert events[-1]["choices"] == [] and events[-1]["usage"] == whole["usage"]


@pytest.mark.parametrize("logprobs", [None, 2])
def test_completion_shapes_pass_the_openai_models_strictly(client, logprobs):
    body = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0, "logprobs": logprobs}
    Completion.model_validate(client.post(COMPLETIONS, json=body).json(), strict=True)
    *body_chunks, last, usage = sse(client, COMPLETIONS, {**body, "stream_options": {"include_usage": True}})
    for chunk in (last, usage):
        Completion.model_validate(chunk, strict=True)
    for chunk in body_chunks:
        # OpenAI streams finish_reason null before the last chunk, which the SDK's Completion
        # type (used for chunks unvalidated) does not allow: every other field is checked
        assert chunk["choices"][0]["finish_reason"] is None
        choice = {**chunk["choices"][0], "finish_reason": "length"}
        Completion.model_validate({**chunk, "choices": [choice]}, strict=True)


# --- 3. finish_reason stays in the spec; stop_reason says why


def test_stop_on_uncertainty_is_stop_with_a_stop_reason(oai, client):
    kw = {"model": "tiny", "messages": MSG, "max_tokens": 6, "temperature": 0}
    r = oai.chat.completions.create(**kw, extra_body=ALWAYS_FLAG)
    ChatCompletion.model_validate(r.model_dump(), strict=True)
    assert (r.choices[0].finish_reason, r.choices[0].stop_reason) == ("stop", "uncertainty")
    assert r.choices[0].uncertainty["summary"]["flagged"]
    *_, last = (c for c in oai.chat.completions.create(**kw, stream=True, extra_body=ALWAYS_FLAG))
    assert (last.choices[0].finish_reason, last.choices[0].stop_reason) == ("stop", "uncertainty")
    c = oai.completions.create(model="tiny", prompt=PROMPT, max_tokens=6, extra_body=ALWAYS_FLAG)
    assert (c.choices[0].finish_reason, c.choices[0].stop_reason) == ("stop", "uncertainty")
    final = sse(client, COMPLETIONS, {"prompt": PROMPT, "max_tokens": 6, **ALWAYS_FLAG})[-1]["choices"][0]
    assert (final["finish_reason"], final["stop_reason"]) == ("stop", "uncertainty")
    plain = oai.chat.completions.create(**kw, extra_body={"ignore_eos": True})  # runs to max_tokens
    assert (plain.choices[0].finish_reason, plain.choices[0].stop_reason) == ("length", None)
    own = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 6, **ALWAYS_FLAG}).json()
    assert own["finish_reason"] == "uncertainty"  # /generate keeps its own value


# --- 2. explicit null means the default


def test_spec_nullable_fields_take_null(client):
    nulls = dict.fromkeys(
        ("stream", "n", "logprobs", "top_logprobs", "max_tokens", "max_completion_tokens", "stop"), None
    )
    nulls |= dict.fromkeys(("temperature", "top_p", "seed", "presence_penalty", "frequency_penalty"), None)
    nulls |= dict.fromkeys(("logit_bias", "stream_options", "tools", "tool_choice", "response_format"), None)
    r = client.post(CHAT, json={"messages": MSG, **nulls})
    assert r.status_code == 200, r.text
    assert ChatCompletion.model_validate(r.json(), strict=True).usage.completion_tokens <= 8  # the default
    legacy = dict.fromkeys(
        ("stream", "n", "logprobs", "echo", "best_of", "suffix", "max_tokens", "user"), None
    )
    r = client.post(COMPLETIONS, json={"prompt": PROMPT, **legacy})
    assert r.status_code == 200, r.text
    assert Completion.model_validate(r.json(), strict=True).choices[0].logprobs is None


def test_null_for_a_required_field_says_it_is_required(client):
    err = client.post(CHAT, json={"messages": None}).json()["error"]
    assert (err["param"], err["message"]) == ("messages", "'messages' is required.")


# --- 1. response_format


@pytest.mark.parametrize(
    "fmt",
    [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "object"}}},
    ],
)
def test_reference_engine_refuses_json_response_format(oai, fmt):
    """It has no grammar: a 400 naming response_format, never prose with a 200."""
    kw = {"model": "tiny", "messages": MSG, "max_tokens": 4, "response_format": fmt}
    for stream in (False, True):
        err = bad_request(oai.chat.completions.create, **kw, stream=stream)
        assert err["param"] == "response_format" and "vllm engine" in err["message"]


def test_text_response_format_is_the_default(oai):
    r = oai.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=3, temperature=0, response_format={"type": "text"}
    )
    assert r.choices[0].message.content


@pytest.mark.parametrize("path", [CHAT, COMPLETIONS, "/generate"])
def test_unknown_response_format_is_refused_everywhere(client, path):
    body = {"messages": MSG} if path == CHAT else {"prompt": PROMPT}
    r = client.post(path, json={**body, "response_format": {"type": "bogus"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format.type"
    r = client.post(path, json={**body, "response_format": {"type": "json_schema"}})
    assert r.status_code == 400 and r.json()["error"]["param"] == "response_format"


# --- 4, 9: limits name the field and say the limit


def test_max_completion_tokens_past_the_context_names_itself(oai):
    err = bad_request(oai.chat.completions.create, model="tiny", messages=MSG, max_completion_tokens=500)
    assert err["param"] == "max_completion_tokens" and err["message"].startswith(
        "max_completion_tokens is 500"
    )
    err = bad_request(oai.chat.completions.create, model="tiny", messages=MSG, max_tokens=500)
    assert err["param"] == "max_tokens"


def test_seventeen_stop_strings_say_the_limit_is_16(oai):
    err = bad_request(
        oai.chat.completions.create, model="tiny", messages=MSG, stop=[f"s{i}" for i in range(17)]
    )
    assert err["param"] == "stop" and "at most 16" in err["message"] and "17" in err["message"]
    ok = oai.chat.completions.create(
        model="tiny", messages=MSG, max_tokens=2, stop=[f"s{i}" for i in range(16)]
    )
    assert ok.choices[0].finish_reason in ("stop", "length")


# --- 5. tools


@pytest.mark.parametrize(
    "extra,param",
    [
        ({"tool_choice": "none"}, "tool_choice"),
        ({"tool_choice": "auto", "tools": []}, "tool_choice"),
        ({"parallel_tool_calls": False}, "parallel_tool_calls"),
        ({"function_call": "auto"}, "function_call"),
        ({"functions": [{"name": "f", "parameters": {}}]}, "functions"),
        ({"tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"}, "tools"),
    ],
)
def test_tool_options_without_tools_are_refused(oai, extra, param):
    err = bad_request(oai.chat.completions.create, model="tiny", messages=MSG, max_tokens=2, extra_body=extra)
    assert err["param"] == param


def test_tool_calls_in_the_history_are_refused_not_dropped(oai):
    call = {"id": "c1", "type": "function", "function": {"name": "add", "arguments": "{}"}}
    history = [*MSG, {"role": "assistant", "content": None, "tool_calls": [call]}, *MSG]
    err = bad_request(oai.chat.completions.create, model="tiny", messages=history, max_tokens=2)
    assert err["param"] == "messages[1].tool_calls"
    empty = [*MSG, {"role": "assistant", "content": "5", "tool_calls": []}, *MSG]  # what typed SDKs send
    assert oai.chat.completions.create(model="tiny", messages=empty, max_tokens=2).choices


# --- 6. 405


def test_405_says_which_methods_are_allowed(client):
    r = client.get(CHAT)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    assert r.json()["error"]["type"] == "invalid_request_error"
    r = client.post("/v1/models")
    assert r.status_code == 405 and r.headers["allow"] == "GET"


# --- 7. the body is JSON whatever its content-type; an empty one names what it lacks


@pytest.mark.parametrize(
    "content_type", ["application/x-www-form-urlencoded", "text/plain", "text/plain; charset=utf-8", None]
)
def test_json_body_under_any_content_type(server, content_type):
    body = json.dumps({"prompt": PROMPT, "max_tokens": 2}).encode()
    headers = {} if content_type is None else {"content-type": content_type}
    req = httpx.Request("POST", f"{server.url}{COMPLETIONS}", content=body, headers=headers)
    assert req.headers.get("content-type") == content_type  # httpx adds none of its own
    with httpx.Client(timeout=60) as c:
        r = c.send(req)
    assert r.status_code == 200, r.text
    assert Completion.model_validate(r.json(), strict=True).usage.completion_tokens >= 1


@pytest.mark.parametrize("path,param", [(CHAT, "messages"), (COMPLETIONS, "prompt"), ("/generate", "prompt")])
def test_empty_body_names_what_is_missing(client, path, param):
    for headers in ({}, {"content-type": "application/json"}):
        err = client.post(path, content=b"", headers=headers).json()["error"]
        assert err["param"] == param and f"'{param}'" in err["message"]


@pytest.mark.parametrize("raw", [b"null", b"[1, 2]", b'"hi"'])
def test_body_that_is_not_an_object_says_so(client, raw):
    r = client.post(CHAT, content=raw)
    assert r.status_code == 400 and r.json()["error"]["message"] == "The request body must be a JSON object."


def test_form_body_that_is_not_json_says_so(client):
    r = client.post(COMPLETIONS, data={"prompt": "hi"})  # a real form
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"


# --- 8. one model


def test_models_retrieve(oai, client):
    m = oai.models.retrieve("tiny")
    assert (m.id, m.object) == ("tiny", "model")
    Model.model_validate(m.model_dump(), strict=True)
    with pytest.raises(openai.NotFoundError) as info:
        oai.models.retrieve("gpt-9")
    assert info.value.body["code"] == "model_not_found" and info.value.body["param"] == "model"
    err = client.get("/v1/models/org/tiny").json()["error"]  # ids may hold a slash: not a missing route
    assert err["code"] == "model_not_found"
