"""The proposer's draft side per decode step, alone: the drafts' step with its records, and the
exact bias over the target's vocabulary, at B rows (docs/benchmark.md#speculation-that-adapts-to-load).

    python scripts/time_proposer_step.py [--bundle bundles/smollm2] [--batch 1 8 32] [--rounds 12]

B requests with `--history`-token random histories, then `--rounds` rounds of one new token each,
proposing nothing (the part of a step no speculation policy removes); the bias is KL(q̄ ‖ p)
against random target logits of the target's vocabulary size. Prints the median per round.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time

import torch

from server.bundle import load_bundle
from server.engine.draft_ensemble import DraftEnsemble, LogMix, RowInput
from server.engine.models import model_config
from server.engine.uncertainty import bias_on_support


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--batch", type=int, nargs="+", default=[1, 8, 32])
    ap.add_argument("--rounds", type=int, default=12)
    ap.add_argument("--history", type=int, default=150)
    args = ap.parse_args()
    bundle = load_bundle(args.bundle)
    vocab = int(model_config(str(bundle.target))["vocab_size"])
    for B in args.batch:
        ens = DraftEnsemble([str(d) for d in bundle.drafts], k=1, slots=B, max_len=4096, summary=LogMix())
        rng = random.Random(0)
        hists = {f"r{i}": [1] + [rng.randint(3, 8000) for _ in range(args.history)] for i in range(B)}
        ens.propose([RowInput(r, torch.tensor(h), 1) for r, h in hists.items()])
        drafts_s, bias_s = [], []
        for _ in range(args.rounds):
            rows = []
            for r, h in hists.items():
                h.append(rng.randint(3, 8000))
                rows.append(RowInput(r, torch.tensor(h), 1))
            t0 = time.perf_counter()
            outs = ens.propose(rows, lambda live, confs: [0] * len(live))
            t1 = time.perf_counter()
            log_mix = torch.stack([o.records[0].log_mix for o in outs])  # [B, S]
            bias_on_support(log_mix, torch.randn(B, vocab), ens.support).tolist()
            drafts_s.append(t1 - t0)
            bias_s.append(time.perf_counter() - t1)
        print(
            f"B={B}: drafts and records {1000 * statistics.median(drafts_s):.1f} ms/step, "
            f"exact bias {1000 * statistics.median(bias_s):.1f} ms/step"
        )


if __name__ == "__main__":
    main()
