"""Metrics: values move as generations flow, read back from the exposition text with
prometheus_client's own parser (names alone would prove nothing).

Unit tests feed hand-made TokenEvents and Finished items to a tracker; the last test runs the
real app with the reference engine over the tiny models and checks that every generation's
tokens, EU, speculation counters and latencies reach `GET /metrics`.
"""

from __future__ import annotations

import math

import httpx
import pytest
from prometheus_client import REGISTRY, Counter
from prometheus_client.parser import text_string_to_metric_families

from server.engine.types import EngineStats, Finished, TokenEvent
from server.metrics import NATS_BUCKETS, Metrics


def parse(text: str | bytes) -> dict[tuple[str, frozenset], float]:
    """{(sample name, labels without `model`): value} of one exposition."""
    if isinstance(text, bytes):
        text = text.decode()
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            labels = frozenset((k, v) for k, v in s.labels.items() if k != "model")
            out[(s.name, labels)] = s.value
    return out


def value(samples: dict, name: str, **labels) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def values(samples: dict, names: list[str]) -> list[float]:
    return [value(samples, n) for n in names]


def token(eu: float | None, flagged: bool = False) -> TokenEvent:
    bias, var = (None, None) if eu is None else (eu / 4, 3 * eu / 4)
    return TokenEvent(token_id=1, text="x", logprob=-0.1, bias=bias, variance=var, eu=eu, flagged=flagged)


def test_a_generation_moves_every_metric():
    names = [
        "epispec_requests_waiting", "epispec_requests_running",
        "epispec_time_to_first_token_seconds_count", "epispec_inter_token_latency_seconds_count",
        "epispec_generation_tokens_total", "epispec_flagged_tokens_total",
        "epispec_e2e_request_latency_seconds_count", "epispec_spec_proposed_tokens_total",
        "epispec_spec_accepted_tokens_total", "epispec_draft_forward_passes_total",
        "epispec_target_forward_passes_total", "epispec_eu_seconds_total",
        "epispec_flagged_responses_total",
    ]  # fmt: skip
    m = Metrics(model_name="tiny", include_default_registry=False)
    t = m.start_request("/generate", prompt_tokens=7)
    s = parse(m.render())
    assert value(s, "epispec_requests_waiting") == 1 and value(s, "epispec_requests_running") == 0
    assert value(s, "epispec_prompt_tokens_total") == 7

    for eu, flagged in [(0.0002, False), (0.05, False), (3.0, True)]:
        t.observe(token(eu, flagged))
    s = parse(m.render())
    assert values(s, names[:6]) == [0, 1, 1, 2, 3, 1]
    assert value(s, "epispec_token_eu_nats_count") == 3
    assert value(s, "epispec_token_eu_nats_sum") == pytest.approx(3.0502)
    assert value(s, "epispec_token_bias_nats_sum") == pytest.approx(3.0502 / 4)
    assert value(s, "epispec_token_variance_nats_sum") == pytest.approx(3 * 3.0502 / 4)
    # cumulative buckets: 0.0002 falls in (1e-4, 2.15e-4], 0.05 in (0.0464, 0.1], 3.0 in (2.15, 4.64]
    le = {b: value(s, "epispec_token_eu_nats_bucket", le=str(b)) for b in NATS_BUCKETS}
    assert le[0.0001] == 0 and le[0.0002154435] == 1 and le[0.0464158883] == 1
    assert le[0.1] == 2 and le[2.1544346900] == 2 and le[4.6415888336] == 3

    stats = EngineStats(
        target_forward_passes=2, draft_forward_passes=5, proposed=6, accepted=4, eu_seconds=0.25
    )
    t.observe(Finished("stop", 7, 3, stats))
    t.close()
    t.close()  # idempotent
    s = parse(m.render())
    assert value(s, "epispec_requests_total", endpoint="/generate", status="stop") == 1
    assert values(s, names[:2] + names[6:]) == [0, 0, 1, 6, 4, 5, 2, 0.25, 1]


def test_left_early_is_abort_and_an_exception_is_error():
    m = Metrics(include_default_registry=False)
    t = m.start_request("/v1/completions", 3)
    t.observe(token(0.1))
    t.close()  # no Finished: the client went away
    with pytest.raises(RuntimeError), m.start_request("/v1/completions", 3):
        raise RuntimeError("device lost")
    m.observe_request("/v1/completions", "rejected")
    s = parse(m.render())
    for status in ("abort", "error", "rejected"):
        assert value(s, "epispec_requests_total", endpoint="/v1/completions", status=status) == 1
    assert value(s, "epispec_requests_waiting") == 0 and value(s, "epispec_requests_running") == 0
    assert value(s, "epispec_flagged_responses_total") == 0


def test_plain_decoding_and_infinite_eu_leave_the_eu_histograms_finite():
    m = Metrics(include_default_registry=False)
    t = m.start_request("/generate", 1)
    t.observe(token(None))
    t.observe(token(math.inf, flagged=True))
    t.observe(token(0.5))
    t.close("length")
    s = parse(m.render())
    assert value(s, "epispec_generation_tokens_total") == 3
    assert value(s, "epispec_token_eu_nats_count") == 1
    assert value(s, "epispec_token_eu_nats_sum") == 0.5


