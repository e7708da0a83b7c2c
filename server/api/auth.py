"""Optional bearer API key: every path but `/health` and the playground page (`/`,
`/playground`: static, no data) requires `Authorization: Bearer KEY` when the server has one.
Checked in front of everything else (before the body is read or parsed), compared in
constant time."""

from __future__ import annotations

import hmac

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Scope, Send

from server.api.errors import APIError

OPEN_PATHS = frozenset({"/health", "/", "/playground"})


def key_matches(authorization: str, key: str) -> bool:
    scheme, _, token = authorization.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(token.strip().encode(), key.encode())


class ApiKeyGuard:
    def __init__(self, app: ASGIApp, key: str | None) -> None:
        self.app = app
        self.key = key

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or self.key is None
            or scope["path"] in OPEN_PATHS
            or key_matches(Headers(scope=scope).get("authorization", ""), self.key)
        ):
            await self.app(scope, receive, send)
            return
        err = APIError(
            "Missing or invalid API key: send 'Authorization: Bearer <key>'.",
            status_code=401,
            type="authentication_error",
            code="invalid_api_key",
        )
        await err.response({"WWW-Authenticate": "Bearer"})(scope, receive, send)
