"""Latency statistics and peak memory.

Per request the runner records when it was sent and when each output token arrived (a
delta carrying several tokens, e.g. accepted drafts, stamps them all with its arrival time):

    TTFT = first token time − send time
    ITL  = gaps between consecutive token times of one request (0 within a delta)
    output tokens/s = all output tokens of a level / the level's wall time

Peak resident memory is the largest sum of RSS over this process and all its descendants
(vLLM's engine-core and workers), sampled on a background thread. Summed RSS counts pages
shared between processes more than once; every config is measured the same way.
"""

from __future__ import annotations

import itertools
import math
import threading
import time
from dataclasses import dataclass, field

import psutil


@dataclass
class RequestTiming:
    sent: float
    token_times: list[float] = field(default_factory=list)

    def add(self, n_tokens: int, t: float) -> None:
        self.token_times.extend([t] * n_tokens)


def percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolated q-th percentile (q in [0, 100]); None for no values."""
    if not values:
        return None
    s = sorted(values)
    pos = (len(s) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def latency_summary(timings: list[RequestTiming], wall_s: float) -> dict:
    """output_tokens, output_tokens_per_s, ttft_p50_s, itl_p50_s, itl_p99_s of one level."""
    ttft = [t.token_times[0] - t.sent for t in timings if t.token_times]
    itl = [b - a for t in timings for a, b in itertools.pairwise(t.token_times)]
    tokens = sum(len(t.token_times) for t in timings)
    return {
        "output_tokens": tokens,
        "wall_s": wall_s,
        "output_tokens_per_s": tokens / wall_s if wall_s > 0 else None,
        "ttft_p50_s": percentile(ttft, 50),
        "itl_p50_s": percentile(itl, 50),
        "itl_p99_s": percentile(itl, 99),
    }


def tree_rss(proc: psutil.Process) -> int:
    """RSS of a process and all its descendants, in bytes (vanished processes count 0)."""
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return total


class PeakRss:
    """Samples `tree_rss` of this process every `interval_s` until stopped; `reset()` starts a
    new window (one per concurrency level), `peak` is the window's maximum."""

    def __init__(self, interval_s: float = 0.1) -> None:
        self._proc = psutil.Process()
        self._interval = interval_s
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._peak = tree_rss(self._proc)
        self._thread = threading.Thread(target=self._loop, name="peak-rss", daemon=True)

    def __enter__(self) -> PeakRss:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()

    def _loop(self) -> None:
        while not self._stop.wait(self._interval):
            rss = tree_rss(self._proc)
            with self._lock:
                self._peak = max(self._peak, rss)

    def reset(self) -> None:
        with self._lock:
            self._peak = tree_rss(self._proc)

    @property
    def peak(self) -> int:
        rss = tree_rss(self._proc)
        with self._lock:
            self._peak = max(self._peak, rss)
            return self._peak


def now() -> float:
    return time.perf_counter()
