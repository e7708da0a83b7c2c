"""`epispec serve`: the HTTP server (FastAPI under uvicorn), one engine per process.

Settings come from these flags, else `EPISPEC_*` environment variables, else a config file
(`--config FILE`), else defaults (`server/config.py`). With no model flags it serves the
bundle in `EPISPEC_BUNDLE` or the demo bundle.
"""

from __future__ import annotations

import argparse
import sys

from pydantic import ValidationError

from server.bundle import BundleError
from server.commands.model_args import add_model_arguments
from server.engine.factory import EngineUnavailable

# command-line dest -> Settings field, where the names differ
_RENAMED = {"draft": "drafts", "config": "config_file"}
_SERVE_FLAGS = ("host", "port", "api_key", "config", "max_request_bytes", "eu_threshold",
                "bias_threshold", "variance_threshold", "model_name", "log_level")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    g = parser.add_argument_group("server")
    g.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    g.add_argument("--port", type=int, help="port (default 8000)")
    g.add_argument("--api-key", help="require 'Authorization: Bearer KEY' (all routes but /health)")
    g.add_argument("--config", metavar="FILE", help="TOML or JSON settings file")
    g.add_argument("--max-request-bytes", type=int, help="larger request bodies get 413 (default 1 MiB)")
    g.add_argument("--eu-threshold", type=float, help="flag tokens with eu above this (nats)")
    g.add_argument("--bias-threshold", type=float, help="also flag tokens with bias above this")
    g.add_argument("--variance-threshold", type=float, help="also flag tokens with variance above this")
    g.add_argument("--model-name", help="model id served in the API (default: target folder name)")
    g.add_argument("--log-level", choices=["critical", "error", "warning", "info", "debug"])
    # A flag not given must not hide the environment or the config file: absent, not default.
    for action in parser._actions:
        if action.dest != "help":
            action.default = argparse.SUPPRESS


def settings_from_flags(args: argparse.Namespace):
    from server.config import Settings

    given = {k: v for k, v in vars(args).items() if not k.startswith("_") and k != "command"}
    fields, model_flags = {}, {}
    for key, value in given.items():
        name = _RENAMED.get(key, key)
        (fields if name in Settings.model_fields else model_flags)[name] = value
    if model_flags:
        fields["model_flags"] = model_flags
    return Settings(**fields)


def run(args: argparse.Namespace) -> int:
    import uvicorn

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
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=settings.log_level)
    return 0


def _explain(exc: ValidationError) -> str:
    return "\n".join(
        f"  {'.'.join(str(p) for p in e['loc']) or 'settings'}: {e['msg']}" for e in exc.errors()
    )
