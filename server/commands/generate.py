"""`epispec generate`: one prompt, streamed to the terminal with per-token uncertainty.

With --jsonl: one JSON object per token (token_id, text, logprob, bias, variance, eu, flagged)
and a final {"summary": {...}} line. Otherwise the text, with flagged tokens marked
(reverse video on a terminal, [[like this]] in a pipe), and a summary line on stderr.
With --html FILE: also the playground's coloured view of the generation, as a standalone page.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import uuid
from pathlib import Path

from server.api.prompts import encode_prompt
from server.bundle import BundleError
from server.commands.model_args import add_model_arguments, add_threshold_arguments
from server.engine.factory import EngineUnavailable, build_engine
from server.engine.models import ModelFolderError
from server.engine.types import Finished, SamplingParams, TokenEvent
from server.resolve import engine_args, resolve_thresholds


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_model_arguments(parser)
    add_threshold_arguments(parser)
    parser.add_argument("--prompt", required=True, help="prompt text")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--temperature", type=float, default=0.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    parser.add_argument("--jsonl", action="store_true", help="one JSON object per token")
    parser.add_argument(
        "--html",
        metavar="FILE",
        type=Path,
        default=None,
        help="also write the generation as a standalone coloured HTML page",
    )


def run(args: argparse.Namespace) -> int:
    try:
        eargs, bundle = engine_args(args, vars(args))
        params = SamplingParams(
            max_tokens=args.max_tokens,
            temperature=args.temperature,
            top_p=args.top_p,
            seed=args.seed,
            stop=tuple(args.stop),
            thresholds=resolve_thresholds(
                args, bundle.thresholds if bundle else None, bundle.p_error if bundle else None
            ),
        )
        params.validate()
        if args.html is not None and not args.html.parent.is_dir():
            raise ValueError(f"--html: the folder {args.html.parent} does not exist")
        engine = build_engine(eargs)
    except (BundleError, ModelFolderError, EngineUnavailable, ValueError) as exc:
        print(f"epispec generate: {exc}", file=sys.stderr)
        return 2
    return asyncio.run(_generate(engine, args, params))


async def _generate(engine, args: argparse.Namespace, params: SamplingParams) -> int:
    mark = ("\x1b[7m", "\x1b[0m") if sys.stdout.isatty() else ("[[", "]]")
    prompt_ids = encode_prompt(engine.tokenizer, args.prompt)
    tokens: list[TokenEvent] = []
    try:
        async for item in engine.generate(uuid.uuid4().hex, prompt_ids, params):
            if isinstance(item, Finished):
                if args.html is not None:
                    _write_html(args, engine.model_name, params, tokens, item)
                summary = {
                    "tokens": item.completion_tokens,
                    **item.stats.as_dict(),
                    "finish_reason": item.finish_reason,
                }
                if args.jsonl:
                    print(json.dumps({"summary": summary}), flush=True)
                else:
                    print(flush=True)
                    print(f"[{json.dumps(summary)}]", file=sys.stderr)
                continue
            tokens.append(item)
            if args.jsonl:
                print(json.dumps(item.as_dict()), flush=True)
            else:
                text = f"{mark[0]}{item.text}{mark[1]}" if item.flagged else item.text
                print(text, end="", flush=True)
    finally:
        await engine.shutdown()
    return 0


def _write_html(
    args: argparse.Namespace, model: str, params: SamplingParams, tokens: list[TokenEvent], finished: Finished
) -> None:
    from server.api.playground import generation_record
    from server.playground import static_page

    settings = {
        "max_tokens": params.max_tokens,
        "temperature": params.temperature,
        "top_p": params.top_p,
        "seed": params.seed,
    }
    record = generation_record(
        model=model,
        prompt=args.prompt,
        tokens=tokens,
        finished=finished,
        thresholds=params.thresholds,
        settings=settings,
    )
    args.html.write_text(static_page(record), encoding="utf-8")
    print(f"[wrote {args.html}]", file=sys.stderr)
