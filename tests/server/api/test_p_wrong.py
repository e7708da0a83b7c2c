"""The bundle's validation fits as served: `p_wrong` in the response summary (the bundle's
logistic fit of the summary's mean and max eu) and `eu_corrected` on every token (its
`eu_correction` of bias and variance), present when the served bundle has them, absent
without; on /generate (streamed and not) and the OpenAI endpoints."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from tests.server.api.live import LiveServer

FIT = {
    "version": 1,
    "kind": "logistic",
    "features": ["mean_eu", "max_eu"],
    "coef": [0.8, -0.3],
    "intercept": 0.2,
}


CORRECTION = {"version": 1, "kind": "fit", "params": {"a_bias": 0.25, "b_variance": 2.0, "c": -0.01}}


def _corrected(tok: dict) -> float:
    p = CORRECTION["params"]
    return max(p["a_bias"] * tok["bias"] + p["b_variance"] * tok["variance"] + p["c"], 0.0)


def _bundle(folder, tiny_models, **extra):
    folder.mkdir()
    manifest = {
        "schema_version": 1,
        "target": {"path": tiny_models["target"]},
        "drafts": [{"path": d} for d in tiny_models["drafts"]],
        **extra,
    }
    (folder / "bundle.json").write_text(json.dumps(manifest))
    return str(folder)


@pytest.fixture(scope="module")
def servers(engine, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("p_wrong")
    with_fit = _bundle(root / "with", tiny_models, p_wrong=FIT, eu_correction=CORRECTION)
    without = _bundle(root / "without", tiny_models)
    with (
        LiveServer(create_app(Settings(bundle=with_fit, default_max_tokens=6), engine)) as a,
        LiveServer(create_app(Settings(bundle=without, default_max_tokens=6), engine)) as b,
    ):
        yield a, b


def _expected(summary: dict) -> float:
    z = FIT["intercept"] + FIT["coef"][0] * summary["mean_eu"] + FIT["coef"][1] * summary["max_eu"]
    return 1 / (1 + math.exp(-z))


def test_generate_summary_has_p_wrong_with_a_fit(servers):
    with_fit, without = servers
    body = {"prompt": "Ann has 3 pens", "max_tokens": 6, "temperature": 0}
    s = httpx.post(f"{with_fit.url}/generate", json=body, timeout=60).json()["summary"]
    assert set(s) == {"mean_eu", "max_eu", "num_tokens", "num_flagged", "flagged", "p_wrong"}
    assert 0 < s["p_wrong"] < 1 and s["p_wrong"] == pytest.approx(_expected(s), rel=1e-12)
    s = httpx.post(f"{without.url}/generate", json=body, timeout=60).json()["summary"]
    assert "p_wrong" not in s and set(s) == {"mean_eu", "max_eu", "num_tokens", "num_flagged", "flagged"}


def test_streamed_final_event_and_chat_completion_carry_it(servers):
    with_fit, without = servers
    body = {"prompt": "Ann has 3 pens", "max_tokens": 6, "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{with_fit.url}/generate", json=body, timeout=60) as r:
        events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: {")]
    final = events[-1]
    assert final["summary"]["p_wrong"] == pytest.approx(_expected(final["summary"]), rel=1e-12)
    chat = {"messages": [{"role": "user", "content": "Ann has 3 pens"}], "max_tokens": 6, "temperature": 0}
    for url, present in ((with_fit.url, True), (without.url, False)):
        r = httpx.post(f"{url}/v1/chat/completions", json=chat, timeout=60)
        if r.status_code == 400:  # the tiny tokenizer has no chat template: plain completions then
            r = httpx.post(f"{url}/v1/completions", json={"prompt": "Ann has", "max_tokens": 6}, timeout=60)
        summary = r.json()["choices"][0]["uncertainty"]["summary"]
        assert ("p_wrong" in summary) is present


def test_generate_tokens_carry_eu_corrected_with_a_correction(servers):
    with_fit, without = servers
    body = {"prompt": "Ann has 3 pens", "max_tokens": 6, "temperature": 0}
    tokens = httpx.post(f"{with_fit.url}/generate", json=body, timeout=60).json()["tokens"]
    assert tokens and all(t["eu_corrected"] == pytest.approx(_corrected(t), rel=1e-12) for t in tokens)
    assert any(t["eu_corrected"] > 0 for t in tokens) and all(t["eu_corrected"] != t["eu"] for t in tokens)
    streamed = []
    with httpx.stream("POST", f"{with_fit.url}/generate", json={**body, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"token_id"' in line:
                streamed.append(json.loads(line[6:]))
    assert [t["eu_corrected"] for t in streamed] == [t["eu_corrected"] for t in tokens]
    plain = httpx.post(f"{without.url}/generate", json=body, timeout=60).json()["tokens"]
    assert plain and all("eu_corrected" not in t for t in plain)


def test_openai_uncertainty_carries_eu_corrected_with_a_correction(servers):
    with_fit, without = servers
    chat = {
        "messages": [{"role": "user", "content": "Ann"}],
        "max_tokens": 5,
        "temperature": 0,
        "logprobs": True,
    }
    for server, present in ((with_fit, True), (without, False)):
        r = httpx.post(f"{server.url}/v1/chat/completions", json=chat, timeout=60)
        if r.status_code == 400:  # the tiny tokenizer has no chat template: plain completions then
            body = {"prompt": "Ann has", "max_tokens": 5, "temperature": 0, "logprobs": 1}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            per_token = r.json()["choices"][0]["uncertainty"]["tokens"]
        else:
            choice = r.json()["choices"][0]
            per_token = choice["uncertainty"]["tokens"] + [
                c["uncertainty"] for c in choice["logprobs"]["content"]
            ]
        assert r.status_code == 200 and per_token
        for t in per_token:
            if present:
                assert t["eu_corrected"] == pytest.approx(_corrected(t), rel=1e-12)
            else:
                assert "eu_corrected" not in t
