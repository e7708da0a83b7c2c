"""A scripted engine for tests of the API layer around an engine: emits a few token events,
then fails or finishes as told; with a `gate` it holds every stream after each token until
the gate opens, with a `delay` it sleeps that long after each token (to keep requests in
flight on purpose). Once `healthy` is False, streams in flight fail like a dead engine's.

`python -m tests.server.scripted_engine --port P [--tokens N] [--delay S] [--die-after S]
[--shutdown-timeout S]` serves it through `epispec serve`'s own `serve_app` (signal and
exit-status handling included), for tests that need a real process."""

from __future__ import annotations

import argparse
import asyncio
import sys
import threading

from server.engine.types import EngineStats, Finished, TokenEvent


class ScriptedEngine:
    """Emits `n_tokens` token events, then fails (raises) or finishes as scripted."""

    name, model_name, max_model_len, num_drafts = "scripted", "scripted", 64, 3

    def __init__(
        self,
        tokenizer,
        n_tokens: int = 3,
        fail: str | None = None,
        gate: threading.Event | None = None,
        delay: float = 0.0,
    ) -> None:
        self._tokenizer, self.n_tokens, self.fail, self.gate = tokenizer, n_tokens, fail, gate
        self.delay = delay
        self.healthy = True
        self.running = 0
        self.aborted: set[str] = set()

    @property
    def tokenizer(self):
        return self._tokenizer

    def validate(self, prompt_token_ids, params) -> None:
        params.validate()

    async def generate(self, request_id, prompt_token_ids, params):
        self.running += 1
        try:
            for i in range(self.n_tokens):
                yield TokenEvent(
                    token_id=5 + i,
                    text=f"t{i} ",
                    logprob=-0.5,
                    bias=0.1 * i,
                    variance=0.2,
                    eu=0.1 * i + 0.2,
                    flagged=i == 2,
                )
                while self.gate is not None and not self.gate.is_set() and request_id not in self.aborted:
                    await asyncio.sleep(0.01)
                await asyncio.sleep(self.delay)
                if not self.healthy:
                    raise RuntimeError("EngineDeadError: the engine process died")
                if request_id in self.aborted:
                    yield Finished("abort", len(prompt_token_ids), i + 1, EngineStats())
                    return
            if self.fail == "raise":
                raise RuntimeError("device lost")
            if self.fail == "finish":
                yield Finished(
                    "error", len(prompt_token_ids), self.n_tokens, EngineStats(), error="out of memory"
                )
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


def main(argv: list[str]) -> int:
    from transformers import AutoTokenizer

    from server.app import create_app
    from server.commands.serve import serve_app
    from server.config import Settings

    p = argparse.ArgumentParser()
    p.add_argument("--tokenizer", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--tokens", type=int, default=3)
    p.add_argument("--delay", type=float, default=0.0)
    p.add_argument("--die-after", type=float, default=None)
    p.add_argument("--shutdown-timeout", type=float, default=30.0)
    a = p.parse_args(argv)
    engine = ScriptedEngine(AutoTokenizer.from_pretrained(a.tokenizer), n_tokens=a.tokens, delay=a.delay)
    engine.max_model_len = 4096
    if a.die_after is not None:
        threading.Timer(a.die_after, lambda: setattr(engine, "healthy", False)).start()
    settings = Settings(port=a.port, shutdown_timeout_s=a.shutdown_timeout, log_level="info")
    return serve_app(create_app(settings, engine), settings)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
