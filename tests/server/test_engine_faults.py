"""Engine faults with a real vLLM engine: SIGKILL vLLM's engine-core process under a running
`epispec serve`; the stream in flight ends with a clear error event, new requests get 503,
`/health` fails, and the process exits non-zero (`EXIT_ENGINE_DEAD`) so that a supervisor
restarts it. Also: the prompt never shows in the server's output (vLLM logs included)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys

import httpx
import psutil
import pytest

from measure.load.probe import free_port, wait_ready
from server.commands.serve import EXIT_ENGINE_DEAD
from tests.server.test_serve import ROOT, _env

pytest.importorskip("vllm")
pytestmark = [pytest.mark.vllm, pytest.mark.slow]

VLLM_FLAGS = ["--dtype", "float32", "--enforce-eager", "--max-num-seqs", "4", "--kv-cache-space", "1"]
MARKER = "Question: Zanzibar quokka 7731 has 3 apples"


def engine_core(pid: int) -> psutil.Process:
    """vLLM's engine-core process among the server's descendants."""
    for child in psutil.Process(pid).children(recursive=True):
        text = " ".join(child.cmdline()) + " " + child.name()
        if "EngineCore" in text or "engine_core" in text:
            return child
    names = [(c.pid, c.name(), c.cmdline()[:3]) for c in psutil.Process(pid).children(recursive=True)]
    raise AssertionError(f"no engine-core process among {names}")


def test_killing_the_engine_core_fails_streams_then_the_process(tiny_models):
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        "--engine",
        "vllm",
        "--target",
        tiny_models["target"],
        *sum((["--draft", d] for d in tiny_models["drafts"]), []),
        *VLLM_FLAGS,
        "--port",
        str(port),
        "--log-level",
        "info",
    ]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_ready(proc, url, timeout=600)
        ok = httpx.post(f"{url}/generate", json={"prompt": MARKER, "max_tokens": 4}, timeout=120)
        assert ok.status_code == 200
        core = engine_core(proc.pid)
        body = {"prompt": MARKER, "max_tokens": 200, "stream": True, "temperature": 1.0, "seed": 1}
        with httpx.Client(timeout=120) as c, c.stream("POST", f"{url}/generate", json=body) as r:
            lines = r.iter_lines()
            assert next(lines).startswith("data: {")
            core.send_signal(signal.SIGKILL)
            last = [json.loads(x[6:]) for x in lines if x.startswith("data: {")][-1]
        assert last["error"]["code"] == "engine_error" and last["error"]["type"] == "server_error"
        assert "Traceback" not in json.dumps(last)
        assert httpx.get(f"{url}/health").status_code == 503
        r = httpx.post(f"{url}/v1/completions", json={"prompt": "hi", "max_tokens": 2})
        assert r.status_code == 503 and r.json()["error"]["code"] == "engine_dead"
        assert proc.wait(timeout=60) == EXIT_ENGINE_DEAD
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for child in psutil.Process().children(recursive=True):  # nothing of vLLM's left behind
            try:
                if child.pid != proc.pid and "EngineCore" in " ".join(child.cmdline()):
                    child.kill()
            except psutil.Error:  # gone already, or a zombie of an earlier test: not running
                continue
    out = proc.stdout.read().decode()
    assert "engine has died" in out
    assert "quokka" not in out  # prompts are not logged, by us or by vLLM
