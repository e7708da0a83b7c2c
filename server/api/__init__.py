"""The HTTP API: routes, request schemas, OpenAI-shaped errors, SSE framing.

Every generation passes through `generation.Generations.run`, the one place where token
events flow from the engine to the client (and where metrics are recorded).
"""

from __future__ import annotations

from fastapi import APIRouter, Depends

from server.api import generate, openai_api, system
from server.api.auth import require_api_key


def api_router() -> APIRouter:
    router = APIRouter()
    router.include_router(system.open_router)
    router.include_router(system.router)
    guarded = APIRouter(dependencies=[Depends(require_api_key)])
    guarded.include_router(generate.router)
    guarded.include_router(openai_api.router)
    router.include_router(guarded)
    return router
