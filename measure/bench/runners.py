"""One benchmark config in its own process: `python -m measure.bench.runners SPEC.json OUT.json`.

SPEC holds {"config", "target", "drafts", "draft_model", "workload", "kv_cache_space", "dtype",
"enable_prefix_caching", "bias_source", "speculation", "draft_dtype", "profile"} (profile: a
folder for `profile.py`'s output, or null; enable_prefix_caching: null for vLLM's default).
The runner starts the config's engine, warms it up, then for each concurrency C keeps C
requests in flight until the level's requests are done (closed loop), timing every output
token and sampling the process tree's peak RSS. `epispec` also streams `eu_prompts` prompts once more,
untimed, and records every token's (bias, variance, eu) for `eu_error.py`.

    vllm-target-alone / vllm-draft-model   vLLM's AsyncLLM directly, DELTA streaming
    epispec / reference                    our Engine interface (`build_engine`)
"""

from __future__ import annotations

import asyncio
import cProfile
import json
import os
import sys
import time
import zlib
from collections.abc import Awaitable, Callable
from pathlib import Path

from measure.bench.measure import PeakRss, RequestTiming, latency_summary, now
from measure.bench.workload import Workload, fit_prompt, prompt_budget
from server.engine.models import max_model_len

CONFIGS = ("vllm-target-alone", "vllm-draft-model", "epispec", "reference")
WARMUP_TOKENS = 4

# submit(request_id, prompt_ids, max_tokens) -> (timing, counters)
Submit = Callable[..., Awaitable[tuple[RequestTiming, dict]]]  # (rid, ids, max_tokens, T)


async def run_level(
    submit: Submit,
    prompts: list[list[int]],
    concurrency: int,
    max_tokens: int,
    tag: str,
    temperature: float = 0.0,
) -> tuple[list[RequestTiming], dict, float]:
    """All prompts with at most `concurrency` in flight, sampled at `temperature` (`submit` says
    whether each request is seeded). Returns timings, summed counters, wall s."""
    sem = asyncio.Semaphore(concurrency)
    totals: dict[str, int] = {}

    async def one(i: int, ids: list[int]) -> RequestTiming:
        async with sem:
            timing, counters = await submit(f"{tag}-{i}", ids, max_tokens, temperature)
        for key, v in counters.items():
            totals[key] = totals.get(key, 0) + v
        return timing

    t0 = now()
    timings = await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts)))
    return list(timings), totals, now() - t0


def request_seed(rid: str, seeded: bool = True) -> int | None:
    """A fixed seed per request id, so a sampled (T > 0) run is reproducible (None: unseeded)."""
    return zlib.crc32(rid.encode()) if seeded else None


def level_row(
    config: str,
    concurrency: int,
    timings,
    counters: dict,
    wall_s: float,
    peak_rss: int,
    k: int,
    temperature: float = 0.0,
) -> dict:
    """One `runs` entry. Counters: proposed, accepted, draft_passes, rounds (verification steps)."""
    row = {
        "config": config,
        "temperature": temperature,
        "concurrency": concurrency,
        **latency_summary(timings, wall_s),
    }
    tokens = row["output_tokens"] or 1
    proposed = counters.get("proposed", 0)
    row["acceptance_rate"] = counters["accepted"] / proposed if proposed else None
    row["draft_passes_per_token"] = counters.get("draft_passes", 0) / tokens
    # what speculation itself needs: k draft steps per verification round that proposed
    row["spec_draft_passes_per_token"] = k * counters.get("spec_rounds", 0) / tokens
    row["target_passes_per_token"] = counters["rounds"] / tokens if "rounds" in counters else None
    # engine-measured time computing bias/variance/eu (epispec, reference)
    row["eu_ms_per_token"] = 1000 * counters["eu_seconds"] / tokens if "eu_seconds" in counters else None
    # tokens proposed per request and verification step, and the share of tokens with an eu
    rounds = counters.get("rounds")
    row["proposed_per_row_step"] = proposed / rounds if rounds and "tokens" in counters else None
    row["eu_share"] = counters["uncertain_tokens"] / counters["tokens"] if counters.get("tokens") else None
    row["peak_rss_bytes"] = peak_rss
    return row


def draft_kv_row(engine) -> dict:
    """The drafts' KV cache at its largest during the level: bytes per request holding a slot,
    and those bytes over (tokens held × bytes per token), the block rounding's overhead."""
    held, tokens, live = engine.draft_kv_peak()
    per_token = getattr(engine, "draft_kv_bytes_per_token", 0)
    return {
        "draft_kv_bytes_per_request": held / live if live else None,
        "draft_kv_over_tokens_held": held / (tokens * per_token) if tokens and per_token else None,
    }


# --- vLLM directly: (a) and (b)


