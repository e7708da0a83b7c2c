"""The one place where token events pass from the engine to the client, for every endpoint.

`Generations.run(endpoint, prompt_ids, params)` streams the engine's `TokenEvent`s and its
final `Finished`. The engine's iterator is consumed by a task of its own and handed over
through a queue, so a client that goes away (the response task is cancelled or closed) never
interrupts the engine mid-step: the request is aborted in the engine and its iterator is
closed between items, which frees its state (`engine.num_running()` returns to 0).

Also here: the checks that need the engine or the settings (prompt length against the
context, `max_tokens`, top log-probs, threshold bounds) and the response-level summary.
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import AsyncIterator, Awaitable
from dataclasses import dataclass, field
from typing import TypeVar

from fastapi import Request, Response

from server.api.errors import APIError
from server.api.schemas import SamplingFields
from server.config import Settings
from server.engine.types import (
    Engine,
    EngineStats,
    Finished,
    FlagThresholds,
    GenerationItem,
    InvalidRequest,
    SamplingParams,
    TokenEvent,
)
from server.metrics import Metrics

T = TypeVar("T")


@dataclass
class ServerContext:
    """What the routes need, held on `app.state.ctx`; `engine` is None until the lifespan built it."""

    settings: Settings
    metrics: Metrics
    thresholds: FlagThresholds = field(default_factory=FlagThresholds)
    engine: Engine | None = None
    generations: Generations | None = None


class Generations:
    def __init__(self, engine: Engine, metrics: Metrics) -> None:
        self.engine = engine
        self.metrics = metrics
        metrics.model_name = engine.model_name  # the `model` label of every series
        self._tasks: set[asyncio.Task] = set()  # keeps producer and abort tasks alive

    def _spawn(self, coro) -> asyncio.Task:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    def run(
        self, endpoint: str, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationItem]:
        """The request's items. The engine validates it first, so a request it cannot run is a
        400 naming the field (APIError, raised here) before any response or engine state."""
        try:
            self.engine.validate(prompt_ids, params)
        except InvalidRequest as exc:
            text = str(exc).rstrip(".")
            raise APIError(f"{text[:1].upper()}{text[1:]}.", param=exc.param,
                           code="invalid_value") from exc
        return self._run(endpoint, request_id, prompt_ids, params)

    async def _run(
        self, endpoint: str, request_id: str, prompt_ids: list[int], params: SamplingParams
    ) -> AsyncIterator[GenerationItem]:
        """The metrics hook: sees every TokenEvent and the Finished of every request, and
        whether the client left early (recorded as status "abort")."""
        queue: asyncio.Queue[GenerationItem | None] = asyncio.Queue()
        gone = asyncio.Event()

        async def produce() -> None:
            items = self.engine.generate(request_id, prompt_ids, params)
            try:
                async for item in items:
                    if gone.is_set():
                        break
                    queue.put_nowait(item)
            except Exception as exc:  # the engine failed: end the stream with an error
                logging.getLogger(__name__).exception("request %s: the engine failed", request_id)
                message = type(exc).__name__  # the details stay in the server's log
                queue.put_nowait(Finished("error", len(prompt_ids), 0, EngineStats(), error=message))
            finally:
                await items.aclose()
                queue.put_nowait(None)

        tracker = self.metrics.start_request(endpoint, len(prompt_ids))
        self._spawn(produce())
        status = "abort"
        try:
            while (item := await queue.get()) is not None:
                tracker.observe(item)
                if isinstance(item, Finished):
                    status = item.finish_reason
                yield item
                if isinstance(item, Finished):
                    return
            status = "error"
            yield Finished("error", len(prompt_ids), 0, EngineStats(), error="engine stream ended early")
        finally:
            if status == "abort":
                gone.set()
                self._spawn(self.engine.abort(request_id))
            tracker.close(status)

    async def close(self) -> None:
        for task in list(self._tasks):
            task.cancel()


async def until_disconnected(request: Request, collect: Awaitable[T]) -> T | Response:
    """Await a non-streamed response's `collect` unless the client disconnects first; then
    cancel it, which closes the request's items and so aborts it in the engine (status
    "abort"). Streams need no watch: their response task is cancelled on disconnect."""
    work = asyncio.ensure_future(collect)
    watch = asyncio.ensure_future(_disconnect(request))
    try:
        await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not work.done():
            work.cancel()
    if not work.cancelled():
        return work.result()
    return Response(status_code=499)  # nginx's "client closed request": nobody reads it


async def _disconnect(request: Request) -> None:
    """Returns once the client has gone (the body was already read, so `receive` waits)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


