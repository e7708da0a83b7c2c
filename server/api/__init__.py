"""The HTTP API: routes, request schemas, OpenAI-shaped errors, SSE framing.

Every generation passes through `pump.Generations.run`, the one place where token
events flow from the engine to the client (and where metrics are recorded).
"""

from __future__ import annotations

from fastapi import APIRouter

from server.api import generate_api, openai_api, playground, system


def api_router() -> APIRouter:
    router = APIRouter()
    for part in (system, generate_api, openai_api, playground):
        router.include_router(part.router)
    return router
