"""Property-based fuzzing (hypothesis) of every endpoint's request schema against a real
server (uvicorn on loopback, the reference engine on the tiny models): valid and invalid
bodies, odd Unicode (lone surrogates, control and private-use characters), huge numbers,
deep nesting, wrong types, raw bytes. Never a 5xx, never a server error inside a 200 stream,
never a hang (every answer within the client timeout), and the server is healthy and idle
afterwards. `EPISPEC_FUZZ_EXAMPLES` sets the examples per test (default 60);
`EPISPEC_FUZZ_ENGINE=vllm` fuzzes a server over the vllm engine instead (minutes)."""

from __future__ import annotations

import json
import os
from collections import Counter

import httpx
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from server.app import create_app
from server.config import Settings
from tests.server.api.live import LiveServer, wait_until

EXAMPLES = int(os.environ.get("EPISPEC_FUZZ_EXAMPLES", "60"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
TIMEOUT = 30.0  # a hang fails the test as a timeout

# --- strategies

odd_text = st.text(st.characters(codec=None, categories=None), max_size=40) | st.sampled_from(
    [
        "",
        "\x00",
        "\ud800",
        "\udfff",
        "a\ud83d",
        "\U0010ffff",
        "\u202e\u200b\ufeff",
        "🦄" * 20,
        "\r\n\t",
        "Question: Tom has 3 apples",
        "<|endoftext|>",
        "\\u0000",
        "%s%n{0}",
    ]
)
huge_int = st.sampled_from([0, -1, 2**31, 2**63, 2**64, -(2**63) - 1, 10**100, 10**4000])
numbers = st.integers(-(2**70), 2**70) | huge_int | st.floats(allow_nan=True, allow_infinity=True)
scalars = st.none() | st.booleans() | numbers | odd_text
json_values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
    max_leaves=12,
)


@st.composite
def mutated(draw, valid: st.SearchStrategy) -> dict:
    """A valid body, as is or with one field replaced by any JSON value, removed, or added."""
    data = dict(draw(valid))
    op = draw(st.sampled_from(["keep", "keep", "replace", "drop", "add"]))
    if op == "add" or not data:
        data[draw(odd_text | st.sampled_from(["n", "echo", "tools", "logit_bias", "best_of"]))] = draw(
            json_values
        )
    elif op != "keep":
        key = draw(st.sampled_from(sorted(data)))
        if op == "drop":
            del data[key]
        else:
            data[key] = draw(json_values)
    return data


text = odd_text.filter(bool)
sampling = {
    "max_tokens": st.integers(1, 3),
    "temperature": st.floats(0, 2),
    "top_p": st.floats(0, 1, exclude_min=True),
    "seed": st.integers(-(2**63), 2**63 - 1),
    "stop": text | st.lists(text, max_size=16),
    "stream": st.booleans(),
    "stop_on_uncertainty": st.booleans(),
    "thresholds": st.fixed_dictionaries(
        {}, optional=dict.fromkeys(["eu", "bias", "variance"], st.floats(0, 100))
    ),
}
openai = {
    "model": st.just("tiny"),
    "n": st.just(1),
    "user": odd_text,
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}),
}
token_ids = st.lists(st.integers(0, 200), min_size=1, max_size=12)
part = st.fixed_dictionaries({"type": st.just("text"), "text": odd_text})
message = st.fixed_dictionaries(
    {
        "role": st.sampled_from(["system", "developer", "user", "assistant"]),
        "content": text | st.lists(part, min_size=1, max_size=3),
    },
    optional={"name": text},
)
VALID = {
    "/generate": st.fixed_dictionaries(
        {"prompt": text}, optional={**sampling, "logprobs": st.integers(0, 20)}
    )
    | st.fixed_dictionaries({"prompt_token_ids": token_ids}, optional=sampling),
    "/v1/completions": st.fixed_dictionaries(
        {"prompt": text | st.lists(text, min_size=1, max_size=1) | token_ids},
        optional={**sampling, **openai, "logprobs": st.integers(0, 20), "echo": st.just(False)},
    ),
    "/v1/chat/completions": st.fixed_dictionaries(
        {"messages": st.lists(message, min_size=1, max_size=4)},
        optional={
            **sampling,
            **openai,
            "max_completion_tokens": st.integers(1, 3),
            "logprobs": st.just(True),
            "top_logprobs": st.integers(0, 20),
        },
    ),
}
BODIES = {path: mutated(valid) | json_values for path, valid in VALID.items()}
raw_bodies = st.binary(max_size=300) | st.sampled_from(
    [
        b"",
        b"{",
        b'{"prompt": "hi"',
        b"\xff\xfe",
        b'{"prompt": "\xc3\x28"}',
        b"[" * 100_000,
        b'{"a":' * 50_000,
        b'{"prompt": ' + b"9" * 5000 + b"}",
        b'{"prompt": "hi", "max_tokens": 1e999}',
        b'{"prompt": "hi"}' * 3,
        b"null",
        b'"just a string"',
    ]
)

