"""Give the C heap's free pages back to the OS at a fixed period, in the process that runs vLLM's
model runner and the drafts.

glibc keeps memory freed by that process (tensors of varying shapes, freed by many threads) in
its arenas instead of returning it. Measured (issue 27, docs/reliability.md): one `malloc_trim(0)`
under `epispec load --concurrency 64` gave back 0.51 GiB at once; under steady load most of it was
touched again within seconds, so the trim matters after a burst, when the worker would otherwise
keep its peak. A daemon thread calls `malloc_trim(0)` every `period_s` seconds; the call releases
the GIL (ctypes) and takes each arena's lock only while it trims it.

`EPISPEC_MALLOC_TRIM_S` sets the period (default 30 s; 0 turns it off). A libc without
`malloc_trim` (musl, macOS) leaves it off.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os
import threading
import time
from collections.abc import Mapping

log = logging.getLogger(__name__)
ENV = "EPISPEC_MALLOC_TRIM_S"
DEFAULT_PERIOD_S = 30.0


def libc_function(name: str):
    """The C library's function `name` (ctypes, untyped), or None where the libc has none."""
    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), name)
    except (OSError, AttributeError):
        return None


def _malloc_trim():
    """glibc's `malloc_trim(size_t pad) -> int`, or None where the libc has none."""
    fn = libc_function("malloc_trim")
    if fn is not None:
        fn.argtypes, fn.restype = [ctypes.c_size_t], ctypes.c_int
    return fn


def period_from_env(environ: Mapping[str, str] | None = None) -> float:
    """The trim period in seconds from `EPISPEC_MALLOC_TRIM_S` of `environ` (default `os.environ`;
    0: off). ValueError names the variable when it is not a number ≥ 0."""
    raw = (os.environ if environ is None else environ).get(ENV, "")
    try:
        period = float(raw) if raw.strip() else DEFAULT_PERIOD_S
    except ValueError:
        raise ValueError(f"{ENV} must be a number of seconds >= 0, got {raw!r}") from None
    if not period >= 0:
        raise ValueError(f"{ENV} must be a number of seconds >= 0, got {raw!r}")
    return period


class HeapTrimmer:
    """A daemon thread that calls `malloc_trim(0)` every `period_s` seconds; `trims` counts the
    calls and `seconds` their total duration."""

    def __init__(self, period_s: float) -> None:
        self.period_s = period_s
        self.trims = 0
        self.seconds = 0.0
        self._trim = _malloc_trim() if period_s > 0 else None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def active(self) -> bool:
        return self._thread is not None

    def trim_now(self) -> bool:
        """One trim; whether memory was given back (False also where there is no malloc_trim)."""
        if self._trim is None:
            return False
        t0 = time.perf_counter()
        released = bool(self._trim(0))
        self.seconds += time.perf_counter() - t0
        self.trims += 1
        return released

    def start(self) -> HeapTrimmer:
        if self._trim is not None and self._thread is None:
            self._thread = threading.Thread(target=self._run, name="epispec-malloc-trim", daemon=True)
            self._thread.start()
            log.info("epispec: giving free heap pages back to the OS every %.0f s (%s)", self.period_s, ENV)
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.period_s):
            self.trim_now()


def start_from_env() -> HeapTrimmer:
    """A started trimmer with the period of `EPISPEC_MALLOC_TRIM_S` (not started when 0)."""
    return HeapTrimmer(period_from_env()).start()
