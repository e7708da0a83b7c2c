"""Process lifecycle of `epispec serve` (its `serve_app`, in a real process with a scripted
engine that emits one token every `--delay` seconds): SIGTERM stops accepting, lets
in-flight streams finish up to the shutdown timeout, then exits 0; a dead engine makes the
process answer 503 and exit non-zero. The same with a real engine: tests/server/test_serve.py."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from measure.load.probe import free_port, wait_ready
from server.app import create_app
from server.commands.serve import EXIT_ENGINE_DEAD
from server.config import Settings
from tests.server.api.live import LiveServer
from tests.server.scripted_engine import ScriptedEngine

ROOT = Path(__file__).resolve().parents[2]


def start_scripted(tiny_models, *args: str) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.server.scripted_engine",
            "--port",
            str(port),
            "--tokenizer",
            tiny_models["tokenizer"],
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, timeout=60)
    return proc, url


def refused(url: str, timeout: float = 5.0) -> bool:
    """Whether new connections are refused within `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            httpx.get(f"{url}/health", timeout=1)
        except httpx.ConnectError:
            return True
        time.sleep(0.05)
    return False


def events(lines) -> list[dict]:
    return [json.loads(x[6:]) for x in lines if x.startswith("data: {")]


def test_sigterm_lets_in_flight_streams_finish_then_exits_0(tiny_models):
    proc, url = start_scripted(tiny_models, "--tokens", "30", "--delay", "0.05")
    try:
        with (
            httpx.Client(timeout=30) as c,
            c.stream("POST", f"{url}/generate", json={"prompt": "hi", "stream": True}) as r,
        ):
            lines = r.iter_lines()
            first = next(lines)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            assert refused(url)  # stops accepting at once
            rest = events(lines)
            took = time.monotonic() - sent
        got = events([first]) + rest
        assert [e["text"] for e in got[:-1]] == [f"t{i} " for i in range(30)]  # every token
        assert got[-1]["finish_reason"] == "length"
        assert took > 1.0  # the stream went on after the signal
        assert proc.wait(timeout=30) == 0
    finally:
        proc.kill()
    out = proc.stdout.read().decode()
    assert "finishing in-flight requests" in out and "Traceback" not in out


def test_sigterm_cuts_streams_after_the_timeout_and_exits_0(tiny_models):
    proc, url = start_scripted(tiny_models, "--tokens", "400", "--delay", "0.05", "--shutdown-timeout", "1")
    try:
        with (
            httpx.Client(timeout=30) as c,
            c.stream("POST", f"{url}/generate", json={"prompt": "hi", "stream": True}) as r,
        ):
            lines = r.iter_lines()
            next(lines)
            sent = time.monotonic()
            proc.send_signal(signal.SIGTERM)
            with pytest.raises(httpx.RemoteProtocolError):  # cut: no final event
                events(lines)
        assert proc.wait(timeout=15) == 0
        assert time.monotonic() - sent < 10  # not the stream's 20 s
    finally:
        proc.kill()


def test_a_dead_engine_gets_503s_then_exits_non_zero(tiny_models):
    proc, url = start_scripted(tiny_models, "--tokens", "400", "--delay", "0.05", "--die-after", "2")
    try:
        with (
            httpx.Client(timeout=30) as c,
            c.stream("POST", f"{url}/generate", json={"prompt": "hi", "stream": True}) as r,
        ):
            got = events(r.iter_lines())
        assert got[-1]["error"]["code"] == "engine_error"
        assert got[-1]["error"]["message"] == "Generation failed: RuntimeError."
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/generate", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert proc.wait(timeout=30) == EXIT_ENGINE_DEAD
    finally:
        proc.kill()
    assert "engine has died" in proc.stdout.read().decode()


def test_while_draining_new_generations_get_503_and_ready_fails(tokenizer):
    app = create_app(Settings(), ScriptedEngine(tokenizer))
    with LiveServer(app) as live:
        assert httpx.post(f"{live.url}/generate", json={"prompt": "hi"}).status_code == 200
        app.state.draining = True
        r = httpx.post(f"{live.url}/v1/completions", json={"prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["code"] == "shutting_down"
        assert r.headers["retry-after"] == "1"
        assert httpx.get(f"{live.url}/ready").status_code == 503
        assert httpx.get(f"{live.url}/health").status_code == 200  # alive, just leaving
