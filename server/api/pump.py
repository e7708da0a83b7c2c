"""The request pump: the one place where token events pass from the engine to the client, for
every endpoint.

`Generations.run(endpoint, prompt_ids, params)` streams the engine's `TokenEvent`s and its
final `Finished`. The engine's iterator is consumed by a task of its own and handed over
through a queue, so a client that goes away (the response task is cancelled or closed) never
interrupts the engine mid-step: the request is aborted in the engine and its iterator is
closed between items, which frees its state (`engine.num_running()` returns to 0). Metrics are
recorded here, as items pass. Also here: `until_disconnected`, the same for a non-streamed
response, and request ids.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator, Awaitable
from typing import TypeVar

from fastapi import Request, Response

from server.api.errors import APIError
from server.engine.types import (
    Engine,
    EngineStats,
    Finished,
    GenerationItem,
    InvalidRequest,
    SamplingParams,
)
from server.metrics import Metrics

T = TypeVar("T")


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
            raise APIError(f"{text[:1].upper()}{text[1:]}.", param=exc.param, code="invalid_value") from exc
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
