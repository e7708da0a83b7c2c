"""The paged draft ensemble against the contiguous one it replaced, and its dtypes against float32.

    python scripts/bench_draft_kv.py [--old-rev 3928c58] [--batch 1 8 32] [--rounds 12]
                                     [--shapes tiny medium] [--drafts DIR ...] [--threads 2]

Speed and equality. `DraftEnsemble` of this tree (paged KV) and of `--old-rev` (contiguous slot
caches, read with `git show`) serve the same random drafts and the same rounds: B requests with
64-token prompts, then `--rounds` decode rounds with a random accepted prefix of the proposal
and a random next token (seeded). Old and new alternate round by round (both see the same load
from other processes); per shape and B the table gives the median of the per-round time
ratios new / old, whether every proposal was equal, and the largest record differences
(variance, q̄ probabilities; TopN(None): all of q̄).

dtypes (`--drafts`: trained drafts, e.g. the tests' tiny ones): the same rounds with nothing
accepted (so each ensemble's own proposal never enters the history) through float32 and each
of bfloat16 / float16; per record the absolute variance error, KL(q̄₃₂ ‖ q̄) (what the bias
KL(q̄ ‖ p) moves by, to first order) and whether the proposals agree.
"""

from __future__ import annotations

import argparse
import importlib.util
import random
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {  # random Llama drafts (head_dim 64)
    "tiny": dict(hidden=128, layers=2, heads=2, kv=2, inter=256, vocab=2048),
    "medium": dict(hidden=512, layers=4, heads=8, kv=4, inter=1536, vocab=8192),
}


def random_drafts(shape: dict, m: int, folder: Path) -> list[str]:
    from transformers import LlamaConfig, LlamaForCausalLM

    out = []
    for i in range(m):
        torch.manual_seed(i)
        cfg = LlamaConfig(
            vocab_size=shape["vocab"],
            hidden_size=shape["hidden"],
            intermediate_size=shape["inter"],
            num_hidden_layers=shape["layers"],
            num_attention_heads=shape["heads"],
            num_key_value_heads=shape["kv"],
            head_dim=64,
            max_position_embeddings=1024,
        )
        path = folder / f"d{i}"
        LlamaForCausalLM(cfg).save_pretrained(str(path))
        out.append(str(path))
    return out


