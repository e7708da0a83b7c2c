"""How well each draft fits its target on in-distribution text it was not trained on — the
systematic part of the served bias term (issue #14).

    python scripts/draft_fit.py --draft DIR [DIR ...] [--target DIR] [--data FILE] [--records 16]
                                [--max-len 384] [--threads 2]

For each draft: `--records` responses of `--data` (an `epispec drafts respond` file, default the
committed SmolLM2 responses) from *other* DDD partitions than the draft's own (its
partition.json), target and draft teacher-forced on prompt + response (the first `--max-len`
tokens), and over the response positions:
  - top-1 agreement: the draft's argmax is the target's (what speculation's acceptance follows);
  - KL(q ‖ p) in nats: the draft's own term of the served bias (KL(q̄ ‖ p) ≤ the drafts' mean of
    it, by convexity); a reduced draft's q is 0 outside its vocabulary S, and p is the target's
    full distribution read on S, as served;
  - KL(p_S ‖ q) in nats: the forward direction, p renormalized over S (the default training loss).
The ground truth EU* on this text averages ~0.04 nats (`epispec eval --bundle`), so whatever
KL(q ‖ p) exceeds that is distillation error. Prints one line per draft.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from pathlib import Path

import torch
from tqdm import tqdm

from drafts.responses import read_responses
from server.engine.draft_vocab import read_draft_vocab
from server.engine.models import load_causal_lm

ROOT = Path(__file__).resolve().parents[1]


def _key(question: str) -> str:
    return hashlib.sha256(question.encode()).hexdigest()[:16]  # DDD's document hash (drafts.ddd)


def fit(target, draft_dir: Path, records: list[dict], n: int, max_len: int) -> dict:
    lm, vocab = load_causal_lm(draft_dir), read_draft_vocab(draft_dir)
    own = set(json.loads((draft_dir / "partition.json").read_text())["hashes"])
    held = [r for r in records if _key(r["question"]) not in own][:n]
    s_ids = vocab.target_ids if vocab else None
    agree = positions = 0
    reverse = forward = 0.0
    for r in tqdm(held, desc=draft_dir.name, leave=False):
        ids = torch.tensor(r["prompt_ids"] + r["output_ids"])[None, :max_len]  # [1, T]
        first = len(r["prompt_ids"]) - 1  # the position that predicts the first response token
        with torch.no_grad():
            log_p = torch.log_softmax(target(input_ids=ids).logits[0].float(), -1)[first:]  # [R, V]
            inp = vocab.to_draft(ids) if vocab else ids
            log_q = torch.log_softmax(lm(input_ids=inp).logits[0].float(), -1)[first:]  # [R, V_d]
        log_p_s = log_p[:, s_ids] if vocab else log_p  # [R, V_d]: p read on S, not renormalized
        log_p_sn = torch.log_softmax(log_p_s, -1)  # [R, V_d]: renormalized over S
        top_q = s_ids[log_q.argmax(-1)] if vocab else log_q.argmax(-1)
        agree += int((top_q == log_p.argmax(-1)).sum())
        positions += len(log_q)
        reverse += float((log_q.exp() * (log_q - log_p_s)).sum())
        forward += float((log_p_sn.exp() * (log_p_sn - log_q)).sum())
    return {
        "draft": str(draft_dir),
        "records": len(held),
        "positions": positions,
        "top1_agreement": agree / positions,
        "kl_draft_target": reverse / positions,
        "kl_target_draft": forward / positions,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--draft", nargs="+", required=True, metavar="DIR")
    ap.add_argument("--target", default=None, help="target folder (default: `epispec models path`)")
    ap.add_argument("--data", default=str(ROOT / "data" / "smollm2-gsm8k-responses.jsonl.gz"))
    ap.add_argument("--records", type=int, default=16)
    ap.add_argument("--max-len", type=int, default=384)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.target is None:
        from server.hub.source import DEFAULT_SOURCE, SOURCES, model_dir

        args.target = str(model_dir(SOURCES[DEFAULT_SOURCE]))
    target = load_causal_lm(args.target)
    records = read_responses(args.data)
    for d in args.draft:
        r = fit(target, Path(d), records, args.records, args.max_len)
        print(
            f"{r['draft']}: {r['positions']} response positions of {r['records']} held-out responses, "
            f"top-1 agreement {r['top1_agreement']:.3f}, KL(q || p) {r['kl_draft_target']:.3f} nats, "
            f"KL(p_S || q) {r['kl_target_draft']:.3f} nats"
        )


if __name__ == "__main__":
    main()
