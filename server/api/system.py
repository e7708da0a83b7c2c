"""Probes and descriptions: `/health` (liveness, never behind the API key), `/ready`,
`/metrics` (Prometheus text), `/v1/models` and `/v1/models/{id}`."""

from __future__ import annotations

import time
from dataclasses import asdict

from fastapi import APIRouter, Depends, Request
from fastapi.responses import JSONResponse, Response

from server.api.context import ServerContext, check_model, ready_context

router = APIRouter()


@router.get("/health")
async def health(request: Request) -> JSONResponse:
    """200 while the engine lives (or is still loading); 503 once it has failed."""
    engine = request.app.state.ctx.engine
    if engine is not None and not engine.is_healthy():
        return JSONResponse({"status": "unhealthy"}, status_code=503)
    return JSONResponse({"status": "ok" if engine is not None else "loading"})


@router.get("/ready")
async def ready(request: Request) -> JSONResponse:
    """200 once the engine is built and healthy: the server can generate (with its default
    flag thresholds, which the playground marks on its colour scale)."""
    engine = request.app.state.ctx.engine
    if engine is None or not engine.is_healthy() or getattr(request.app.state, "draining", False):
        return JSONResponse({"status": "not ready"}, status_code=503)
    return JSONResponse(
        {
            "status": "ready",
            "model": engine.model_name,
            "engine": engine.name,
            "num_drafts": engine.num_drafts,
            "max_model_len": engine.max_model_len,
            "running": engine.num_running(),
            "thresholds": asdict(request.app.state.ctx.thresholds),
        }
    )


@router.get("/metrics")
async def metrics(request: Request) -> Response:
    m = request.app.state.ctx.metrics
    return Response(m.render(), media_type=m.content_type)


def model_card(ctx: ServerContext) -> dict:
    e = ctx.engine
    return {
        "id": e.model_name,
        "object": "model",
        "created": int(time.time()),
        "owned_by": "epispec",
        "max_model_len": e.max_model_len,
        "engine": e.name,
        "num_drafts": e.num_drafts,
    }


@router.get("/v1/models")
async def models(ctx: ServerContext = Depends(ready_context)) -> dict:
    return {"object": "list", "data": [model_card(ctx)]}


@router.get("/v1/models/{model_id:path}")  # ids may hold a slash (org/name)
async def model(model_id: str, ctx: ServerContext = Depends(ready_context)) -> dict:
    check_model(ctx, model_id)
    return model_card(ctx)