class _SpecCounter:
    """A vLLM stat logger that sums the spec-decode counters (drafts, draft/accepted tokens)."""

    def __init__(self, totals: dict) -> None:
        self.totals = totals

    def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx=0):
        spec = getattr(scheduler_stats, "spec_decoding_stats", None)
        if spec is not None:
            self.totals["spec_rounds"] += spec.num_drafts
            self.totals["proposed"] += spec.num_draft_tokens
            self.totals["accepted"] += spec.num_accepted_tokens

    def log_engine_initialized(self):
        pass

    def log(self):
        pass

    def record_sleep_state(self, *args):
        pass


def start_vllm(spec: dict, totals: dict):
    from vllm.engine.arg_utils import AsyncEngineArgs
    from vllm.v1.engine.async_llm import AsyncLLM

    w: Workload = spec["workload"]
    kw = dict(
        model=spec["target"],
        tokenizer=spec["target"],
        max_num_seqs=max(w.concurrencies),
        disable_log_stats=True,
    )
    if spec.get("dtype"):
        kw["dtype"] = spec["dtype"]
    if spec.get("enable_prefix_caching") is not None:
        kw["enable_prefix_caching"] = spec["enable_prefix_caching"]
    if spec["config"] == "vllm-draft-model":
        kw["speculative_config"] = {
            "method": "draft_model",
            "model": spec["draft_model"],
            "num_speculative_tokens": w.num_speculative_tokens,
        }
    return AsyncLLM.from_engine_args(
        AsyncEngineArgs(**kw), stat_loggers=[lambda cfg, idx: _SpecCounter(totals)]
    )


def vllm_submit(llm, totals: dict, k: int, seeded: bool = True) -> Submit:
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    async def submit(rid: str, ids: list[int], max_tokens: int, temperature: float = 0.0):
        params = SamplingParams(
            max_tokens=max_tokens,
            temperature=temperature,
            seed=request_seed(rid, seeded),
            ignore_eos=True,
            output_kind=RequestOutputKind.DELTA,
        )
        t = RequestTiming(now())
        async for out in llm.generate({"prompt_token_ids": ids}, params, rid):
            n = len(out.outputs[0].token_ids)
            if n:
                t.add(n, now())
        return t, {}

    return submit


# --- our Engine interface: (c) and (d)


def start_engine(spec: dict):
    from server.engine.factory import EngineArgs, build_engine

    w: Workload = spec["workload"]
    if spec.get("profile") and spec["config"] == "epispec":
        from measure.bench import profile
        from server.engine import vllm_engine

        os.environ[profile.PROFILE_DIR_ENV] = spec["profile"]  # read by the worker's proposer
        vllm_engine.PROPOSER_CLASS = profile.PROPOSER
    extra = {key: spec[key] for key in ("bias_source", "speculation", "draft_dtype") if spec.get(key)}
    return build_engine(
        EngineArgs(
            **extra,
            target=spec["target"],
            drafts=list(spec["drafts"]),
            engine="vllm" if spec["config"] == "epispec" else "reference",
            num_speculative_tokens=w.num_speculative_tokens,
            target_logprobs=w.target_logprobs,
            device="cpu",
            vllm_args={
                "max_num_seqs": max(w.concurrencies),
                **({"dtype": spec["dtype"]} if spec.get("dtype") else {}),
                **(
                    {"enable_prefix_caching": spec["enable_prefix_caching"]}
                    if spec.get("enable_prefix_caching") is not None
                    else {}
                ),
            },
        )
    )


async def engine_request(
    engine,
    rid: str,
    ids: list[int],
    max_tokens: int,
    temperature: float = 0.0,
    events: list | None = None,
    seeded: bool = True,
):
    """One request through `Engine.generate`: timing, counters, and (optionally) its events."""
    from server.engine.types import Finished, SamplingParams

    params = SamplingParams(
        max_tokens=max_tokens, temperature=temperature, seed=request_seed(rid, seeded), ignore_eos=True
    )
    t = RequestTiming(now())
    counters: dict = {}
    completion = uncertain = 0  # emitted tokens, and those that came with their eu
    async for item in engine.generate(rid, ids, params):
        if isinstance(item, Finished):
            if item.error:
                raise RuntimeError(f"request {rid} failed: {item.error}")
            s = item.stats
            counters = {
                "rounds": s.target_forward_passes,
                "draft_passes": s.draft_forward_passes,
                "proposed": s.proposed,
                "accepted": s.accepted,
                "spec_rounds": s.target_forward_passes if s.proposed else 0,
                "eu_seconds": s.eu_seconds,
                "tokens": completion,
                "uncertain_tokens": uncertain,
            }
        else:
            t.add(1, now())
            completion += 1
            uncertain += item.eu is not None
            if events is not None:
                events.append(item)
    return t, counters


def engine_submit(engine, seeded: bool = True) -> Submit:
    return lambda rid, ids, max_tokens, temperature=0.0: engine_request(
        engine, rid, ids, max_tokens, temperature, seeded=seeded
    )


