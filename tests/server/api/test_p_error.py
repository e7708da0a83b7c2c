"""The bundle's per-token `p_error` as served: on every token of /generate (streamed and not) and
of the OpenAI endpoints (streamed and not), equal to the bundle's formula of the token's eu,
bias, variance and log-prob; `flagged` is p_error > its threshold, unless the request sets
thresholds; absent, and flags by eu, without it."""

from __future__ import annotations

import json
import math

import httpx
import pytest

from server.app import create_app
from server.config import Settings
from tests.server.api.live import LiveServer
from tests.server.api.test_p_wrong import _bundle

# a rule over all four features; flagged is checked against p_error > threshold token by token
P_ERROR = {
    "version": 1,
    "kind": "logistic",
    "features": ["eu", "bias", "variance", "logprob"],
    "coef": [0.3, -0.1, 2.0, -1.2],
    "intercept": -1.0,
    "threshold": 0.5,
}


def formula(eu: float, bias: float, variance: float, logprob: float) -> float:
    c = P_ERROR["coef"]
    z = P_ERROR["intercept"] + c[0] * eu + c[1] * bias + c[2] * variance + c[3] * logprob
    return 1 / (1 + math.exp(-z))


@pytest.fixture(scope="module")
def servers(engine, tiny_models, tmp_path_factory):
    root = tmp_path_factory.mktemp("p_error")
    with_rule = _bundle(root / "with", tiny_models, p_error=P_ERROR)
    without = _bundle(root / "without", tiny_models)
    with (
        LiveServer(create_app(Settings(bundle=with_rule, default_max_tokens=8), engine)) as a,
        LiveServer(create_app(Settings(bundle=without, default_max_tokens=8), engine)) as b,
    ):
        yield a, b


BODY = {"prompt": "Ann has 3 pens and", "max_tokens": 12, "temperature": 0}


def test_generate_tokens_carry_the_formula_and_flag_by_it(servers):
    with_rule, without = servers
    tokens = httpx.post(f"{with_rule.url}/generate", json=BODY, timeout=60).json()["tokens"]
    assert tokens
    for t in tokens:
        assert t["p_error"] == pytest.approx(
            formula(t["eu"], t["bias"], t["variance"], t["logprob"]), rel=1e-9
        )
        assert t["flagged"] == (t["p_error"] > P_ERROR["threshold"])
    streamed = []
    with httpx.stream("POST", f"{with_rule.url}/generate", json={**BODY, "stream": True}, timeout=60) as r:
        for line in r.iter_lines():
            if line.startswith("data: ") and '"token_id"' in line:
                streamed.append(json.loads(line[6:]))
    assert [(t["p_error"], t["flagged"]) for t in streamed] == [(t["p_error"], t["flagged"]) for t in tokens]
    plain = httpx.post(f"{without.url}/generate", json=BODY, timeout=60).json()["tokens"]
    assert plain and all("p_error" not in t for t in plain)


def test_a_requests_thresholds_flag_by_eu_and_keep_p_error(servers):
    with_rule, _ = servers
    tokens = httpx.post(
        f"{with_rule.url}/generate", json={**BODY, "thresholds": {"eu": 0.0}}, timeout=60
    ).json()["tokens"]
    assert (
        tokens
        and all(t["flagged"] == (t["eu"] > 0.0) for t in tokens)
        and all("p_error" in t for t in tokens)
    )


def test_openai_completions_carry_it_streamed_and_not(servers):
    with_rule, without = servers
    body = {"prompt": "Ann has 3 pens and", "max_tokens": 8, "temperature": 0, "logprobs": 1}
    choice = httpx.post(f"{with_rule.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    lps, tokens = choice["logprobs"]["token_logprobs"], choice["uncertainty"]["tokens"]
    assert tokens and len(lps) == len(tokens)
    for t, lp in zip(tokens, lps, strict=True):
        assert t["p_error"] == pytest.approx(formula(t["eu"], t["bias"], t["variance"], lp), rel=1e-9)
        assert t["flagged"] == (t["p_error"] > P_ERROR["threshold"])
    streamed = []
    with httpx.stream(
        "POST", f"{with_rule.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed += json.loads(line[6:])["choices"][0].get("uncertainty", {}).get("tokens", [])
    assert [t["p_error"] for t in streamed] == [t["p_error"] for t in tokens]
    plain = httpx.post(f"{without.url}/v1/completions", json=body, timeout=60).json()["choices"][0]
    assert all("p_error" not in t for t in plain["uncertainty"]["tokens"])
