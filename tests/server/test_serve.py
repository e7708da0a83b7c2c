"""`epispec serve`: flags to settings, a clear refusal without models, a real start."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from measure.load.probe import free_port
from server.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]


def parse(argv: list[str]):
    sys.argv = ["epispec", *argv]
    return build_parser().parse_args(argv)


def test_flags_become_settings_and_unset_flags_stay_unset(monkeypatch):
    from server.commands.serve import settings_from_flags

    monkeypatch.setenv("EPISPEC_PORT", "9100")
    args = parse(
        [
            "serve",
            "--target",
            "t",
            "--draft",
            "a",
            "--draft",
            "b",
            "--api-key",
            "k",
            "--dtype",
            "float32",
            "--eu-threshold",
            "0.7",
        ]
    )
    s = settings_from_flags(args)
    assert (s.target, s.drafts, s.api_key.get_secret_value()) == ("t", ["a", "b"], "k")
    assert s.port == 9100  # from the environment: --port was not given
    assert s.eu_threshold == 0.7 and s.model_flags == {"dtype": "float32"}


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("EPISPEC_")}
    return {**env, **extra}


def test_serve_without_models_says_how_to_pass_them(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=_env(EPISPEC_BUNDLE=str(tmp_path)),
        timeout=120,
    )
    assert r.returncode != 0
    assert "--target" in r.stderr and "--bundle" in r.stderr


def test_serve_refuses_a_side_channel_the_placement_cannot_reach():
    """Ray may put the proposer on another machine: the default ipc:// channel is refused in one
    sentence before any model loads (the folders need not exist), and so is a bad setting."""
    base = [sys.executable, "-m", "server.cli", "serve", "--target", "t", "--draft", "d", "--engine", "vllm"]
    for extra, said in (
        (["--distributed-executor-backend", "ray"], "the default ipc side channel cannot reach"),
        (["--eu-channel", "tcp://0.0.0.0"], "eu_channel must be 'ipc'"),
    ):
        r = subprocess.run([*base, *extra], cwd=ROOT, capture_output=True, text=True, env=_env(), timeout=120)
        assert r.returncode == 2 and said in r.stderr, r.stderr
        assert "Traceback" not in r.stderr


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_serve_starts_answers_and_exits_0_on_a_signal(tiny_models, sig):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--engine",
        "reference",
        "--device",
        "cpu",
        "--target",
        tiny_models["target"],
        "--draft",
        tiny_models["drafts"][0],
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, proc.stdout.read().decode()
            try:
                if httpx.get(f"{url}/ready").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "epispec serve did not become ready"
            time.sleep(0.2)
        body = httpx.post(f"{url}/generate", json={"prompt": "hi", "max_tokens": 2}, timeout=60).json()
        assert body["usage"]["completion_tokens"] >= 1 and body["tokens"][0]["eu"] is not None
    finally:
        proc.send_signal(sig)
        assert proc.wait(timeout=30) == 0
