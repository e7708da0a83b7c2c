"""What the served black-box check's goal asks of any EU estimator: the ground truth EU* of every
served answer, and how well it ranks wrong answers against the target's own mean nll.

    python scripts/served_ground_truth.py docs/eval-served/smollm2/results.json [--out FILE]
        [--bundle DIR] [--samples 32]

Reads `epispec eval --served`'s results (the questions, the answers' texts, their grades),
teacher-forces each answer (re-tokenized; the chat template's prompt as the server builds it)
through the bundle's target in float32, and scores every answer token with EU* — the mutual
information of S low-rank instances in the last K layers, the evaluation's own family and seeds
(`measure.evaluation.pretrained.families`) — and the target's nll and entropy. Per answer: the
mean of each; AUROC for `wrong` with bootstrap CIs, and the paired gap AUROC(mean EU*) −
AUROC(mean nll). EU* is what the served eu estimates, so where even EU* trails the nll by more
than the goal's 0.05, no estimator of EU meets that goal on these answers.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from drafts.responses import chat_prompt_ids
from measure.evaluation.metrics import auroc, with_ci
from measure.evaluation.noise import LowRankNoise
from measure.evaluation.pretrained import TRUTH, BundleRecipe, families
from measure.evaluation.tree import Branch, Tree, head_logprobs, run_body
from server.bundle import load_bundle
from server.engine.models import load_causal_lm, load_tokenizer
from server.engine.uncertainty import entropy

SCORES = ("mean_eu_star", "max_eu_star", "mean_nll", "mean_entropy")


@torch.inference_mode()
def score_answer(model, tok, noise: LowRankNoise, prompt: str, text: str) -> dict:
    """Per token of the re-tokenized answer: EU*, nll, entropy (nats)."""
    prompt_ids = chat_prompt_ids(tok, prompt)
    answer = tok(text, add_special_tokens=False)["input_ids"] or [tok.eos_token_id]
    tree = Tree(prompt_ids, [Branch(len(prompt_ids), answer, 0)])
    h, prefix = run_body(model, tree, hidden_at=noise.prefix_layers)  # [N, E] each
    at, toks, _ = tree.scored()  # [T]
    lp = head_logprobs(model, h[at])  # [T, V]
    return {
        "eu_star": noise.mutual_information(tree, at, prefix).tolist(),
        "nll": (-lp.gather(-1, toks[:, None])[:, 0]).tolist(),
        "entropy": entropy(lp).tolist(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("results", type=Path)
    ap.add_argument("--out", type=Path, default=None, help="default: ground_truth.json beside RESULTS")
    ap.add_argument("--bundle", default=None)
    ap.add_argument("--samples", type=int, default=BundleRecipe.posterior_samples, help="S of EU*")
    ap.add_argument("--bootstrap", type=int, default=1000)
    args = ap.parse_args()
    served = json.loads(args.results.read_text())
    bundle = load_bundle(args.bundle)
    tok = load_tokenizer(str(bundle.target))
    model = load_causal_lm(str(bundle.target), "cpu", torch.float32)
    recipe = BundleRecipe("served", 0, 0, 0, 0, posterior_samples=args.samples)
    family = families(recipe, len(bundle.drafts))[TRUTH]
    noise = LowRankNoise(model, family)
    rows = []
    for r in tqdm(served["rows"], desc="answers", unit="answer"):
        s = score_answer(model, tok, noise, r["prompt"], r["text"])
        rows.append({"wrong": r["wrong"], **s})
    y = np.asarray([r["wrong"] for r in rows], dtype=np.float64)
    per = {
        "mean_eu_star": [np.mean(r["eu_star"]) for r in rows],
        "max_eu_star": [np.max(r["eu_star"]) for r in rows],
        "mean_nll": [np.mean(r["nll"]) for r in rows],
        "mean_entropy": [np.mean(r["entropy"]) for r in rows],
    }
    per = {k: np.asarray(v) for k, v in per.items()}
    res = {"auroc": {}, "auroc_ci95": {}}
    for name in SCORES:
        m = with_ci(auroc, per[name], y, n=args.bootstrap)
        res["auroc"][name], res["auroc_ci95"][name] = m["value"], m["ci95"]
    res["gap_mean_eu_star_minus_mean_nll"] = with_ci(
        lambda e, n, yy: auroc(e, yy) - auroc(n, yy),
        per["mean_eu_star"],
        per["mean_nll"],
        y,
        n=args.bootstrap,
    )
    res |= {
        "responses": len(rows),
        "wrong": int(y.sum()),
        "tokens": sum(len(r["nll"]) for r in rows),
        "served_tokens": sum(len(r["tokens"]) for r in served["rows"]),
        "ground_truth": family.describe(),
        "served_results": str(args.results),
        "command": "python scripts/served_ground_truth.py " + str(args.results),
        "rows": rows,
    }
    out = args.out or args.results.with_name("ground_truth.json")
    out.write_text(json.dumps(res, indent=1) + "\n")
    for name in SCORES:
        lo, hi = res["auroc_ci95"][name]
        print(f"AUROC {name:14s} {res['auroc'][name]:.3f} [{lo:.3f}, {hi:.3f}]")
    g = res["gap_mean_eu_star_minus_mean_nll"]
    print(f"gap mean EU* − mean nll {g['value']:+.3f} [{g['ci95'][0]:+.3f}, {g['ci95'][1]:+.3f}] -> {out}")


if __name__ == "__main__":
    main()
