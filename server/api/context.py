"""The server context (what the routes need, on `app.state.ctx`), the route dependency that
returns it once the engine is up, and the model check."""

from __future__ import annotations

from dataclasses import dataclass, field

from fastapi import Request

from server.api.errors import APIError
from server.api.pump import Generations
from server.bundle import EuCorrection, PWrongFit
from server.config import Settings
from server.engine.types import Engine, FlagThresholds
from server.metrics import Metrics


@dataclass
class ServerContext:
    """What the routes need, held on `app.state.ctx`; `engine` is None until the lifespan built it."""

    settings: Settings
    metrics: Metrics
    thresholds: FlagThresholds = field(default_factory=FlagThresholds)
    p_wrong: PWrongFit | None = None  # the bundle's fit; None: summaries carry no p_wrong
    eu_correction: EuCorrection | None = None  # the bundle's; None: tokens carry no eu_corrected
    engine: Engine | None = None
    generations: Generations | None = None


def ready_context(request: Request) -> ServerContext:
    """The context of a server that can generate, else a 503."""
    ctx: ServerContext = request.app.state.ctx
    if ctx.engine is None or ctx.generations is None:
        raise APIError(
            "The model is still loading; retry shortly.",
            status_code=503,
            type="server_error",
            code="not_ready",
        )
    if not ctx.engine.is_healthy():
        raise APIError(
            "The engine has failed; this server cannot generate.",
            status_code=503,
            type="server_error",
            code="engine_dead",
        )
    return ctx


def check_model(ctx: ServerContext, model: str | None) -> None:
    if model is not None and model != ctx.engine.model_name:
        raise APIError(
            f"The model '{model}' does not exist; this server serves '{ctx.engine.model_name}'.",
            status_code=404,
            param="model",
            code="model_not_found",
        )
