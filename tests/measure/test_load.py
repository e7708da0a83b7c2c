"""`epispec load` against real servers (the reference engine on the tiny models): a clean
run passes with nothing left running, an overloaded server's 429s fail it, a spawned server
is stopped gracefully, and only loopback targets are accepted."""

from __future__ import annotations

import json

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
    status, r = load(tmp_path, "--serve", serve, "--concurrency", "2", *SHORT)
    assert status == 0, r
    assert r["server"]["spawned"] and r["server"]["exit_status"] == 0
    assert r["memory"]["samples"] >= 2 and r["memory"]["peak_mib"] > 50  # the process tree


def test_only_loopback(tmp_path):
    assert main(["load", "--url", "http://192.0.2.1:8000", "--duration", "1"]) == 2
    assert main(["load", "--url", "http://example.com", "--duration", "1"]) == 2
