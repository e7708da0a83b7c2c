"""`epispec load`: run the clients, then report (text, and JSON with `--json FILE`).

    epispec load [--url http://127.0.0.1:8000 [--pid PID] | --serve "SERVE FLAGS"]
                 [--concurrency 8] [--duration 60] [--max-requests N] [--warmup S]
                 [--max-tokens 8 64] [--leave-rate 0.2] [--api-key KEY] [--window 600]
                 [--json FILE] [--plot FILE.png]

Without `--url` it spawns `epispec serve SERVE FLAGS` on a free loopback port, measures
its whole process tree's memory, and stops it with SIGTERM at the end (its exit status is
reported: 0 for a graceful shutdown). Bounded: at most `MAX_CONCURRENCY` clients and
`MAX_DURATION_S` seconds, requests time out after `--request-timeout`. Exit status 0 when
there were no unexpected errors, nothing was left running and the server exited cleanly;
1 otherwise; 2 when the test could not run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import Counter

import httpx

from measure.bench.measure import percentile
from measure.load.client import Mix, Outcome, one_request
from measure.load.probe import (
    LoadError,
    MemorySampler,
    check_loopback,
    leftovers,
    memory_report,
    spawn_server,
    stop_server,
)

MAX_CONCURRENCY = 512
MAX_DURATION_S = 3600.0
EXPECTED = ("ok", "left")  # anything else is an error


def add_arguments(parser: argparse.ArgumentParser) -> None:
    g = parser.add_argument_group("target")
    g.add_argument("--url", help="a running server on loopback (default: spawn one)")
    g.add_argument("--pid", type=int, help="with --url: the server's pid, to measure its process tree's RSS")
    g.add_argument(
        "--serve",
        default="",
        metavar="FLAGS",
        help="flags for the spawned `epispec serve` (one quoted string), e.g. "
        '"--engine vllm --kv-cache-space 2"',
    )
    g.add_argument("--api-key", help="bearer key for the server")
    g.add_argument(
        "--start-timeout", type=float, default=600, help="seconds for a spawned server to be ready"
    )
    w = parser.add_argument_group("workload")
    w.add_argument("--concurrency", type=int, default=8, help="clients in parallel (default 8)")
    w.add_argument("--duration", type=float, default=60, help="seconds of load (default 60)")
    w.add_argument("--max-requests", type=int, default=None, help="stop after this many requests")
    w.add_argument(
        "--warmup",
        type=float,
        default=None,
        help="seconds before the memory baseline (default: 10%% of --duration, at most 60)",
    )
    w.add_argument(
        "--max-tokens",
        type=int,
        nargs=2,
        default=(8, 64),
        metavar=("MIN", "MAX"),
        help="max_tokens of each request, drawn uniformly (default 8 64)",
    )
    w.add_argument(
        "--leave-rate",
        type=float,
        default=0.2,
        help="share of streams the client leaves after 1-5 events (default 0.2)",
    )
    w.add_argument("--request-timeout", type=float, default=300, help="seconds per request (default 300)")
    w.add_argument(
        "--drain-timeout",
        type=float,
        default=60,
        help="seconds to wait for the server to return to idle after the load (default 60)",
    )
    w.add_argument(
        "--temperature",
        type=float,
        default=1.0,
        help="sampling temperature of every request (default 1.0, each with its own seed; 0: greedy)",
    )
    w.add_argument("--seed", type=int, default=0)
    w.add_argument(
        "--window",
        type=float,
        default=600,
        help="seconds per window of the RSS slopes after the warm-up (default 600)",
    )
    parser.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--plot", metavar="FILE", help="also write the RSS over time as a PNG")


def run(args: argparse.Namespace) -> int:
    try:
        _check(args)
        report = asyncio.run(_load(args))
    except LoadError as exc:
        print(f"epispec load: {exc}", file=sys.stderr)
        return 2
    print(format_report(report))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(report, f, indent=2)
    if args.plot:
        from measure.load.plot import rss_plot

        try:
            print(f"wrote {rss_plot(report, args.plot)}")
        except (ValueError, OSError) as exc:
            print(f"epispec load: --plot: {exc}", file=sys.stderr)
    return 0 if report["passed"] else 1


def _check(args: argparse.Namespace) -> None:
    if not 1 <= args.concurrency <= MAX_CONCURRENCY:
        raise LoadError(f"--concurrency must be within 1..{MAX_CONCURRENCY}.")
    if not 0 < args.duration <= MAX_DURATION_S:
        raise LoadError(f"--duration must be within (0, {MAX_DURATION_S:.0f}] seconds.")
    lo, hi = args.max_tokens
    if not 1 <= lo <= hi:
        raise LoadError("--max-tokens needs 1 <= MIN <= MAX.")
    if not 0 <= args.leave_rate <= 1:
        raise LoadError("--leave-rate must be within [0, 1].")
    if not 0 <= args.temperature <= 2:
        raise LoadError("--temperature must be within [0, 2].")
    if args.url:
        check_loopback(args.url)
    if not args.window > 0:
        raise LoadError("--window must be > 0 seconds.")
    if args.pid is not None and not args.url:
        raise LoadError("--pid goes with --url (a spawned server is measured anyway).")


async def _load(args: argparse.Namespace) -> dict:
    proc = None
    url, pid = args.url, args.pid
    if not url:
        proc, url = await asyncio.to_thread(spawn_server, args.serve, args.api_key, args.start_timeout)
        pid = proc.pid
    try:
        report = await _drive(args, url.rstrip("/"), pid)
    finally:
        exit_status = await asyncio.to_thread(stop_server, proc) if proc is not None else None
    report["server"] = {
        "url": url,
        "spawned": proc is not None,
        "serve_flags": args.serve if proc else None,
        "exit_status": exit_status,
    }
    if proc is not None and exit_status != 0:
        report["passed"] = False
    return report


async def _drive(args: argparse.Namespace, url: str, pid: int | None) -> dict:
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    limits = httpx.Limits(
        max_connections=args.concurrency + 4, max_keepalive_connections=args.concurrency + 4
    )
    async with httpx.AsyncClient(
        base_url=url, headers=headers, limits=limits, timeout=httpx.Timeout(args.request_timeout, connect=30)
    ) as client:
        model = (await client.get("/v1/models")).json()["data"][0]["id"]
        mix = Mix(
            max_tokens=tuple(args.max_tokens),
            leave_rate=args.leave_rate,
            model=model,
            temperature=args.temperature,
        )
        sampler = MemorySampler(client, pid)
        stop_sampling = asyncio.Event()
        sampling = asyncio.create_task(sampler.run(stop_sampling))
        outcomes: list[Outcome] = []
        start = time.monotonic()
        deadline = start + args.duration
        budget = [args.max_requests if args.max_requests is not None else float("inf")]

        async def worker(i: int) -> None:
            rng = random.Random(args.seed * 100_003 + i)
            while time.monotonic() < deadline and budget[0] > 0:
                budget[0] -= 1
                outcomes.append(await one_request(client, rng, mix))

        await asyncio.gather(*(worker(i) for i in range(args.concurrency)))
        wall = time.monotonic() - start
        after = await leftovers(client, args.drain_timeout)
        stop_sampling.set()
        await sampling
    warmup = args.warmup if args.warmup is not None else min(60.0, 0.1 * args.duration)
    return summarize(outcomes, wall, after, memory_report(sampler.samples, warmup, args.window), args)


def summarize(
    outcomes: list[Outcome], wall: float, after: dict, memory: dict, args: argparse.Namespace
) -> dict:
    results = Counter(o.result for o in outcomes)
    errors = {k: v for k, v in results.items() if k not in EXPECTED}
    done = [o for o in outcomes if o.result == "ok"]
    ttft = [o.ttft_s for o in outcomes if o.ttft_s is not None]
    examples = {}
    for o in outcomes:
        if o.result not in EXPECTED and o.result not in examples:
            examples[o.result] = f"{o.kind}: {o.detail}"
    leaked = {k: v for k, v in after.items() if k not in ("eu_channel_dropped", "waited_s") and v != 0}
    n = len(outcomes)
    return {
        "config": {
            "concurrency": args.concurrency,
            "duration_s": args.duration,
            "max_requests": args.max_requests,
            "max_tokens": list(args.max_tokens),
            "leave_rate": args.leave_rate,
            "temperature": args.temperature,
            "seed": args.seed,
        },
        "wall_s": round(wall, 1),
        "requests": n,
        "requests_per_s": round(n / wall, 2) if wall else None,
        "results": dict(results),
        "by_kind": {
            k: dict(Counter(o.result for o in outcomes if o.kind == k))
            for k in sorted({o.kind for o in outcomes})
        },
        "success_rate": round((results["ok"] + results["left"]) / n, 4) if n else None,
        "errors": errors,
        "error_examples": examples,
        "latency_s": {
            "p50": percentile([o.latency_s for o in done], 50),
            "p99": percentile([o.latency_s for o in done], 99),
        },
        "ttft_s": {"p50": percentile(ttft, 50), "p99": percentile(ttft, 99)},
        "after": after,
        "memory": memory,
        "passed": not errors and not leaked and not after.get("eu_channel_dropped"),
    }


def format_report(r: dict) -> str:
    def ms(x):
        return "-" if x is None else f"{x * 1000:.0f} ms"

    mem = r["memory"]
    lines = [
        f"{r['requests']} requests in {r['wall_s']} s ({r['requests_per_s']}/s), "
        f"{r['config']['concurrency']} clients; success rate {r['success_rate']}",
        f"results: {r['results']}",
        f"errors by kind: {r['errors'] or 'none'}",
        f"latency (completed) p50 {ms(r['latency_s']['p50'])}, p99 {ms(r['latency_s']['p99'])}; "
        f"TTFT (streams) p50 {ms(r['ttft_s']['p50'])}, p99 {ms(r['ttft_s']['p99'])}",
        f"after the run: {r['after']}",
    ]
    if mem.get("samples"):
        lines.append(
            f"RSS: start {mem['start_mib']:.0f} MiB, after warm-up {mem['after_warmup_mib']:.0f} MiB, "
            f"end {mem['end_mib']:.0f} MiB, peak {mem['peak_mib']:.0f} MiB, growth after warm-up "
            f"{mem['growth_after_warmup_mib']:+.1f} MiB"
            + (f", slope {mem['slope_mib_per_min']:+.2f} MiB/min" if "slope_mib_per_min" in mem else "")
        )
        if mem.get("windows"):
            lines.append(
                "RSS slope per window after warm-up (MiB/min): "
                + ", ".join(
                    f"{w['from_s'] / 60:.0f}-{w['to_s'] / 60:.0f} min {w['slope_mib_per_min']:+.2f}"
                    for w in mem["windows"]
                )
            )
    for kind, example in r["error_examples"].items():
        lines.append(f"  e.g. {kind}: {example}")
    if "server" in r:
        lines.append(f"server: {r['server']['url']}, exit status {r['server']['exit_status']}")
    lines.append("PASSED" if r["passed"] else "FAILED")
    return "\n".join(lines)
