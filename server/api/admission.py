"""Overload protection: a bounded number of generation requests in the server at once.

Every generation request (`POST /generate`, `/v1/completions`, `/v1/chat/completions`) holds
one place from the moment it arrives until its response has ended (streamed to the last byte,
refused with a 4xx, or cut by a client that left): running in the engine or queued for it.
With `max_pending_requests` places taken, a new one is refused at once with 429 and a
`Retry-After` header instead of waiting behind an ever longer queue, and counted as
`epispec_requests_total{status="overloaded"}`. While the server drains for a graceful
shutdown (`app.state.draining`), new generation requests get 503 with `Retry-After` (another
replica can take them). Other routes (probes, metrics) are never refused. An ASGI
middleware: places are freed in a `finally`, whatever ends the request.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError
from server.metrics import Metrics

GENERATION_PATHS = frozenset({"/generate", "/v1/completions", "/v1/chat/completions"})


class AdmissionLimit:
    def __init__(
        self, app: ASGIApp, max_pending: int, retry_after_s: int, metrics: Metrics | None = None
    ) -> None:
        self.app = app
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self.metrics = metrics
        self.pending = 0  # one event loop: no lock needed

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"] not in GENERATION_PATHS:
            await self.app(scope, receive, send)
            return
        app = scope.get("app")
        if app is not None and getattr(app.state, "draining", False):
            await self._refuse(scope, receive, send, draining=True)
            return
        if self.pending >= self.max_pending:
            await self._refuse(scope, receive, send)
            return
        self.pending += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.pending -= 1

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, draining: bool = False) -> None:
        if draining:
            status = "shutting_down"
            err = APIError(
                "The server is shutting down; retry on another replica or later.",
                status_code=503,
                type="server_error",
                code="shutting_down",
            )
        else:
            status = "overloaded"
            err = APIError(
                f"The server is at capacity ({self.max_pending} requests in progress); "
                f"retry after {self.retry_after_s} s.",
                status_code=429,
                type="server_error",
                code="overloaded",
            )
        if self.metrics is not None:
            self.metrics.observe_request(scope["path"], status)
        await err.response({"Retry-After": str(self.retry_after_s)})(scope, receive, send)
