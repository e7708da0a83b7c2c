"""`POST /generate` over real HTTP: fields, exact pass-through of the reference engine's
events, the summary, SSE framing, flag thresholds and stop_on_uncertainty."""

from __future__ import annotations

import json
import math

from server.api.prompts import encode_prompt
from server.engine.types import Finished, FlagThresholds, SamplingParams
from tests.server.api.live import wait_until

PROMPT = "Question: Tom has 3 apples"


def sse_events(body: str) -> list[dict]:
    """Parse an SSE body, asserting the framing: only `data:` lines, one blank line after each."""
    assert body.endswith("\n\n")
    events = []
    for block in body[:-2].split("\n\n"):
        assert block.startswith("data: ") and "\n" not in block, block
        events.append(json.loads(block[len("data: ") :]))
    return events


def test_generate_matches_the_engine_token_for_token(client, engine):
    r = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 6, "temperature": 0})
    assert r.status_code == 200, r.text
    body = r.json()
    ids = encode_prompt(engine.tokenizer, PROMPT)
    params = SamplingParams(max_tokens=6, temperature=0, thresholds=FlagThresholds())
    expected = [e.as_dict() for e in engine.stream(ids, params) if not isinstance(e, Finished)]
    assert [t["token_id"] for t in body["tokens"]] == [e["token_id"] for e in expected]
    for got, want in zip(body["tokens"], expected, strict=True):
        assert set(got) == {"token_id", "text", "logprob", "bias", "variance", "eu", "flagged"}
        for key in ("logprob", "bias", "variance", "eu"):
            assert math.isclose(got[key], want[key], rel_tol=1e-5, abs_tol=1e-6)
        assert got["flagged"] == want["flagged"]
    assert body["text"] == "".join(e["text"] for e in expected)
    assert body["finish_reason"] in ("length", "stop")
    assert body["usage"]["prompt_tokens"] == len(ids)
    assert body["usage"]["total_tokens"] == len(ids) + body["usage"]["completion_tokens"]


def test_summary_is_consistent_with_the_tokens(client):
    body = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 6, "seed": 1}).json()
    eus = [t["eu"] for t in body["tokens"]]
    s = body["summary"]
    assert math.isclose(s["mean_eu"], sum(eus) / len(eus), rel_tol=1e-9)
    assert s["max_eu"] == max(eus)
    assert s["num_tokens"] == len(eus)
    assert s["num_flagged"] == sum(t["flagged"] for t in body["tokens"])
    assert s["flagged"] == (s["num_flagged"] > 0)


def test_stream_sends_one_event_per_token_then_the_summary(client):
    req = {"prompt": PROMPT, "max_tokens": 5, "temperature": 0}
    whole = client.post("/generate", json=req).json()
    r = client.post("/generate", json={**req, "stream": True})
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/event-stream")
    events = sse_events(r.text)
    *tokens, last = events
    assert tokens == whole["tokens"]
    assert last["summary"] == whole["summary"]
    assert last["finish_reason"] == whole["finish_reason"]
    assert last["usage"] == whole["usage"]


def test_prompt_token_ids_and_top_logprobs(client, engine):
    ids = encode_prompt(engine.tokenizer, PROMPT)
    body = client.post(
        "/generate", json={"prompt_token_ids": ids, "max_tokens": 3, "temperature": 0, "logprobs": 2}
    ).json()
    by_text = client.post("/generate", json={"prompt": PROMPT, "max_tokens": 3, "temperature": 0}).json()
    assert [t["token_id"] for t in body["tokens"]] == [t["token_id"] for t in by_text["tokens"]]
    for t in body["tokens"]:
        top = t["top_logprobs"]
        assert len(top) == 2 and top[0]["logprob"] >= top[1]["logprob"]


def test_per_request_thresholds_decide_the_flags(client):
    req = {"prompt": PROMPT, "max_tokens": 4, "temperature": 0}
    low = client.post("/generate", json={**req, "thresholds": {"eu": 0.0}}).json()
    high = client.post("/generate", json={**req, "thresholds": {"eu": 100.0}}).json()
    assert all(t["flagged"] for t in low["tokens"]) and low["summary"]["flagged"]
    assert not any(t["flagged"] for t in high["tokens"]) and not high["summary"]["flagged"]
    var = client.post("/generate", json={**req, "thresholds": {"eu": 100.0, "variance": 0.0}}).json()
    assert all(t["flagged"] == (t["variance"] > 0) for t in var["tokens"])


def test_stop_on_uncertainty_ends_at_the_first_flagged_token(client):
    body = client.post(
        "/generate",
        json={
            "prompt": PROMPT,
            "max_tokens": 8,
            "temperature": 0,
            "thresholds": {"eu": 0.0},
            "stop_on_uncertainty": True,
        },
    ).json()
    assert body["finish_reason"] == "uncertainty"
    assert len(body["tokens"]) == 1 and body["tokens"][0]["flagged"]


def test_stop_string_ends_the_text_before_it(client):
    req = {"prompt": PROMPT, "max_tokens": 8, "temperature": 0}
    text = client.post("/generate", json=req).json()["text"]
    stop = text[3:5]
    assert stop and text.find(stop) >= 0
    body = client.post("/generate", json={**req, "stop": [stop, "never-seen"]}).json()
    assert body["finish_reason"] == "stop"
    assert body["text"] == text[: text.find(stop)]
    assert "".join(t["text"] for t in body["tokens"]) == body["text"]


def test_same_seed_same_sample(client):
    req = {"prompt": PROMPT, "max_tokens": 6, "temperature": 1.0, "top_p": 0.9, "seed": 11}
    a, b = (client.post("/generate", json=req).json() for _ in range(2))
    assert [t["token_id"] for t in a["tokens"]] == [t["token_id"] for t in b["tokens"]]


def test_concurrent_requests_equal_their_sequential_runs(client, server, engine):
    from concurrent.futures import ThreadPoolExecutor

    import httpx

    reqs = [{"prompt": PROMPT, "max_tokens": 5, "temperature": 1.0, "seed": s} for s in (1, 2, 3)]
    alone = [client.post("/generate", json=r).json()["tokens"] for r in reqs]

    def post(r):
        return httpx.post(f"{server.url}/generate", json=r, timeout=60).json()["tokens"]

    with ThreadPoolExecutor(3) as pool:
        together = list(pool.map(post, reqs))
    assert together == alone
    # the engine frees a request as its iterator ends, just after the response has gone out
    assert wait_until(lambda: engine.num_running() == 0, timeout=5)