async def collect_eu(engine, prompts: list[list[int]], max_tokens: int) -> list[dict]:
    """Every token's (bias, variance, eu) for the first prompts, streamed untimed, 8 at a time."""
    sem = asyncio.Semaphore(8)

    async def one(i: int, ids: list[int]) -> dict:
        events: list = []
        async with sem:
            await engine_request(engine, f"eu-{i}", ids, max_tokens, events=events)
        return {
            "prompt_ids": ids,
            "tokens": [e.token_id for e in events],
            "bias": [e.bias for e in events],
            "variance": [e.variance for e in events],
            "eu": [e.eu for e in events],
        }

    return list(await asyncio.gather(*(one(i, ids) for i, ids in enumerate(prompts))))


# --- the runner


async def run_config(spec: dict) -> dict:
    from transformers import AutoTokenizer

    config, w = spec["config"], spec["workload"]
    tok = AutoTokenizer.from_pretrained(spec["target"])
    budget = prompt_budget(max_model_len(spec["target"]), w.max_tokens, w.num_speculative_tokens)

    def encode(text: str) -> list[int]:
        if w.chat:
            text = tok.apply_chat_template(
                [{"role": "user", "content": text}], add_generation_prompt=True, tokenize=False
            )
            return fit_prompt(tok(text, add_special_tokens=False)["input_ids"], budget)
        return fit_prompt(tok(text, add_special_tokens=True)["input_ids"], budget)

    totals = {"spec_rounds": 0, "proposed": 0, "accepted": 0}
    t0 = time.perf_counter()
    with PeakRss() as rss:
        if config.startswith("vllm-"):
            llm = start_vllm(spec, totals)
            submit, close = vllm_submit(llm, totals, w.num_speculative_tokens, w.seeded), llm.shutdown
        else:
            engine = start_engine(spec)
            submit = engine_submit(engine, w.seeded)
            close = None
        startup_s = time.perf_counter() - t0
        startup_rss = rss.peak
        # warm-up: one wave at the largest concurrency, a few tokens each
        warm = [encode(p) for p in w.prompts[: max(w.concurrencies)]]
        await run_level(submit, warm, max(w.concurrencies), WARMUP_TOKENS, "warmup")
        runs = []
        prof = cProfile.Profile() if spec.get("profile") else None
        for temperature, c in [(t, c) for t in w.temperatures for c in w.concurrencies]:
            prompts = [encode(p) for p in w.level_prompts(c)]
            before = dict(totals)
            rss.reset()
            if config == "epispec":
                engine.draft_kv_peak(reset=True)  # the level's own peak
            if prof:
                prof.enable()
            timings, counters, wall = await run_level(
                submit, prompts, c, w.max_tokens, f"t{temperature}-c{c}", temperature
            )
            if prof:
                prof.disable()
            if config.startswith("vllm-"):
                await asyncio.sleep(0.3)  # the last step's stats trail its outputs
                counters = {key: totals[key] - before[key] for key in totals}
                counters["draft_passes"] = w.num_speculative_tokens * counters["spec_rounds"]
            runs.append(
                level_row(config, c, timings, counters, wall, rss.peak, w.num_speculative_tokens, temperature)
            )
            if config == "epispec":
                runs[-1].update(draft_kv_row(engine))
            print(
                f"[{config}] T={temperature} c={c}: {runs[-1]['output_tokens_per_s']:.1f} tok/s",
                file=sys.stderr,
            )
        if prof:
            from measure.bench import profile

            await asyncio.sleep(2 * profile.DUMP_EVERY_S)
            await submit("profile-flush", warm[0], WARMUP_TOKENS)  # triggers the proposer's dump
            await asyncio.sleep(2 * profile.DUMP_EVERY_S)
            profile.save(prof, Path(spec["profile"]), f"{config}-api", {"levels": runs})
        eu_tokens = []
        if config == "epispec" and w.eu_prompts:
            eu_tokens = await collect_eu(engine, [encode(p) for p in w.prompts[: w.eu_prompts]], w.max_tokens)
        if close is not None:
            close()
        else:
            await engine.shutdown()
    return {
        "config": config,
        "startup_s": startup_s,
        "startup_peak_rss_bytes": startup_rss,
        "runs": runs,
        "eu_tokens": eu_tokens,
    }


def main(argv: list[str]) -> int:
    spec_path, out_path = argv
    spec = json.loads(Path(spec_path).read_text())
    spec["workload"] = Workload.from_dict(spec["workload"])
    if spec.get("kv_cache_space"):  # vLLM-CPU reads its KV cache size from the environment
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec["kv_cache_space"])
    if spec.get("threads"):
        import torch

        torch.set_num_threads(int(spec["threads"]))
    result = asyncio.run(run_config(spec))
    Path(out_path).write_text(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
