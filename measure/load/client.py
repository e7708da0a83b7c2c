"""One load-test request: a random endpoint and mode, timed and classified.

Kinds: `generate`, `completions`, `chat`, each streamed or not. A streamed request may be
left on purpose after a few events (the client closes the connection: the server must abort
it). Outcomes: `ok`, `left` (closed on purpose, not an error), or an error kind: `http_429`,
`http_503`, `http_4xx`, `http_5xx`, `stream_error` (an error event inside a 200 stream),
`incomplete` (a stream that ended without its final event), `bad_body` (a 200 whose body is
not the expected JSON), `timeout`, `connection`.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass

import httpx

PROMPTS = (
    "Question: Tom has 3 apples and buys 2 more. How many apples does he have?\nAnswer: ",
    "Question: A farmer sells 12 eggs a day for 7 days. How many eggs does he sell?\nAnswer: ",
    "Question: Sara reads 5 pages an hour. How long does she take to read 40 pages?\nAnswer: ",
    "Question: A box holds 6 pens. How many pens are in 9 boxes?\nAnswer: ",
    "Question: Gus has 20 dollars and spends 7. How much is left?\nAnswer: ",
)
ENDPOINTS = {"generate": "/generate", "completions": "/v1/completions", "chat": "/v1/chat/completions"}
KINDS = tuple(f"{e}{'-stream' if s else ''}" for e in ENDPOINTS for s in (False, True))


@dataclass
class Outcome:
    kind: str  # e.g. "chat-stream"
    result: str  # "ok", "left", or an error kind
    latency_s: float  # to the end of the response (or to leaving it)
    ttft_s: float | None = None  # streams: to the first token event
    detail: str = ""  # the first words of an error


@dataclass
class Mix:
    """What the clients send."""

    max_tokens: tuple[int, int] = (8, 64)
    leave_rate: float = 0.2  # share of streams left after 1-5 events
    model: str | None = None
    temperature: float = 1.0  # T > 0 requests carry a seed each; greedy ones (T = 0) none


def _body(kind: str, prompt: str, max_tokens: int, seed: int, mix: Mix) -> tuple[str, dict]:
    endpoint, stream = kind.removesuffix("-stream"), kind.endswith("-stream")
    body: dict = {"max_tokens": max_tokens, "stream": stream, "temperature": mix.temperature}
    if mix.temperature > 0:
        body["seed"] = seed
    if endpoint == "chat":
        body["messages"] = [{"role": "user", "content": prompt}]
    else:
        body["prompt"] = prompt
    if endpoint != "generate" and mix.model:
        body["model"] = mix.model
    return ENDPOINTS[endpoint], body


async def one_request(client: httpx.AsyncClient, rng: random.Random, mix: Mix) -> Outcome:
    kind = rng.choice(KINDS)
    path, body = _body(kind, rng.choice(PROMPTS), rng.randint(*mix.max_tokens), rng.randrange(1 << 31), mix)
    leave_after = rng.randint(1, 5) if body["stream"] and rng.random() < mix.leave_rate else None
    start = time.perf_counter()
    try:
        if body["stream"]:
            return await _stream(client, kind, path, body, leave_after, start)
        r = await client.post(path, json=body)
        return _answer(kind, r, start)
    except httpx.TimeoutException as exc:
        return Outcome(kind, "timeout", time.perf_counter() - start, detail=type(exc).__name__)
    except httpx.TransportError as exc:
        return Outcome(kind, "connection", time.perf_counter() - start, detail=f"{type(exc).__name__}: {exc}")


def _http_error(status: int) -> str:
    if status in (429, 503):
        return f"http_{status}"
    return "http_5xx" if status >= 500 else "http_4xx"


def _answer(kind: str, r: httpx.Response, start: float) -> Outcome:
    took = time.perf_counter() - start
    if r.status_code != 200:
        return Outcome(kind, _http_error(r.status_code), took, detail=r.text[:200])
    try:
        data = r.json()
        ok = "usage" in data and (data.get("choices") or "tokens" in data)
    except ValueError:
        ok = False
    return Outcome(kind, "ok" if ok else "bad_body", took, detail="" if ok else r.text[:200])


async def _stream(
    client: httpx.AsyncClient, kind: str, path: str, body: dict, leave_after: int | None, start: float
) -> Outcome:
    async with client.stream("POST", path, json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return Outcome(kind, _http_error(r.status_code), time.perf_counter() - start, detail=r.text[:200])
        ttft, events, finished = None, 0, False
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                finished = True
                break
            event = json.loads(payload)
            if "error" in event:
                return Outcome(
                    kind,
                    "stream_error",
                    time.perf_counter() - start,
                    ttft,
                    detail=str(event["error"].get("message"))[:200],
                )
            events += 1
            if ttft is None:
                ttft = time.perf_counter() - start
            if "summary" in event:  # /generate's final event (the OpenAI streams end with [DONE])
                finished = True
            if leave_after is not None and events >= leave_after:
                return Outcome(kind, "left", time.perf_counter() - start, ttft)  # closes the connection
        took = time.perf_counter() - start
        return Outcome(kind, "ok" if finished else "incomplete", took, ttft)
