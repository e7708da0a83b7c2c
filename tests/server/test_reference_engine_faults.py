"""Engine faults with the reference engine under the real app (uvicorn on loopback): a forward
pass fails mid-stream; the stream ends with a clear error event, `/health` fails, new requests
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
from tests.server.api.live import LiveServer
from tests.server.engine.test_reference import _failing_target


def test_a_failed_step_ends_the_stream_then_503s(tiny_models):
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
