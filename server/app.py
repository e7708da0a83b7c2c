"""The FastAPI application: `create_app(settings, engine=None)`.

The lifespan builds the one engine of this process from the settings (unless one is given,
as tests do), resolves the flag thresholds (settings, else the bundle's calibration, else
`DEFAULT_EU_THRESHOLD`) and the bundle's `p_wrong` fit (a given engine takes both from
`settings.bundle` when that is set), watches the engine's health, and shuts the engine down at exit.

Hooks on `app.state` for whoever runs the app (`server/commands/serve.py`):
`on_engine_dead()` is called once when the engine stops being healthy (serve exits non-zero
so a supervisor restarts it); `draining = True` while a graceful shutdown lets in-flight
requests finish (new generation requests get 503, `/ready` fails).
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.middleware.cors import CORSMiddleware

from server.api import api_router
from server.api.admission import AdmissionLimit
from server.api.auth import ApiKeyGuard
from server.api.context import ServerContext
from server.api.errors import install_error_handlers
from server.api.json_body import JsonBody
from server.api.limits import BodySizeLimit
from server.api.pump import Generations
from server.bundle import Bundle, load_bundle
from server.config import Settings
from server.engine.factory import EngineArgs, build_engine
from server.engine.types import Engine
from server.metrics import Metrics
from server.resolve import engine_args

log = logging.getLogger("epispec.server")

HEALTH_POLL_S = 0.5  # how often the lifespan checks that the engine is alive


def resolve_engine_args(settings: Settings) -> tuple[EngineArgs, Bundle | None]:
    """EngineArgs from the settings, through the same code as `epispec generate`'s flags
    (bundle resolution, vLLM passthrough). Raises BundleError when no model is found."""
    return engine_args(settings, settings.model_flags)


def create_app(settings: Settings, engine: Engine | None = None) -> FastAPI:
    metrics = Metrics()
    ctx = ServerContext(settings=settings, metrics=metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        own, bundle = engine, None
        if own is None:
            eargs, bundle = resolve_engine_args(settings)
            log.info("building the %s engine for %s", eargs.engine, eargs.target)
            own = build_engine(eargs)
        elif settings.bundle:  # a given engine that serves the settings' bundle: its calibration
            bundle = load_bundle(settings.bundle, prepare=False)
        ctx.thresholds = settings.thresholds(
            bundle.thresholds if bundle else None, bundle.p_error if bundle else None
        )
        ctx.p_wrong = bundle.p_wrong if bundle else None
        ctx.eu_correction = bundle.eu_correction if bundle else None
        ctx.engine = own
        metrics.watch_engine(own)
        ctx.generations = Generations(own, metrics)
        log.info(
            "serving '%s' (%s engine, %d drafts, flag thresholds %s)",
            own.model_name,
            own.name,
            own.num_drafts,
            ctx.thresholds,
        )
        watchdog = asyncio.get_running_loop().create_task(_watch_engine(app, own))
        try:
            yield
        finally:
            watchdog.cancel()
            await ctx.generations.close()
            if engine is None:  # a given engine belongs to the caller
                await own.shutdown()

    app = FastAPI(title="epispec", version="0.1.0", lifespan=lifespan)
    app.state.ctx = ctx
    app.state.draining = False
    app.state.on_engine_dead = None
    app.state.metrics = metrics  # the registry's holder, also reachable as ctx.metrics
    install_error_handlers(app)
    app.include_router(api_router())
    app.add_middleware(JsonBody)  # innermost: the routes read every POST body as JSON
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_request_bytes)
    app.add_middleware(
        AdmissionLimit,
        max_pending=settings.max_pending_requests,
        retry_after_s=settings.retry_after_s,
        metrics=metrics,
    )
    key = settings.api_key.get_secret_value() if settings.api_key else None
    app.add_middleware(ApiKeyGuard, key=key)  # runs before everything above
    if settings.cors_origins:  # off unless configured; outermost, so preflights need no key
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )
    return app


async def _watch_engine(app: FastAPI, engine: Engine) -> None:
    """Wait for the engine to fail, then say so and call `app.state.on_engine_dead`."""
    while engine.is_healthy():
        await asyncio.sleep(HEALTH_POLL_S)
    log.error("the %s engine has died: /health fails, new requests get 503", engine.name)
    if app.state.on_engine_dead is not None:
        app.state.on_engine_dead()
