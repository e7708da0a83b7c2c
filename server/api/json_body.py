"""Every POST body is read as JSON, whatever its content-type says, and an empty one as `{}`.

curl's `-d` sends `application/x-www-form-urlencoded`, some clients `text/plain` or no
content-type at all; every route here takes JSON, so the declared type is replaced before
FastAPI reads the body (which it would otherwise hand over as raw bytes, failing with an error
that names no field). An empty body becomes `{}`, so the error names the fields it lacks.
"""

from __future__ import annotations

from starlette.types import ASGIApp, Message, Receive, Scope, Send

JSON = (b"content-type", b"application/json")


class JsonBody:
    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            await self.app(scope, receive, send)
            return
        headers = [(k, v) for k, v in scope["headers"] if k.lower() != JSON[0]]
        first = True

        async def receive_json() -> Message:
            nonlocal first
            message = await receive()
            if first and message["type"] == "http.request":
                first = False
                if not message.get("body") and not message.get("more_body", False):
                    return {**message, "body": b"{}"}
            return message

        await self.app({**scope, "headers": [*headers, JSON]}, receive_json, send)
