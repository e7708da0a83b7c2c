"""The server under load: spawned (`epispec serve` on a free loopback port) or attached to
(`--url`, loopback only), its memory over time, and what it still holds after the run.

Memory is the summed RSS of the server's process tree (vLLM's engine core included; pages
shared between processes count once per process), sampled every second. Attached without a
pid, only the API process's `process_resident_memory_bytes` from `/metrics` is available.
"""

from __future__ import annotations

import asyncio
import ipaddress
import shlex
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from urllib.parse import urlparse

import httpx
import psutil
from prometheus_client.parser import text_string_to_metric_families

from measure.bench.measure import tree_rss

STATE_GAUGES = (
    "epispec_engine_requests",
    "epispec_eu_joiner_states",
    "epispec_eu_proposer_states",
    "epispec_requests_running",
    "epispec_requests_waiting",
)


class LoadError(Exception):
    """A load test that cannot run (a non-loopback URL, a server that does not start)."""


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        loopback = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise LoadError(
            f"only loopback servers (127.0.0.1, ::1, localhost) may be load-tested, not '{host}'."
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, url: str, timeout: float, headers: dict | None = None) -> None:
    """Wait until the server process answers `/ready` with 200; LoadError if it exits or takes
    longer than `timeout` (then it is killed)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise LoadError(f"the server exited with status {proc.returncode} before it was ready.")
        try:
            if httpx.get(f"{url}/ready", headers=headers or {}).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.kill()
    raise LoadError(f"the server was not ready within {timeout:.0f} s.")


def spawn_server(serve_args: str, api_key: str | None, timeout: float) -> tuple[subprocess.Popen, str]:
    """`epispec serve SERVE_ARGS` on a free loopback port, once `/ready`; its log goes to stderr."""
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "server.cli",
        "serve",
        *shlex.split(serve_args),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--log-level",
        "warning",
    ]
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr)
    url = f"http://127.0.0.1:{port}"
    wait_ready(proc, url, timeout, {"Authorization": f"Bearer {api_key}"} if api_key else None)
    return proc, url


def stop_server(proc: subprocess.Popen, timeout: float = 60) -> int | None:
    """SIGTERM, then the exit status (None if it had to be killed)."""
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return None


def scrape(text: str) -> dict[str, float]:
    """Unlabelled-by-endpoint values from Prometheus text: sums over label sets per sample name."""
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] = out.get(s.name, 0.0) + s.value
    return out


@dataclass
class MemorySampler:
    """RSS every `period` seconds: of `pid`'s tree, else of the API process via /metrics."""

    client: httpx.AsyncClient
    pid: int | None
    period: float = 1.0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (seconds since start, bytes)

    async def run(self, stop: asyncio.Event) -> None:
        start = time.monotonic()
        while not stop.is_set():
            rss = await self.read()
            if rss:
                self.samples.append((time.monotonic() - start, rss))
            try:
                await asyncio.wait_for(stop.wait(), self.period)
            except TimeoutError:
                pass

    async def read(self) -> int | None:
        if self.pid is not None:
            return await asyncio.to_thread(tree_rss, psutil.Process(self.pid))
        try:
            r = await self.client.get("/metrics")
            return int(scrape(r.text).get("process_resident_memory_bytes", 0)) or None
        except httpx.HTTPError:
            return None


def slope_mib_per_min(points: list[tuple[float, int]]) -> float | None:
    """Least-squares slope of (seconds, bytes) points, MiB per minute; None with < 3 points."""
    n = len(points)
    if n < 3:
        return None
    mt = sum(t for t, _ in points) / n
    mb = sum(b for _, b in points) / n
    var = sum((t - mt) ** 2 for t, _ in points)
    return sum((t - mt) * (b - mb) for t, b in points) / var * 60 / (1 << 20) if var else 0.0


def memory_report(
    samples: list[tuple[float, int]], warmup_s: float, window_s: float = 600.0, max_points: int = 720
) -> dict:
    """RSS at the end of the warm-up and at the end, growth, and the slope after the warm-up;
    `windows`: the slope of each consecutive `window_s` after the warm-up (a working set that is
    still filling shows as slopes falling towards 0, a leak as slopes that stay); `series`: at most
    `max_points` (seconds, MiB) samples, evenly thinned, for a plot."""
    if not samples:
        return {"samples": 0}
    after = [(t, b) for t, b in samples if t >= warmup_s] or samples[-1:]
    mib = 1 << 20
    out = {
        "samples": len(samples),
        "warmup_s": warmup_s,
        "start_mib": samples[0][1] / mib,
        "after_warmup_mib": after[0][1] / mib,
        "end_mib": samples[-1][1] / mib,
        "peak_mib": max(b for _, b in samples) / mib,
        "growth_after_warmup_mib": (samples[-1][1] - after[0][1]) / mib,
    }
    slope = slope_mib_per_min(after)
    if slope is not None:
        out["slope_mib_per_min"] = slope
    windows = []
    t0, t_end = after[0][0], after[-1][0]
    while t0 < t_end:
        pts = [(t, b) for t, b in after if t0 <= t < t0 + window_s]
        w = slope_mib_per_min(pts)
        # a tail shorter than half a window (the drain after the load) has no slope worth reading
        if w is not None and pts[-1][0] - pts[0][0] >= window_s / 2:
            windows.append(
                {
                    "from_s": round(pts[0][0], 1),
                    "to_s": round(pts[-1][0], 1),
                    "slope_mib_per_min": w,
                    "mean_mib": sum(b for _, b in pts) / len(pts) / mib,
                }
            )
        t0 += window_s
    out["windows"] = windows
    step = max(1, -(-len(samples) // max_points))
    out["series"] = [[round(t, 1), round(b / mib, 1)] for t, b in samples[::step]]
    return out


async def leftovers(client: httpx.AsyncClient, timeout: float) -> dict:
    """Wait up to `timeout` for every state gauge to reach 0; the last values seen."""
    deadline = time.monotonic() + timeout
    values: dict[str, float] = {}
    while True:
        try:
            ready = await client.get("/ready")
            metrics = scrape((await client.get("/metrics")).text)
            values = {name: metrics[name] for name in STATE_GAUGES if name in metrics}
            values["ready_running"] = float(ready.json().get("running", -1))
            if "epispec_eu_channel_dropped_messages_total" in metrics:  # the vllm engine
                values["eu_channel_dropped"] = metrics["epispec_eu_channel_dropped_messages_total"]
        except (httpx.HTTPError, ValueError) as exc:
            values = {"unreachable": str(exc)}
        busy = {k: v for k, v in values.items() if k != "eu_channel_dropped" and v != 0}
        if not busy or time.monotonic() >= deadline:
            values["waited_s"] = round(timeout - max(0.0, deadline - time.monotonic()), 1)
            return values
        await asyncio.sleep(0.5)
