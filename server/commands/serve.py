"""`epispec serve`: the HTTP server (FastAPI under uvicorn), one engine per process.

Settings come from these flags, else `EPISPEC_*` environment variables, else a config file
(`--config FILE`), else defaults (`server/config.py`). With no model flags it serves the
bundle in `EPISPEC_BUNDLE` or the default bundle (`bundles/smollm2`).

Lifecycle (`serve_app`): SIGTERM or SIGINT stops accepting connections, marks the app as
draining (`/ready` 503, new generation requests 503), lets in-flight requests finish for up
to `shutdown_timeout_s` (then cancels them, which aborts them in the engine), shuts the
engine down and exits 0. If the engine dies, streams in flight end with an error event, new
requests get 503 and `/health` 503 for `ENGINE_DEAD_GRACE_S` (so probes see it), then the
server shuts down the same way and exits `EXIT_ENGINE_DEAD`, so that a supervisor restarts it.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
import sys

import uvicorn
from fastapi import FastAPI
from pydantic import ValidationError

from server.bundle import BundleError
from server.commands.model_args import add_model_arguments, add_threshold_arguments
from server.config import Settings
from server.engine.factory import EngineUnavailable

# command-line dest -> Settings field, where the names differ
_RENAMED = {"config": "config_file"}
EXIT_ENGINE_DEAD = 3
ENGINE_DEAD_GRACE_S = 3.0  # a dead engine's server answers 503s this long before it exits

log = logging.getLogger("epispec.server")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_threshold_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="port (default 8000)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (all routes but /health)")
    g.add_argument("--config", metavar="FILE", help="TOML or JSON settings file")
    g.add_argument("--max-request-bytes", type=int, help="larger request bodies get 413 (default 1 MiB)")
    g.add_argument("--model-name", help="model id served in the API (default: target folder name)")
    g.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    g.add_argument(
        "--max-pending-requests",
        type=int,
        metavar="N",
        help="generation requests in the server at once; more get 429 (default 128)",
    )
    g.add_argument(
        "--retry-after",
        type=int,
        dest="retry_after_s",
        metavar="S",
        help="Retry-After seconds of a 429 or 503 (default 1)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        dest="shutdown_timeout_s",
        metavar="S",
        help="on SIGTERM, how long in-flight requests may take to finish (default 30)",
    )
    g.add_argument(
        "--cors-origin",
        action="append",
        dest="cors_origins",
        metavar="ORIGIN",
        help="allow cross-origin requests from ORIGIN (repeat; default: CORS off)",
    )
    # A flag not given must not hide the environment or the config file: absent, not default.
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS


def settings_from_flags(args: argparse.Namespace) -> Settings:
    given = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    fields, model_flags = {}, {}
    for key, value in given.items():
        name = _RENAMED.get(key, key)
        (fields if name in Settings.model_fields else model_flags)[name] = value
    if model_flags:
        fields["model_flags"] = model_flags
    return Settings(**fields)


def run(args: argparse.Namespace) -> int:
    from server.app import create_app, resolve_engine_args

    try:
        settings = settings_from_flags(args)
        resolve_engine_args(settings)  # fail here, with a sentence, when no model is found
    except ValidationError as exc:
        print(f"epispec serve: invalid settings:\n{_explain(exc)}", file=sys.stderr)
        return 2
    except (BundleError, EngineUnavailable, ValueError) as exc:
        print(f"epispec serve: {exc}", file=sys.stderr)
        return 2
    return serve_app(create_app(settings), settings)


def serve_app(app: FastAPI, settings: Settings) -> int:
    """Run the app under uvicorn until a signal or a dead engine; the process's exit status."""
    _configure_logging(settings.log_level)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        timeout_graceful_shutdown=settings.shutdown_timeout_s,
    )
    server = DrainingServer(config, app)
    # uvicorn re-raises the signal that stopped it once it has shut down; a graceful stop
    # after SIGTERM is a success, not a death by signal
    signal.signal(signal.SIGTERM, lambda *_: None)
    try:
        server.run()
    except KeyboardInterrupt:  # SIGINT, re-raised the same way
        pass
    return server.exit_code


def _configure_logging(level: str) -> None:
    """Our own loggers (`epispec.*`, `server.*`) to stderr at the server's level, formatted like
    uvicorn's. They log events, never prompts or outputs."""
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s:     %(name)s: %(message)s"))
    for name in ("epispec", "server"):
        logger = logging.getLogger(name)
        logger.setLevel(level.upper())
        logger.handlers = [handler]
        logger.propagate = False


class DrainingServer(uvicorn.Server):
    """uvicorn's Server, plus draining on a signal and a non-zero exit when the engine dies."""

    def __init__(self, config: uvicorn.Config, app: FastAPI) -> None:
        super().__init__(config)
        self.app = app
        self.exit_code = 0
        app.state.on_engine_dead = self.engine_died

    def handle_exit(self, sig: int, frame) -> None:
        if not self.app.state.draining:
            log.info(
                "signal %d: finishing in-flight requests (up to %s s), then exiting",
                sig,
                self.config.timeout_graceful_shutdown,
            )
        self.app.state.draining = True
        super().handle_exit(sig, frame)

    def engine_died(self) -> None:
        """Called on the event loop by the app's engine watchdog."""
        self.exit_code = EXIT_ENGINE_DEAD
        log.error(
            "exiting with status %d in %.0f s so that a supervisor restarts the server",
            EXIT_ENGINE_DEAD,
            ENGINE_DEAD_GRACE_S,
        )
        asyncio.get_running_loop().call_later(ENGINE_DEAD_GRACE_S, setattr, self, "should_exit", True)


def _explain(exc: ValidationError) -> str:
    return "\n".join(
        f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
    )
