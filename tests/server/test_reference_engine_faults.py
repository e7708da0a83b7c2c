"""Engine faults with the reference engine under the real app (uvicorn on loopback).

A fault in one request's forward pass ends that stream with an error event; the stream beside
it, `/health` and the next request are untouched. A broken device (every forward pass fails,
the engine's check after the failed step too) ends the stream, `/health` fails, new requests
get 503 and the app calls `on_engine_dead`, which makes `epispec serve` exit non-zero
(`EXIT_ENGINE_DEAD`; that wiring in a real process: test_shutdown.py). The same with vLLM,
whose engine-core process is killed: test_engine_faults.py."""

from __future__ import annotations

import itertools
import json
import threading

import httpx

from server.app import create_app
from server.config import Settings
from server.engine.reference import ReferenceEngine
from tests.server.api.live import LiveServer, wait_until
from tests.server.engine.test_reference import POISONED, _failing_target, _poisoned_target, poison_marker


def test_a_broken_device_ends_the_stream_then_503s(tiny_models):
    engine = ReferenceEngine(
        tiny_models["target"], tiny_models["drafts"], model_name="tiny", max_model_len=96
    )
    forwards = itertools.count()
    _failing_target(engine, lambda: next(forwards) >= 4)  # the prefill and three rounds pass
    app = create_app(Settings(), engine)
    died = threading.Event()
    app.state.on_engine_dead = died.set
    body = {
        "prompt": "Question: Ann has",
        "stream": True,
        "max_tokens": 40,
        "temperature": 0,
        "ignore_eos": True,
    }
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        assert c.get("/health").status_code == 200
        with c.stream("POST", "/generate", json=body) as r:
            got = [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]
        assert 3 <= len(got) - 1 < 40 and all("text" in e for e in got[:-1])  # tokens, then
        assert got[-1]["error"]["code"] == "engine_error"
        assert got[-1]["error"]["message"] == "Generation failed: EngineDeadError."
        assert died.wait(timeout=10)
        assert c.get("/health").status_code == 503
        r = c.post("/generate", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert engine.num_running() == 0


CLEAN = "Question: Ann has"


def _events(c: httpx.Client, body: dict) -> list[dict]:
    with c.stream("POST", "/generate", json=body) as r:
        assert r.status_code == 200
        return [json.loads(x[6:]) for x in r.iter_lines() if x.startswith("data: {")]


def test_a_fault_in_one_request_fails_only_that_request(tiny_models):
    engine = ReferenceEngine(
        tiny_models["target"], tiny_models["drafts"], model_name="tiny", max_model_len=96
    )
    _poisoned_target(engine, poison_marker(engine.tokenizer, POISONED, [CLEAN]))
    app = create_app(Settings(), engine)
    died = threading.Event()
    app.state.on_engine_dead = died.set
    body = {"stream": True, "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    with LiveServer(app) as live, httpx.Client(base_url=live.url, timeout=60) as c:
        alone = _events(c, {**body, "prompt": CLEAN})
        got = {}
        threads = [
            threading.Thread(target=lambda p=p: got.__setitem__(p, _events(c, {**body, "prompt": p})))
            for p in (POISONED, CLEAN)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        bad, beside = got[POISONED], got[CLEAN]
        assert 1 <= len(bad) - 1 < 30 and all("text" in e for e in bad[:-1])  # tokens, then
        assert bad[-1]["error"]["code"] == "engine_error"
        assert bad[-1]["error"]["message"] == "Generation failed: StepFailed."
        assert beside == alone  # the stream beside it: every event, the last included
        assert c.get("/health").status_code == 200
        after = c.post("/generate", json={**body, "stream": False, "prompt": CLEAN})
        assert after.status_code == 200
        assert after.json()["text"] == "".join(e.get("text", "") for e in alone)
        assert not died.is_set() and engine.is_healthy()
        assert wait_until(lambda: engine.num_running() == 0, timeout=10)  # the last stream's cleanup