def test_model_label_and_default_registry_without_name_clashes():
    clash = Counter("epispec_prompt_tokens", "an impostor in the default registry")
    foreign = Counter("vllm:test_only_tokens", "stands for vLLM's metrics")
    clash.inc(100)
    foreign.inc(3)
    try:
        m = Metrics(model_name="m1")
        m.start_request("/generate", 2).close()
        text = m.render().decode()
    finally:
        REGISTRY.unregister(clash)
        REGISTRY.unregister(foreign)
    families = list(text_string_to_metric_families(text))
    names = [f.name for f in families]
    assert len(names) == len(set(names))
    s = parse(text)
    assert value(s, "epispec_prompt_tokens_total") == 2  # ours, not the impostor's 100
    assert value(s, "vllm:test_only_tokens_total") == 3
    ours = [x for f in families if f.name.startswith("epispec_") for x in f.samples]
    assert ours and all(x.labels["model"] == "m1" for x in ours)


# --- through the real app


@pytest.fixture(scope="module")
def live_app(tiny_models):
    import torch

    from server.app import create_app
    from server.config import Settings
    from server.engine.reference import ReferenceEngine
    from tests.server.api.live import LiveServer

    torch.set_num_threads(2)
    engine = ReferenceEngine(
        tiny_models["target"], tiny_models["drafts"], model_name="tiny", max_model_len=96
    )
    with LiveServer(create_app(Settings(), engine)) as live:
        yield live


def test_requests_through_the_app_reach_metrics(live_app):
    with httpx.Client(base_url=live_app.url, timeout=120) as c:
        before = parse(c.get("/metrics").content)
        completion = 0
        for body, path in [
            ({"prompt": "Tom has 3 apples", "max_tokens": 6, "temperature": 0}, "/generate"),
            ({"prompt": "Tom has 3 apples", "max_tokens": 5, "stream": True}, "/generate"),
            ({"prompt": "A farmer", "max_tokens": 4, "model": "tiny"}, "/v1/completions"),
        ]:
            r = c.post(path, json=body)
            assert r.status_code == 200
            if not body.get("stream"):
                completion += r.json()["usage"]["completion_tokens"]
        assert c.post("/generate", json={"prompt": "hi", "max_tokens": 0}).status_code == 400
        r = c.get("/metrics")
    assert r.headers["content-type"].startswith("text/plain")
    after = parse(r.content)

    def delta(name, **labels):
        return value(after, name, **labels) - value(before, name, **labels)

    assert delta("epispec_requests_total", endpoint="/generate", status="length") == 2
    assert delta("epispec_requests_total", endpoint="/v1/completions", status="length") == 1
    assert delta("epispec_requests_total", endpoint="/generate", status="rejected") == 1
    tokens = delta("epispec_generation_tokens_total")
    assert tokens == completion + 5
    assert delta("epispec_token_eu_nats_count") == tokens  # every token has an EU (3 drafts)
    assert delta("epispec_token_eu_nats_sum") > 0
    assert delta("epispec_time_to_first_token_seconds_count") == 3
    assert delta("epispec_inter_token_latency_seconds_count") == tokens - 3
    assert delta("epispec_e2e_request_latency_seconds_count") == 3
    assert delta("epispec_prompt_tokens_total") > 0
    assert delta("epispec_spec_proposed_tokens_total") >= delta("epispec_spec_accepted_tokens_total")
    assert delta("epispec_spec_proposed_tokens_total") > 0
    assert delta("epispec_draft_forward_passes_total") > 0
    assert delta("epispec_eu_seconds_total") > 0
    assert value(after, "epispec_requests_running") == value(after, "epispec_requests_waiting") == 0
    text = r.text
    assert 'model="tiny"' in text and "process_cpu_seconds_total" in text  # default registry too


@pytest.mark.vllm
@pytest.mark.slow
def test_vllm_metrics_share_the_endpoint(tiny_models):
    """With the vllm engine, vLLM's own `vllm:*` metrics (default registry) appear on our
    /metrics beside ours, each family once, and they move with a request."""
    pytest.importorskip("vllm")
    from server.app import create_app
    from server.config import Settings
    from tests.server.api.live import LiveServer

    flags = {"dtype": "float32", "enforce_eager": True, "max_num_seqs": 2, "kv_cache_space": 1}
    settings = Settings(
        target=tiny_models["target"],
        drafts=tiny_models["drafts"][:2],
        engine="vllm",
        model_name="tiny-vllm",
        model_flags=flags,
    )
    with (
        LiveServer(create_app(settings)) as live,
        httpx.Client(base_url=live.url, timeout=120) as c,
    ):
        r = c.post("/generate", json={"prompt": "Tom has 3 apples", "max_tokens": 6})
        assert r.status_code == 200
        text = c.get("/metrics").text
    names = [f.name for f in text_string_to_metric_families(text)]
    assert len(names) == len(set(names))
    s = parse(text)
    assert any(n.startswith("vllm:") for n in names)
    vllm_tokens = sum(v for (n, _), v in s.items() if n == "vllm:generation_tokens_total")
    assert vllm_tokens >= 6
    assert value(s, "epispec_requests_total", endpoint="/generate", status="length") == 1


def test_side_channel_counters_are_read_from_the_engine_at_each_scrape():
    """Malformed messages dropped, peers refused at the CURVE handshake, proposer steps failed:
    read from the vllm engine's joiner, never stored by the metrics."""
    from types import SimpleNamespace

    joiner = SimpleNamespace(dropped=1, rejected=7, proposer_faults=3)
    m = Metrics("tiny", include_default_registry=False)
    m.watch_engine(SimpleNamespace(num_running=lambda: 0, joiner=joiner))
    first = parse(m.render())
    joiner.rejected, joiner.proposer_faults = 9, 4
    second = parse(m.render())
    names = [
        "epispec_eu_channel_dropped_messages_total",
        "epispec_eu_channel_rejected_peers_total",
        "epispec_eu_proposer_faults_total",
    ]
    assert values(first, names) == [1, 7, 3]
    assert values(second, names) == [1, 9, 4]
