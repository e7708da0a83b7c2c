"""A real engine at a human pace, for tests that act mid-generation (leave, press Stop)."""

from __future__ import annotations

import asyncio

from server.engine.types import Finished


class Paced:
    """The given engine, pausing `delay` seconds before each token it streams. Everything
    else, validation, abort and the running count included, is the engine's own."""

    def __init__(self, engine, delay: float = 0.0) -> None:
        self.engine = engine
        self.delay = delay

    def __getattr__(self, name: str):
        return getattr(self.engine, name)

    async def generate(self, request_id, prompt_token_ids, params):
        items = self.engine.generate(request_id, prompt_token_ids, params)
        try:
            async for item in items:
                if self.delay and not isinstance(item, Finished):
                    await asyncio.sleep(self.delay)
                yield item
        finally:
            await items.aclose()
