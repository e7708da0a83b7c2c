"""Optional bearer API key: every route but `/health` requires `Authorization: Bearer KEY`
when the server has one. Compared in constant time."""

from __future__ import annotations

import hmac

from fastapi import Request

from server.api.errors import APIError


async def require_api_key(request: Request) -> None:
    key = request.app.state.ctx.settings.api_key
    if key is None:
        return
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    ok = scheme.lower() == "bearer" and hmac.compare_digest(
        token.strip().encode(), key.get_secret_value().encode()
    )
    if not ok:
        raise APIError("Missing or invalid API key: send 'Authorization: Bearer <key>'.",
                       status_code=401, type="authentication_error", code="invalid_api_key")
