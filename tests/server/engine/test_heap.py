"""The heap trimmer of vLLM's worker process (`heap.py`): its setting, its thread, and that a trim
gives freed heap pages back to the OS (RSS of this process, glibc only)."""

from __future__ import annotations

import ctypes
import time

import pytest

from server.engine import heap
from server.engine.memory_report import rss_bytes

needs_trim = pytest.mark.skipif(heap._malloc_trim() is None, reason="this libc has no malloc_trim")


@pytest.mark.parametrize(
    ("raw", "period"), [(None, heap.DEFAULT_PERIOD_S), ("", 30.0), ("0", 0.0), ("2.5", 2.5)]
)
def test_the_period_comes_from_the_environment(raw, period):
    env = {} if raw is None else {heap.ENV: raw}
    assert heap.period_from_env(env) == period


@pytest.mark.parametrize("raw", ["-1", "soon", "nan"])
def test_a_bad_period_names_the_variable(raw):
    with pytest.raises(ValueError, match=heap.ENV):
        heap.period_from_env({heap.ENV: raw})


def test_a_bad_period_fails_the_launch_plan_not_the_worker():
    from server.engine import vllm_launch

    with pytest.raises(ValueError, match=heap.ENV):
        vllm_launch.plan("target", 64, 0, environ={heap.ENV: "x"}, on_cpu=True)


def test_period_zero_starts_nothing():
    t = heap.HeapTrimmer(0).start()
    assert not t.active and not t.trim_now() and t.trims == 0


@needs_trim
def test_the_thread_trims_periodically_and_stops():
    t = heap.HeapTrimmer(0.01).start()
    try:
        deadline = time.monotonic() + 10
        while t.trims < 3 and time.monotonic() < deadline:
            time.sleep(0.01)
        assert t.trims >= 3 and t.seconds > 0
    finally:
        t.stop()
    n = t.trims
    time.sleep(0.05)
    assert not t.active and t.trims == n


@needs_trim
def test_a_trim_gives_freed_heap_pages_back():
    malloc, free = heap.libc_function("malloc"), heap.libc_function("free")
    malloc.restype, malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    free.argtypes = [ctypes.c_void_p]
    chunk, n = 64 << 10, 3000  # 64 KiB: below glibc's mmap threshold, so from the heap
    blocks = [malloc(chunk) for _ in range(n)]
    assert all(blocks)
    for b in blocks:
        ctypes.memset(b, 1, chunk)  # touch every page
    before = rss_bytes()
    for b in blocks[:-1]:  # the last block pins the heap's top: no automatic trim
        free(b)
    try:
        freed_but_held = rss_bytes()
        assert heap.HeapTrimmer(1).trim_now()
        after = rss_bytes()
    finally:
        free(blocks[-1])
    assert before - freed_but_held < 0.2 * n * chunk  # free() alone gives (almost) nothing back
    assert freed_but_held - after > 0.8 * n * chunk  # the trim gives the freed pages back


def test_the_memory_report_writes_at_most_one_line_per_period(tmp_path, monkeypatch):
    import json
    import tracemalloc

    import torch

    from server.engine import memory_report

    monkeypatch.delenv(memory_report.ENV, raising=False)
    assert memory_report.start_from_env() is None  # off unless asked
    monkeypatch.setenv(memory_report.ENV, str(tmp_path / "mem"))
    monkeypatch.setenv(memory_report.PERIOD_ENV, "0.2")
    monkeypatch.setenv(memory_report.TRACE_ENV, "1")
    rep = memory_report.start_from_env()
    try:
        keep = [torch.ones(1 << 20) for _ in range(3)]  # 12 MiB of tensors, alive
        assert rep.maybe_write() and not rep.maybe_write()  # the first call writes; then the period
        time.sleep(0.25)
        assert rep.maybe_write()  # tracemalloc's baseline is taken at the second line
        grown = [bytearray(1 << 20) for _ in range(4)]  # 4 MiB of Python allocations on this line
        time.sleep(0.25)
        assert rep.maybe_write()
    finally:
        tracemalloc.stop()
    lines = [json.loads(x) for x in open(rep.path).read().splitlines()]
    assert len(lines) == 3 and lines[0]["t_s"] <= lines[-1]["t_s"]
    last = lines[-1]
    assert last["rss"] > 0 and last["tensors"]["bytes"] >= 3 * 4 * (1 << 20)
    assert sum(last["objects"].values()) > 0
    if last["heap"] is not None:
        assert last["heap"]["in_use"] > 0 and last["heap"]["free"] >= 0
    assert any("test_heap.py" in site and size >= 4 * (1 << 20) for site, size in last["growth"])
    del keep, grown
