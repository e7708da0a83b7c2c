"""Same request, same answer? Greedy chat answers with and without the drafts, and long prompts
cold and warm in vLLM's prefix cache, on the vllm engine (docs/determinism.md).

    python scripts/determinism.py [--bundle DIR] [--dtype float32|bfloat16|auto]
                                  [--no-prefix-caching] [--max-tokens 40] [--long 6] [--json FILE]

One engine with the bundle's drafts, then one with its target alone, in the same dtype (default:
what `epispec serve` picks here). Each runs, greedy (T = 0), `max_tokens` each:
  - the 12 held-out chat prompts below (one user turn each, one at a time);
  - `--long` prompts of ~2,000 tokens (a unique system turn of GSM8K answers from
    data/smollm2-gsm8k-responses.jsonl.gz, then one question), each sent twice in a row: the
    first is computed cold, the second finds all but its last block in vLLM's prefix cache;
    greedy, then once more each (cold, warm) sampled with seed 42 at T = 0.8.
It prints how many chat answers are identical token for token with and without the drafts, how
many long prompts give the same tokens cold and warm (per engine, greedy and seeded), and the
largest difference of the emitted tokens' log-probs between the two greedy sends.
"""

from __future__ import annotations

import argparse
import asyncio
import gzip
import json
import sys
import uuid
from pathlib import Path

CHAT = (
    "What is the capital of France?",
    "Rewrite this sentence to sound more positive: I am not happy with my job.",
    "Give me three tips for staying healthy.",
    "Explain what a black hole is in two sentences.",
    "Write a haiku about autumn leaves.",
    "What are the benefits of reading books?",
    "How do I make a cup of tea?",
    "Summarize the plot of Romeo and Juliet in one paragraph.",
    "What is the difference between weather and climate?",
    "Suggest a name for a friendly robot.",
    "Why is the sky blue?",
    "List some good habits for students.",
)
RESPONSES = Path(__file__).resolve().parents[1] / "data" / "smollm2-gsm8k-responses.jsonl.gz"
LONG_TOKENS = 2000  # the system turn's length, roughly
SEED, SEEDED_T = 42, 0.8


def long_prompts(tokenizer, n: int) -> list[list[dict]]:
    """n chat conversations whose system turn is ~LONG_TOKENS tokens of worked answers, each from
    its own slice of the responses file (so no two share a prefix beyond the template's)."""
    with gzip.open(RESPONSES, "rt") as f:
        records = [json.loads(line) for line in f]
    out, i = [], 0
    for _ in range(n):
        notes = []
        while len(tokenizer("\n\n".join(notes))["input_ids"]) < LONG_TOKENS:
            r = records[i % len(records)]
            answer = tokenizer.decode(r["output_ids"], skip_special_tokens=True)
            notes.append(f"Q: {r['question']}\nA: {answer}")
            i += 1
        out.append(
            [
                {"role": "system", "content": "Worked answers:\n\n" + "\n\n".join(notes)},
                {"role": "user", "content": "Which of these answers has the largest final number?"},
            ]
        )
    return out


async def greedy(
    engine, prompt_ids: list[int], max_tokens: int, temperature: float = 0.0, seed: int | None = None
) -> tuple[list[int], list[float]]:
    from server.engine.types import Finished, SamplingParams

    tokens, logprobs = [], []
    params = SamplingParams(max_tokens=max_tokens, temperature=temperature, seed=seed)
    async for item in engine.generate(uuid.uuid4().hex, prompt_ids, params):
        if not isinstance(item, Finished):
            tokens.append(item.token_id)
            logprobs.append(item.logprob)
    return tokens, logprobs


def run_engine(eargs, chats: list, longs: list, max_tokens: int) -> dict:
    from server.api.prompts import chat_prompt_ids
    from server.api.schemas import ChatMessage
    from server.engine.factory import build_engine

    engine = build_engine(eargs)

    def ids(messages: list[dict]) -> list[int]:
        return chat_prompt_ids(engine.tokenizer, [ChatMessage(**m) for m in messages])

    async def run() -> dict:
        chat = [await greedy(engine, ids([{"role": "user", "content": c}]), max_tokens) for c in chats]
        pairs, seeded = [], []
        for messages in longs:
            p = ids(messages)
            pairs.append((len(p), await greedy(engine, p, max_tokens), await greedy(engine, p, max_tokens)))
        for messages in longs:  # a system turn of its own: cold again
            p = ids([{**messages[0], "content": "Seeded. " + messages[0]["content"]}, messages[1]])
            twice = [await greedy(engine, p, max_tokens, SEEDED_T, SEED) for _ in range(2)]
            seeded.append((len(p), *twice))
        await engine.shutdown()
        return {"chat": chat, "long": pairs, "seeded": seeded}

    return asyncio.run(run())


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--dtype", default=None, help="target dtype (default: what epispec serve picks here)")
    ap.add_argument("--no-prefix-caching", action="store_false", dest="enable_prefix_caching", default=None)
    ap.add_argument("--max-tokens", type=int, default=40)
    ap.add_argument("--long", type=int, default=6, help="long prompts, each sent twice")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)

    from transformers import AutoTokenizer

    from server.engine.factory import EngineArgs
    from server.resolve import num_speculative_tokens, resolve_models, vllm_args

    target, drafts, bundle = resolve_models(None, [], args.bundle)
    vargs = vllm_args({"dtype": args.dtype, "enable_prefix_caching": args.enable_prefix_caching}, "vllm")
    longs = long_prompts(AutoTokenizer.from_pretrained(target), args.long)
    k = num_speculative_tokens(None, bundle)
    results = {}
    for name, ds in (("drafts", drafts), ("target alone", [])):
        eargs = EngineArgs(target, ds, engine="vllm", num_speculative_tokens=k, vllm_args=dict(vargs))
        results[name] = run_engine(eargs, list(CHAT), longs, args.max_tokens)

    a, b = results["drafts"]["chat"], results["target alone"]["chat"]
    same_chat = sum(x[0] == y[0] for x, y in zip(a, b, strict=True))
    dtype = vargs.get("dtype", "auto (vLLM's choice)")
    caching = "off" if args.enable_prefix_caching is False else "on"
    print(f"\ndtype {dtype}, prefix caching {caching}, k = {k}, greedy, {args.max_tokens} tokens")
    print("\n| | identical | of |\n|---|---:|---:|")
    print(f"| chat answers, drafts vs target alone | {same_chat} | {len(CHAT)} |")
    for name, r in results.items():
        same = sum(c[0] == w[0] for _, c, w in r["long"])
        dlp = max(
            (abs(x - y) for _, c, w in r["long"] for x, y in zip(c[1], w[1], strict=False)), default=0.0
        )
        sizes = ", ".join(str(n) for n, _, _ in r["long"])
        print(
            f"| long prompts cold vs warm, {name} ({sizes} tokens; max |Δ logprob| {dlp:.3g}) "
            f"| {same} | {len(r['long'])} |"
        )
        same = sum(c[0] == w[0] for _, c, w in r["seeded"])
        print(f"| the same, seed {SEED} at T = {SEEDED_T}, {name} | {same} | {len(r['seeded'])} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "vllm_args": vargs, "results": results}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
