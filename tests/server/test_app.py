"""The app around an engine: the lifespan builds the engine from settings, engine failures
become 500s (or an error event inside a started stream), a dead engine makes /health 503."""

from __future__ import annotations

import json

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from tests.server.api.live import LiveServer
from tests.server.scripted_engine import ScriptedEngine


@pytest.mark.parametrize("fail", ["raise", "finish"])
def test_engine_failure_is_a_500_or_an_event_inside_the_stream(tokenizer, fail):
    engine = ScriptedEngine(tokenizer, fail=fail)
    with LiveServer(create_app(Settings(), engine)) as live, httpx.Client(base_url=live.url) as c:
        r = c.post("/generate", json={"prompt": "hi", "max_tokens": 5})
        assert r.status_code == 500 and r.json()["error"]["type"] == "server_error"
        r = c.post("/generate", json={"prompt": "hi", "max_tokens": 5, "stream": True})
        assert r.status_code == 200
        events = [json.loads(b[6:]) for b in r.text.strip().split("\n\n")]
        assert [e["text"] for e in events[:-1]] == ["t0 ", "t1 ", "t2 "]
        assert events[-1]["error"]["type"] == "server_error"
        r = c.post("/v1/completions", json={"prompt": "hi", "max_tokens": 5, "stream": True})
        blocks = r.text.strip().split("\n\n")
        assert blocks[-1] == "data: [DONE]" and "error" in json.loads(blocks[-2][6:])
        assert engine.running == 0


def test_summary_from_scripted_events(tokenizer):
    engine = ScriptedEngine(tokenizer)
    with LiveServer(create_app(Settings(), engine)) as live:
        body = httpx.post(f"{live.url}/generate", json={"prompt": "hi"}).json()
    assert body["text"] == "t0 t1 t2 "
    assert body["summary"] == {
        "mean_eu": pytest.approx(0.3),
        "max_eu": pytest.approx(0.4),
        "num_tokens": 3,
        "num_flagged": 1,
        "flagged": True,
    }


def test_dead_engine_makes_health_503(tokenizer):
    engine = ScriptedEngine(tokenizer)
    with LiveServer(create_app(Settings(), engine)) as live:
        assert httpx.get(f"{live.url}/health").status_code == 200
        engine.healthy = False
        assert httpx.get(f"{live.url}/health").status_code == 503
        assert httpx.get(f"{live.url}/ready").status_code == 503
        r = httpx.post(f"{live.url}/generate", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"


def test_lifespan_builds_the_engine_from_settings(tiny_models):
    settings = Settings(
        target=tiny_models["target"],
        drafts=tiny_models["drafts"][:2],
        engine="reference",
        device="cpu",
        model_name="built",
        max_model_len=64,
    )
    with LiveServer(create_app(settings)) as live:
        ready = httpx.get(f"{live.url}/ready").json()
        assert ready["model"] == "built" and ready["engine"] == "reference"
        assert ready["num_drafts"] == 2 and ready["max_model_len"] == 64
        r = httpx.post(f"{live.url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60)
        assert r.status_code == 200


def test_bundle_thresholds_are_the_default_flags(tiny_models, tmp_path):
    bundle = tmp_path / "bundle"
    bundle.mkdir()
    (bundle / "bundle.json").write_text(
        json.dumps(
            {
                "target": {"path": tiny_models["target"]},
                "drafts": [{"path": d} for d in tiny_models["drafts"]],
                "thresholds": {"eu": 0.123, "variance": 0.05},
            }
        )
    )
    app = create_app(Settings(bundle=str(bundle), engine="reference", device="cpu"))
    with LiveServer(app) as live:
        t = app.state.ctx.thresholds
        assert (t.eu, t.bias, t.variance) == (0.123, None, 0.05)
        body = httpx.post(
            f"{live.url}/generate",
            timeout=60,
            json={"prompt": "Question: Tom", "max_tokens": 4, "temperature": 0},
        ).json()
        for tok in body["tokens"]:
            assert tok["flagged"] == (tok["eu"] > 0.123 or tok["variance"] > 0.05)
