"""OpenAI-shaped errors: `{"error": {"message", "type", "param", "code"}}` for every failure.

Client mistakes are 4xx that name the offending field in `param` (dotted, with list indices:
`messages[0].role`); a 500 is only ever a server fault, and says no more than the exception's
type (the traceback goes to the server's log, never into a response). Once a stream has
started, the same body travels inside the stream as one `data:` event (see `sse.py`).
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.engine.types import Finished

log = logging.getLogger(__name__)


class ErrorResponse(JSONResponse):
    """JSON with non-ASCII escaped: an error message may quote client text, lone surrogates included."""

    def render(self, content) -> bytes:
        return json.dumps(content, ensure_ascii=True, allow_nan=False, separators=(",", ":")).encode()


class APIError(Exception):
    """An error to return to the client as is."""

    def __init__(
        self,
        message: str,
        *,
        status_code: int = 400,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status_code = status_code
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self, headers: dict[str, str] | None = None) -> JSONResponse:
        """The error as a response, for middleware that answers before the routes."""
        return ErrorResponse(self.body(), status_code=self.status_code, headers=headers)


_TYPE_TAGS = frozenset({"str", "int", "float", "bool", "list", "dict", "none"})


def param_name(loc: tuple | list) -> str | None:
    """('body', 'messages', 0, 'content', 'list[TextPart]', 0, 'type') -> 'messages[0].content[0].type':
    list indices in brackets, pydantic's union-member and validator tags dropped."""
    out = ""
    for part in loc[1:] if loc and loc[0] in ("body", "query", "path", "header") else loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif not ("[" in part or "-" in part or part in _TYPE_TAGS):
            out += f".{part}" if out else str(part)
    return out or None


def from_validation(exc: RequestValidationError) -> APIError:
    """The most specific error (deepest location: of a union, the member that came closest)."""
    errors = exc.errors()
    err = max(errors, key=lambda e: len(e.get("loc", ())))
    if err.get("type") == "json_invalid":
        return APIError(
            f"The request body is not valid JSON: {err.get('ctx', {}).get('error', '')}".rstrip(": "),
            code="invalid_json",
        )
    param = param_name(err.get("loc", ()))
    if param is None and tuple(err.get("loc", ())) == ("body",):  # `null`, a list, a string...
        return APIError("The request body must be a JSON object.", code="invalid_body")
    if err.get("type") == "missing" and param:
        return APIError(f"'{param}' is required.", param=param, code="missing_field")
    msg = err.get("msg", "invalid value").removeprefix("Value error, ")
    return APIError(f"Invalid '{param}': {msg}." if param else f"{msg}.", param=param, code="invalid_value")


def _count_rejected(request: Request, status_code: int) -> None:
    route = request.scope.get("route")
    metrics = getattr(request.app.state, "metrics", None)
    if route is not None and metrics is not None and 400 <= status_code < 500:
        metrics.requests.labels(endpoint=getattr(route, "path", "?"), status="rejected").inc()


def error_response(request: Request, err: APIError, headers: dict[str, str] | None = None) -> JSONResponse:
    _count_rejected(request, err.status_code)
    return err.response(headers)


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return error_response(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        return error_response(request, from_validation(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        err = APIError(str(exc.detail), status_code=exc.status_code, type=kind)
        return error_response(request, err, exc.headers)  # a 405's Allow header, for one

    @app.exception_handler(Exception)
    async def _server(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = APIError(f"Internal server error: {type(exc).__name__}.", status_code=500, type="server_error")
        return error_response(request, err)


def engine_failure(fin: Finished) -> APIError:
    return APIError(
        f"Generation failed: {fin.error or 'engine error'}.",
        status_code=500,
        type="server_error",
        code="engine_error",
    )