# --- the server


VLLM_FLAGS = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 8, "kv_cache_space": 1}


@pytest.fixture(scope="module")
def fuzz_server(request, tiny_models):
    limits = {"default_max_tokens": 2, "max_request_bytes": 256 << 10}
    if os.environ.get("EPISPEC_FUZZ_ENGINE") == "vllm":
        pytest.importorskip("vllm")
        app = create_app(
            Settings(
                target=tiny_models["target"],
                drafts=tiny_models["drafts"],
                engine="vllm",
                model_name="tiny",
                model_flags=VLLM_FLAGS,
                **limits,
            )
        )
    else:
        app = create_app(Settings(**limits), request.getfixturevalue("engine"))
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=TIMEOUT) as client:
        engine = app.state.ctx.engine
        yield live, client, engine
        assert httpx.get(f"{live.url}/health").status_code == 200
        assert wait_until(lambda: engine.num_running() == 0, timeout=30)
        assert httpx.get(f"{live.url}/ready").json()["running"] == 0


def check(r: httpx.Response, what, seen: Counter | None = None) -> None:
    """No 5xx; a 4xx is an OpenAI-shaped client error; a 200 holds no server error."""
    assert r.status_code < 500, (what, r.status_code, r.text[:500])
    event(f"HTTP {r.status_code}")
    if seen is not None:
        seen[r.status_code] += 1
    if r.status_code >= 400:
        err = r.json()["error"]
        assert isinstance(err["message"], str) and err["type"] != "server_error", (what, err)
    else:
        assert '"server_error"' not in r.text, (what, r.text[:500])
    assert "Traceback" not in r.text


def post(client: httpx.Client, path: str, content: bytes) -> httpx.Response:
    return client.post(path, content=content, headers={"content-type": "application/json"})


@pytest.mark.parametrize("path", list(BODIES))
def test_json_bodies_never_5xx(fuzz_server, path):
    _, client, engine = fuzz_server
    seen = Counter()

    @FUZZ
    @given(BODIES[path])
    def run(data):
        # ensure_ascii: lone surrogates travel as \\ud800 escapes, valid JSON text
        check(post(client, path, json.dumps(data, ensure_ascii=True).encode()), data, seen)

    run()
    print(path, engine.name, dict(seen))
    assert seen[200] > 0 and seen[400] > 0  # both sides of validation were reached


@pytest.mark.parametrize("path", list(BODIES))
def test_raw_bodies_never_5xx(fuzz_server, path):
    _, client, _ = fuzz_server

    @FUZZ
    @given(raw_bodies)
    def run(data):
        check(post(client, path, data), data[:80])

    run()


def test_other_routes_and_methods_never_5xx(fuzz_server):
    _, client, _ = fuzz_server
    paths = st.sampled_from(["/health", "/ready", "/metrics", "/v1/models", *BODIES]) | odd_text.map(
        lambda t: "/" + t.encode("utf-8", "surrogatepass").hex()[:40]
    )

    @FUZZ
    @given(
        st.sampled_from(["GET", "POST", "PUT", "DELETE", "OPTIONS", "HEAD"]),
        paths,
        st.dictionaries(
            st.sampled_from(["q", "stream", "model"]),  # a URL has no lone surrogates
            st.text(st.characters(exclude_categories=["Cs"]), max_size=20),
            max_size=2,
        ),
    )
    def run(method, path, query):
        r = client.request(method, path, params=query)
        assert r.status_code < 500, (method, path, r.status_code, r.text[:300])

    run()
