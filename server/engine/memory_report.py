"""`EPISPEC_MEMORY_REPORT=PATH`: where the process that runs vLLM's model runner and the drafts
keeps its memory, line by line over time, to find growth under load (issue 27).

Every `EPISPEC_MEMORY_REPORT_S` seconds (default 60) that process appends one JSON line to
`PATH.<pid>`:

    t_s            seconds since the first line
    rss            resident set size, bytes (/proc/self/status)
    heap           glibc's mallinfo2: "in_use" (bytes allocated from the arenas), "free" (bytes
                   free inside them: fragmentation when it grows), "mmapped" (bytes in mmap'd
                   chunks); absent on another libc
    tensors        CPU tensors Python can reach: count and bytes of their storages (each storage
                   once)
    objects        the 25 Python object types with the most instances
    growth         with `EPISPEC_MEMORY_REPORT_TRACE=1`: the 20 source lines whose Python
                   allocations grew most since the second line, bytes (tracemalloc starts at the
                   first line, after start-up, as tracing slows every Python allocation)

A diagnostic, off unless the variable is set. Lines are written by the proposer's own step
(`maybe_write`, vLLM's worker thread), never from a second thread: `gc.get_objects` holds a
reference to every object, and a tuple another thread is still building then fails to resize
(measured: a worker died at start-up with "SystemError: Objects/tupleobject.c:927" while a
reporting thread walked the objects). Each line pauses that step for the walk.
"""

from __future__ import annotations

import collections
import ctypes
import gc
import json
import logging
import os
import time
import tracemalloc
import warnings

from server.engine.heap import libc_function

log = logging.getLogger(__name__)
ENV, PERIOD_ENV, TRACE_ENV = "EPISPEC_MEMORY_REPORT", "EPISPEC_MEMORY_REPORT_S", "EPISPEC_MEMORY_REPORT_TRACE"
FIELDS = (
    "arena",
    "ordblks",
    "smblks",
    "hblks",
    "hblkhd",
    "usmblks",
    "fsmblks",
    "uordblks",
    "fordblks",
    "keepcost",
)


class _MallInfo2(ctypes.Structure):
    _fields_ = [(n, ctypes.c_size_t) for n in FIELDS]


def _mallinfo2():
    fn = libc_function("mallinfo2")  # glibc >= 2.33
    if fn is not None:
        fn.restype = _MallInfo2
    return fn


def rss_bytes() -> int:
    """This process's resident set size, bytes (0 where /proc has no VmRSS line)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def heap_stats() -> dict | None:
    """glibc's view of the C heap, bytes; None on another libc."""
    fn = _mallinfo2()
    if fn is None:
        return None
    m = fn()
    return {"in_use": m.uordblks + m.hblkhd, "free": m.fordblks, "mmapped": m.hblkhd}


def python_objects() -> tuple[dict, dict]:
    """({"count", "bytes"} of reachable CPU tensors' storages, {type: instances} top 25)."""
    import torch

    counts: collections.Counter = collections.Counter()
    seen, n, nbytes = set(), 0, 0
    objs = gc.get_objects()
    tensors = []
    with warnings.catch_warnings():  # isinstance() touches deprecated torch attributes
        warnings.simplefilter("ignore")
        for o in objs:
            try:
                if isinstance(o, torch.Tensor) and o.device.type == "cpu":
                    tensors.append(o)
            except ReferenceError:  # a weak proxy whose referent is gone
                continue
    for obj in objs:
        counts[type(obj).__qualname__] += 1
    for t in tensors:
        if type(t) not in (torch.Tensor, torch.nn.Parameter):  # fake/functional (torch.compile's)
            continue
        try:
            st = t.untyped_storage()
            ptr, size = st.data_ptr(), st.nbytes()
        except (RuntimeError, NotImplementedError):
            continue
        n += 1
        if ptr not in seen:
            seen.add(ptr)
            nbytes += size
    return {"count": n, "bytes": nbytes}, dict(counts.most_common(25))


class MemoryReport:
    """Appends one JSON line to `path`.<pid> at most every `period_s` seconds, when the owner calls
    `maybe_write` (the first call writes)."""

    def __init__(self, path: str, period_s: float, trace: bool = False) -> None:
        self.path = f"{path}.{os.getpid()}"
        self.period_s = period_s
        self.trace = trace
        self._t0 = time.monotonic()
        self._next = self._t0
        self._first = None  # tracemalloc's snapshot at the second line

    def line(self) -> dict:
        tensors, objects = python_objects()
        out = {
            "t_s": round(time.monotonic() - self._t0, 1),
            "rss": rss_bytes(),
            "heap": heap_stats(),
            "tensors": tensors,
            "objects": objects,
        }
        if self._first is not None:
            diff = tracemalloc.take_snapshot().compare_to(self._first, "lineno")
            out["growth"] = [[str(d.traceback[0]), d.size_diff] for d in diff[:20]]
        elif tracemalloc.is_tracing():
            self._first = tracemalloc.take_snapshot()
        elif self.trace:
            tracemalloc.start()
        return out

    def maybe_write(self) -> bool:
        """Write a line when the period has passed; a failure is logged, never raised (a
        diagnostic never ends the process's serving)."""
        now = time.monotonic()
        if now < self._next:
            return False
        try:
            with open(self.path, "a") as f:
                f.write(json.dumps(self.line()) + "\n")
        except Exception:
            log.exception("epispec memory report: a line failed; the next period tries again")
            return False
        finally:  # the period runs from the end of a line (a walk may take longer than it)
            self._next = time.monotonic() + self.period_s
        return True


def start_from_env() -> MemoryReport | None:
    """A report when `EPISPEC_MEMORY_REPORT` is set, else None."""
    path = os.environ.get(ENV)
    if not path:
        return None
    period = float(os.environ.get(PERIOD_ENV) or 60)
    if not period > 0:
        raise ValueError(f"{PERIOD_ENV} must be a number of seconds > 0, got {period}")
    return MemoryReport(path, period, trace=os.environ.get(TRACE_ENV) == "1")