def old_module(rev: str):
    src = subprocess.run(
        ["git", "show", f"{rev}:server/engine/draft_ensemble.py"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    path = Path(tempfile.mkdtemp()) / "draft_ensemble_old.py"
    path.write_bytes(src)
    spec = importlib.util.spec_from_file_location("draft_ensemble_old", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # its dataclasses look their module up
    spec.loader.exec_module(mod)
    return mod


def rounds(batch: int, n: int, vocab: int, seed: int, accept: bool):
    """A generator of round inputs; send() it each round's proposals (list per row)."""
    from server.engine.draft_ensemble import RowInput

    rng = random.Random(seed)
    hists = [[1] + [rng.randrange(3, vocab) for _ in range(63)] for _ in range(batch)]
    props = [[] for _ in range(batch)]
    for r in range(n + 1):
        rows = []
        for b, h in enumerate(hists):
            new = (props[b][: rng.randint(0, len(props[b]))] if accept else []) + [rng.randrange(3, vocab)]
            h.extend(new)
            rows.append(RowInput(f"r{b}", torch.tensor(h), len(new), final=r == n))
        props = yield rows


def q_bar(rec, vocab: int) -> torch.Tensor:
    q = torch.zeros(vocab)
    q[rec.ids.long()] = rec.probs.float()
    return q


def compare_old_new(paths, vocab, batches, n_rounds, old_rev, k):
    from server.engine.draft_ensemble import DraftEnsemble, TopN

    old = old_module(old_rev)
    for batch in batches:
        kw = dict(k=k, slots=batch, max_len=512)
        # the old revision names "all of q̄" top_n=-1
        ens_new, ens_old = (
            DraftEnsemble(paths, **kw, summary=TopN(None)),
            old.DraftEnsemble(paths, **kw, top_n=-1),
        )
        gen = rounds(batch, n_rounds, vocab, seed=batch, accept=True)
        rows, ratios, same, dvar, dq = next(gen), [], True, 0.0, 0.0
        for r in range(n_rounds + 1):
            t0 = time.perf_counter()
            a = ens_old.propose(rows)
            t1 = time.perf_counter()
            b = ens_new.propose(rows)
            t2 = time.perf_counter()
            if r > 1:  # the prompt round and one warm-up round are not timed
                ratios.append((t2 - t1) / (t1 - t0))
            for x, y in zip(a, b, strict=True):
                same &= x.proposal == y.proposal and [p.position for p in x.records] == [
                    p.position for p in y.records
                ]
                for p, q in zip(x.records, y.records, strict=True):
                    dvar = max(dvar, abs(p.variance - q.variance))
                    dq = max(dq, float((q_bar(p, vocab) - q_bar(q, vocab)).abs().max()))
            try:
                rows = gen.send([x.proposal for x in a])
            except StopIteration:
                break
        yield batch, statistics.median(ratios), same, dvar, dq


def compare_dtypes(paths, vocab, dtypes, batch, n_rounds, k):
    from server.engine.draft_ensemble import DraftEnsemble, TopN

    kw = dict(k=k, slots=batch, max_len=512, summary=TopN(None))
    ref = DraftEnsemble(paths, **kw)
    for name in dtypes:
        ens = DraftEnsemble(paths, **kw, dtype=getattr(torch, name))
        gen = rounds(batch, n_rounds, vocab, seed=7, accept=False)
        rows, dvar, kls, agree, total = next(gen), [], [], 0, 0
        for _ in range(n_rounds + 1):
            a, b = ref.propose(rows), ens.propose(rows)
            for x, y in zip(a, b, strict=True):
                agree += sum(int(s == t) for s, t in zip(x.proposal, y.proposal, strict=True))
                total += len(x.proposal)
                for p, q in zip(x.records, y.records, strict=True):
                    dvar.append(abs(p.variance - q.variance))
                    q32, q16 = q_bar(p, vocab), q_bar(q, vocab).clamp_min(1e-30)
                    kls.append(float((q32 * (q32.clamp_min(1e-30).log() - q16.log())).sum()))
            try:
                rows = gen.send([x.proposal for x in a])
            except StopIteration:
                break
        dvar.sort(), kls.sort()
        yield name, len(dvar), dvar[len(dvar) // 2], dvar[-1], kls[len(kls) // 2], kls[-1], agree / total


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--old-rev", default="3928c58")
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--shapes", nargs="+", default=list(SHAPES))
    ap.add_argument("--m", type=int, default=3)
    ap.add_argument("--k", type=int, default=3)
    ap.add_argument("--drafts", nargs="*", default=[], help="trained drafts for the dtype comparison")
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    sys.path.insert(0, str(ROOT))
    with tempfile.TemporaryDirectory() as tmp:
        print(
            "| drafts | B | time new/old (median) | proposals equal | max |Δvariance| | max |Δq̄| |",
            flush=True,
        )
        print("|---|---:|---:|---|---:|---:|")
        for name in args.shapes:
            shape = SHAPES[name]
            paths = random_drafts(shape, args.m, Path(tmp) / name)
            for b, ratio, same, dv, dq in compare_old_new(
                paths, shape["vocab"], args.batch, args.rounds, args.old_rev, args.k
            ):
                print(f"| {name} ×{args.m} | {b} | {ratio:.2f} | {same} | {dv:.1e} | {dq:.1e} |", flush=True)
    if args.drafts:
        import json

        first = Path(args.drafts[0])
        if (first / "draft_vocab.json").is_file():  # a reduced vocabulary: records carry target ids
            vocab = json.loads((first / "draft_vocab.json").read_text())["target_vocab_size"]
        else:
            vocab = json.loads((first / "config.json").read_text())["vocab_size"]
        print("\n| dtype | records | |Δvariance| median | max | KL(q̄32‖q̄) median | max | proposals agree |")
        print("|---|---:|---:|---:|---:|---:|---:|")
        for name, n, v50, vmax, k50, kmax, agree in compare_dtypes(
            args.drafts, vocab, args.dtypes, 8, args.rounds, args.k
        ):
            print(
                f"| {name} | {n} | {v50:.1e} | {vmax:.1e} | {k50:.1e} | {kmax:.1e} | {agree:.1%} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
