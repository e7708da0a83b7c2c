"""What one step of M candidate drafts costs beside one step of the SmolLM2-135M target, on CPU.

    python scripts/bench_draft_shapes.py [--threads 2] [--ctx 256] [--batch 1 8] [--m 4]
                                         [--dtypes float32 bfloat16] [--steps 8] [--json FILE]

For each batch size B, a KV-cached decode step (one new token per row, `--ctx` tokens already
cached) is timed for:
  - the target: transformers' LlamaForCausalLM with SmolLM2-135M-Instruct's shapes (30 layers,
    hidden 576, 9/3 heads, MLP 1536, vocabulary 49,152), in each dtype;
  - each draft shape, as M separate transformers models run one after the other (`hf x M`), in
    each dtype, and in float32 as one stacked group through the proposer's own kernel
    (`server.engine.draft_kernels.LlamaGroup`: weights stacked on an M axis, bmm per layer, paged KV,
    log-softmax over the vocabulary included) (`stacked`);
  - "shared head": M stacked 576-wide bodies whose output layer is the target's own tied
    embedding, so one [M·B, 576] x [576, V] matmul serves all drafts (weights read once): the
    stacked body with a 64-token head plus that matmul and its log-softmax.
Weights are random (timing does not depend on them) and the caches are filled without a prefill.
Target and draft steps alternate, so that both see the same load from other processes (this
machine is shared): each row gives the medians of `--steps` pairs after two warm-up pairs, in
milliseconds, and `ratio`, the median of the per-pair ratios drafts / target (same B and dtype;
the stacked and shared-head rows are float32). On a shared machine wall times swing with the
others' load; `--clock cpu --threads 1` times this process's CPU time instead, which they barely
touch (memory-bandwidth contention remains). A reduced output vocabulary (V 8,192) stands for a draft that predicts only the most
frequent tokens; its input embedding would still cover the whole vocabulary (a gather, no cost).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

TARGET = dict(hidden=576, layers=30, heads=9, kv=3, inter=1536, vocab=49152)
DRAFTS = {
    "576x2 V49k": dict(hidden=576, layers=2, heads=9, kv=3, inter=1536, vocab=49152),
    "576x2 V8k": dict(hidden=576, layers=2, heads=9, kv=3, inter=1536, vocab=8192),
    "256x2 V49k": dict(hidden=256, layers=2, heads=4, kv=4, inter=768, vocab=49152),
    "256x2 V8k": dict(hidden=256, layers=2, heads=4, kv=4, inter=768, vocab=8192),
    "128x2 V49k": dict(hidden=128, layers=2, heads=2, kv=2, inter=384, vocab=49152),
    "256x1 V8k": dict(hidden=256, layers=1, heads=4, kv=4, inter=768, vocab=8192),
}


def build(shape: dict, dtype: torch.dtype, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=shape["vocab"],
        hidden_size=shape["hidden"],
        intermediate_size=shape["inter"],
        num_hidden_layers=shape["layers"],
        num_attention_heads=shape["heads"],
        num_key_value_heads=shape["kv"],
        head_dim=64,
        max_position_embeddings=2048,
        tie_word_embeddings=True,
        rope_theta=100000.0,
    )
    return LlamaForCausalLM(cfg).to(dtype).eval()


def params(shape: dict) -> int:
    h, i, v, kvd = shape["hidden"], shape["inter"], shape["vocab"], shape["kv"] * 64
    layer = h * shape["heads"] * 64 * 2 + h * kvd * 2 + 3 * h * i + 2 * h
    return v * h + shape["layers"] * layer + h


def hf_step(models: list, batch: int, ctx: int, log_softmax: bool):
    """A closure: M transformers models, one after the other, each a one-token step on a
    `ctx`-token cache (filled with random keys and values, no prefill)."""
    from transformers import DynamicCache

    caches = []
    for m in models:
        cfg, dt = m.config, m.dtype
        cache = DynamicCache(config=cfg)
        for layer in range(cfg.num_hidden_layers):
            kv = torch.randn(batch, cfg.num_key_value_heads, ctx, 64, dtype=dt)
            cache.update(kv, kv.clone(), layer)
        caches.append(cache)
    tok = torch.randint(0, 50, (batch, 1))

    @torch.no_grad()
    def step():
        for m, cache in zip(models, caches, strict=True):
            logits = m(input_ids=tok, past_key_values=cache, use_cache=True).logits
            if log_softmax:
                torch.log_softmax(logits.float(), -1)

    return step


def stacked_step(models: list, batch: int, ctx: int, shared_head: torch.Tensor | None = None):
    """A closure: the proposer's stacked group (float32), one batched step of all M drafts; with
    `shared_head` [E, V], plus one [M·B, E] x [E, V] matmul and log-softmax (the drafts' own
    heads are then 64-token stand-ins)."""
    from server.engine.draft_kernels import LlamaGroup
    from server.engine.draft_kv import BlockPool

    pool = BlockPool.for_tokens(batch * (ctx + 64))
    group = LlamaGroup(models, pool, device=torch.device("cpu"))
    for r in range(batch):
        group.kv.zero(pool.ensure(str(r), ctx + 1))
    slots = pool.table([str(r) for r in range(batch)], len(pool.blocks_of("0")), "cpu")  # [B, nb]
    tokens = torch.randint(0, 50, (batch, 1))
    valid = torch.ones(batch, 1, dtype=torch.bool)
    out_index = (torch.arange(batch), torch.zeros(batch, dtype=torch.long))
    pos = torch.full((batch, 1), ctx)
    x = torch.randn(len(models) * batch, models[0].config.hidden_size)

    @torch.no_grad()
    def step():
        group.forward(tokens, None, pos, slots, valid, out_index)
        if shared_head is not None:
            torch.log_softmax(x @ shared_head, -1)

    return step


def paired(target_step, draft_step, steps: int, clock=time.perf_counter) -> tuple[float, float, float]:
    """Target and draft steps alternated (so both see the same load from other processes):
    (median target ms, median drafts ms, median of the per-pair ratios), two warm-up pairs."""
    tt, td, ratios = [], [], []
    for n in range(steps + 2):
        t0 = clock()
        target_step()
        t1 = clock()
        draft_step()
        t2 = clock()
        if n >= 2:
            tt.append((t1 - t0) * 1000)
            td.append((t2 - t1) * 1000)
            ratios.append((t2 - t1) / (t1 - t0))
    return statistics.median(tt), statistics.median(td), statistics.median(ratios)


def candidates(names: list[str], dtype: str, m: int):
    """(label, impl, params per draft, models, shared head or None) for each draft set."""
    dt = getattr(torch, dtype)
    for name in names:
        shape = DRAFTS[name]
        models = [build(shape, dt, seed=s) for s in range(m)]
        yield f"{m} x {name}", f"hf x {m}", params(shape), models, None
        if dtype == "float32":
            yield f"{m} x {name}", "stacked", params(shape), models, None
    if dtype == "float32":  # 576-wide bodies sharing the target's tied head
        body = {**DRAFTS["576x2 V49k"], "vocab": 64}
        models = [build(body, dt, seed=s) for s in range(m)]
        head = torch.randn(TARGET["hidden"], TARGET["vocab"])
        yield f"{m} x 576x2 shared head", "stacked + 1 head", params(body) - 64 * 576, models, head


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--m", type=int, default=4)
    ap.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--drafts", nargs="+", default=list(DRAFTS), choices=list(DRAFTS))
    ap.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="wall: elapsed time; cpu: this process's CPU time (time.process_time), "
        "which other processes' load does not inflate; use it with --threads 1",
    )
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for dtype in args.dtypes:
        target = build(TARGET, getattr(torch, dtype))
        for label, impl, n_params, models, head in candidates(args.drafts, dtype, args.m):
            for b in args.batch:
                if impl.startswith("hf"):
                    draft = hf_step(models, b, args.ctx, log_softmax=True)
                else:
                    draft = stacked_step(models, b, args.ctx, head)
                clock = time.process_time if args.clock == "cpu" else time.perf_counter
                t_ms, d_ms, ratio = paired(hf_step([target], b, args.ctx, False), draft, args.steps, clock)
                rows.append(
                    {
                        "what": label,
                        "impl": impl,
                        "dtype": dtype,
                        "batch": b,
                        "params": n_params,
                        "target_ms": t_ms,
                        "ms": d_ms,
                        "ratio": ratio,
                    }
                )
                print(rows[-1], flush=True)
        del target
    print(
        "\n| drafts (M x hidden x layers, vocab) | impl | dtype | B | params/draft | drafts ms | target ms | drafts/target |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['what']} | {r['impl']} | {r['dtype']} | {r['batch']} | {r['params'] / 1e6:.1f} M | "
            f"{r['ms']:.1f} | {r['target_ms']:.1f} | {r['ratio']:.2f} |"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
