"""The `epispec` command line: a thin dispatcher over subcommand modules.

Each subcommand lives in its own module exposing `add_arguments(parser)` and `run(args) -> int`;
modules are imported only when their command runs, so `epispec --help` stays fast and a
command whose optional parts are missing says so instead of breaking the others.
"""

from __future__ import annotations

import argparse
import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "generate": ("server.commands.generate", "generate text with per-token uncertainty"),
    "serve": ("server.commands.serve", "start the HTTP server"),
    "info": ("server.commands.info", "show the active bundle's manifest"),
    "models": ("server.commands.models", "fetch and convert pretrained targets into the local cache"),
    "bench": ("measure.bench.cli", "benchmark EU serving against plain vLLM"),
    "load": ("measure.load.cli", "load-test a server on loopback (errors, latency, leaks, memory)"),
    # training and evaluation live in the `drafts` package, loaded on demand
    "drafts": ("drafts.cli", "train tokenizers, targets, ensembles, OSD/DDD drafts, bundles"),
    "eval": ("measure.evaluation.cli", "evaluate EU estimation and hallucination detection"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epispec",
        description="LLM serving with per-token epistemic uncertainty from speculative decoding.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (module, help_text) in COMMANDS.items():
        sp = sub.add_parser(name, help=help_text, description=help_text)
        sp.set_defaults(_module=module)
        if name in sys.argv[1:2]:  # only the chosen command imports its module
            _load(module).add_arguments(sp)
    return parser


def _load(module: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as exc:
        if exc.name and module.startswith(exc.name):
            sys.exit(f"epispec: this command is not available in this version ({module} is missing).")
        raise


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    sys.argv = [sys.argv[0], *argv]
    args = build_parser().parse_args(argv)
    return int(_load(args._module).run(args) or 0)


if __name__ == "__main__":
    raise SystemExit(main())
