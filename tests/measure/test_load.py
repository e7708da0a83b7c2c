"""`epispec load` against real servers (the reference engine on the tiny models): a clean
run passes with nothing left running, an overloaded server's 429s fail it, a spawned server
is stopped gracefully, and only loopback targets are accepted."""

from __future__ import annotations

import json

import pytest

from measure.load import probe
from server.app import create_app
from server.cli import main
from server.config import Settings
from tests.server.api.live import LiveServer

SHORT = ["--duration", "4", "--max-tokens", "2", "6", "--drain-timeout", "20"]


def load(tmp_path, *args: str) -> tuple[int, dict]:
    out = tmp_path / "load.json"
    status = main(["load", *args, "--json", str(out)])
    return status, json.loads(out.read_text())


def test_a_clean_run_passes_with_nothing_left(engine, tmp_path):
    with LiveServer(create_app(Settings(), engine)) as live:
        status, r = load(tmp_path, "--url", live.url, "--concurrency", "4", "--leave-rate", "0.5", *SHORT)
        assert engine.num_running() == 0
    assert status == 0 and r["passed"]
    assert r["requests"] >= 4 and r["errors"] == {} and r["success_rate"] == 1.0
    assert r["results"].get("left", 0) >= 1  # some streams were left on purpose
    assert len(r["by_kind"]) >= 4  # endpoints and modes are mixed
    assert r["after"]["ready_running"] == 0 and r["after"]["epispec_engine_requests"] == 0
    assert r["latency_s"]["p50"] <= r["latency_s"]["p99"]
    assert r["memory"]["samples"] >= 2  # the API process's RSS, from /metrics


def test_an_overloaded_server_fails_the_run(engine, tmp_path):
    with LiveServer(create_app(Settings(max_pending_requests=1), engine)) as live:
        status, r = load(tmp_path, "--url", live.url, "--concurrency", "6", "--leave-rate", "0", *SHORT)
    assert status == 1 and not r["passed"]
    assert r["errors"]["http_429"] >= 1 and "overloaded" in r["error_examples"]["http_429"]


def test_a_spawned_server_is_measured_and_stopped_gracefully(tiny_models, tmp_path):
    serve = (
        f"--engine reference --device cpu --target {tiny_models['target']} "
        f"--draft {tiny_models['drafts'][0]} --max-model-len 96"
    )
    plot = tmp_path / "rss.png"
    status, r = load(
        tmp_path,
        "--serve",
        serve,
        "--concurrency",
        "2",
        *SHORT,
        "--warmup",
        "1",
        "--window",
        "1",
        "--plot",
        str(plot),
    )
    assert status == 0, r
    assert r["server"]["spawned"] and r["server"]["exit_status"] == 0
    mem = r["memory"]
    assert mem["samples"] >= 2 and mem["peak_mib"] > 50  # the process tree
    assert mem["series"] and all(a[0] < b[0] for a, b in zip(mem["series"], mem["series"][1:], strict=False))
    assert all(w["from_s"] >= 1 and 0.5 <= w["to_s"] - w["from_s"] < 1 for w in mem["windows"])
    assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_the_memory_report_fits_slopes_per_window():
    mib = 1 << 20
    # flat for 10 min of warm-up filling, then +1 MiB/min for 10 min, then flat for 10 min
    samples = [(float(t), 1000 * mib + int(min(max(t - 600, 0), 600) / 60 * mib)) for t in range(0, 1800, 5)]
    samples += [(1800.0, 1100 * mib), (1805.0, 1010 * mib), (1810.0, 1050 * mib)]  # a short, noisy tail
    rep = probe.memory_report(samples, warmup_s=600, window_s=600, max_points=100)
    slopes = [w["slope_mib_per_min"] for w in rep["windows"]]
    assert len(slopes) == 2 and abs(slopes[0] - 1.0) < 1e-6 and abs(slopes[1]) < 1e-6
    assert rep["growth_after_warmup_mib"] == pytest.approx(50.0)
    assert len(rep["series"]) <= 100 and rep["series"][0] == [0.0, 1000.0]
    assert probe.slope_mib_per_min(samples[:2]) is None


def test_bad_window_is_refused(tmp_path):
    assert main(["load", "--url", "http://127.0.0.1:9", "--window", "0", "--duration", "1"]) == 2


def test_only_loopback(tmp_path):
    assert main(["load", "--url", "http://192.0.2.1:8000", "--duration", "1"]) == 2
    assert main(["load", "--url", "http://example.com", "--duration", "1"]) == 2


def test_requests_carry_the_temperature_and_a_seed_only_when_sampling():
    from measure.load.client import Mix, _body

    path, greedy = _body("chat-stream", "2+2?", 8, 123, Mix(temperature=0.0, model="m"))
    assert path == "/v1/chat/completions" and greedy["temperature"] == 0.0 and "seed" not in greedy
    assert greedy["stream"] and greedy["model"] == "m" and greedy["messages"][0]["content"] == "2+2?"
    _, sampled = _body("generate", "2+2?", 8, 123, Mix(temperature=0.7))
    assert sampled["temperature"] == 0.7 and sampled["seed"] == 123 and "model" not in sampled


def test_bad_temperature_is_refused(capsys):
    assert main(["load", "--url", "http://127.0.0.1:9", "--temperature", "-1", "--duration", "1"]) == 2
    assert "--temperature" in capsys.readouterr().err
