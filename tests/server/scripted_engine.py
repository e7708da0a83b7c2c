"""A scripted engine for tests of the API layer around an engine: emits a few token events,
then fails or finishes as told; with a `gate` it holds every stream after its first token
until the gate opens (to keep requests in flight on purpose)."""

from __future__ import annotations

import asyncio
import threading

from server.engine.types import EngineStats, Finished, TokenEvent


class ScriptedEngine:
    """Emits `n_tokens` token events, then fails (raises) or finishes as scripted."""

    name, model_name, max_model_len, num_drafts = "scripted", "scripted", 64, 3

    def __init__(self, tokenizer, n_tokens: int = 3, fail: str | None = None,
                 gate: threading.Event | None = None) -> None:
        self._tokenizer, self.n_tokens, self.fail, self.gate = tokenizer, n_tokens, fail, gate
        self.healthy = True
        self.running = 0
        self.aborted: set[str] = set()

    @property
    def tokenizer(self):
        return self._tokenizer

    async def generate(self, request_id, prompt_token_ids, params):
        self.running += 1
        try:
            for i in range(self.n_tokens):
                yield TokenEvent(token_id=5 + i, text=f"t{i} ", logprob=-0.5, bias=0.1 * i,
                                 variance=0.2, eu=0.1 * i + 0.2, flagged=i == 2)
                while self.gate is not None and not self.gate.is_set() and request_id not in self.aborted:
                    await asyncio.sleep(0.01)
            if self.fail == "raise":
                raise RuntimeError("device lost")
            if self.fail == "finish":
                yield Finished("error", len(prompt_token_ids), self.n_tokens, EngineStats(),
                               error="out of memory")
                return
            yield Finished("length", len(prompt_token_ids), self.n_tokens, EngineStats())
        finally:
            self.running -= 1

    async def abort(self, request_id):
        self.aborted.add(request_id)

    def num_running(self):
        return self.running

    def is_healthy(self):
        return self.healthy

    async def shutdown(self):
        pass