# --- checks that need the engine or the settings


def effective_max_tokens(
    ctx: ServerContext, prompt_ids: list[int], max_tokens: int | None, prompt_param: str,
    default: int | None = None,
) -> int:
    """max_tokens to use (when the request gives none: `default`, else the server's
    `default_max_tokens`), or a 400 naming the prompt or max_tokens."""
    engine = ctx.engine
    limit = engine.max_model_len
    if not prompt_ids:
        raise APIError(f"'{prompt_param}' must not be empty.", param=prompt_param, code="empty_prompt")
    if any(not 0 <= t < len(engine.tokenizer) for t in prompt_ids):
        raise APIError(f"'{prompt_param}' holds token ids outside the vocabulary.",
                       param=prompt_param, code="invalid_token_id")
    room = limit - len(prompt_ids)
    if room < 1:
        raise APIError(
            f"The prompt is {len(prompt_ids)} tokens long; this model accepts at most {limit} "
            f"tokens in all, so the prompt must be shorter than {limit}.",
            param=prompt_param, code="context_length_exceeded",
        )
    if max_tokens is None:
        return min(default or ctx.settings.default_max_tokens, room)
    if max_tokens > room:
        raise APIError(
            f"max_tokens is {max_tokens}, but with a prompt of {len(prompt_ids)} tokens this model "
            f"({limit} tokens in all) can generate at most {room}.",
            param="max_tokens", code="context_length_exceeded",
        )
    return max_tokens


def check_top_logprobs(ctx: ServerContext, n: int, param: str) -> int:
    if n > ctx.settings.max_logprobs:
        raise APIError(f"'{param}' is {n}; this server returns at most {ctx.settings.max_logprobs}.",
                       param=param, code="too_many_logprobs")
    return n


def thresholds_for(ctx: ServerContext, req: SamplingFields) -> FlagThresholds:
    base = ctx.thresholds
    if req.thresholds is None:
        return base
    lo, hi = ctx.settings.min_threshold, ctx.settings.max_threshold
    values = {}
    for name in ("eu", "bias", "variance"):
        v = getattr(req.thresholds, name)
        if v is not None and not (lo <= v <= hi):
            raise APIError(f"'thresholds.{name}' must lie within [{lo}, {hi}], got {v}.",
                           param=f"thresholds.{name}", code="threshold_out_of_bounds")
        values[name] = getattr(base, name) if v is None else v
    return FlagThresholds(**values)


def sampling_params(
    ctx: ServerContext, req: SamplingFields, max_tokens: int, logprobs: int = 0
) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=1.0 if req.temperature is None else req.temperature,
        top_p=1.0 if req.top_p is None else req.top_p,
        seed=req.seed,
        stop=req.stop_strings(),
        logprobs=logprobs,
        thresholds=thresholds_for(ctx, req),
        stop_on_uncertainty=req.stop_on_uncertainty,
        ignore_eos=req.ignore_eos,
    )


# --- response fields shared by the endpoints


def number(x: float | None) -> float | None:
    """JSON has no inf/nan: those become null."""
    return x if x is None or math.isfinite(x) else None


@dataclass
class Summary:
    """Response-level uncertainty: mean and max eu over tokens, flagged tokens."""

    num_tokens: int = 0
    eu_sum: float = 0.0
    eu_count: int = 0
    max_eu: float | None = None
    num_flagged: int = 0

    def add(self, ev: TokenEvent) -> None:
        self.num_tokens += 1
        self.num_flagged += ev.flagged
        if ev.eu is not None and math.isfinite(ev.eu):
            self.eu_sum += ev.eu
            self.eu_count += 1
            self.max_eu = ev.eu if self.max_eu is None else max(self.max_eu, ev.eu)

    def as_dict(self) -> dict:
        return {
            "mean_eu": self.eu_sum / self.eu_count if self.eu_count else None,
            "max_eu": self.max_eu,
            "num_tokens": self.num_tokens,
            "num_flagged": self.num_flagged,
            "flagged": self.num_flagged > 0,
        }


def usage(fin: Finished) -> dict:
    return {
        "prompt_tokens": fin.prompt_tokens,
        "completion_tokens": fin.completion_tokens,
        "total_tokens": fin.prompt_tokens + fin.completion_tokens,
    }


def engine_failure(fin: Finished) -> APIError:
    return APIError(f"Generation failed: {fin.error or 'engine error'}.", status_code=500,
                    type="server_error", code="engine_error")
