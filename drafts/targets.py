"""Training targets: one small causal LM on a corpus, or a deep ensemble of independently seeded
ones (the ground truth `p_1 … p_N` of the evaluation).

Each finished model folder holds the HF weights, the tokenizer and `training.json` (shape,
settings, seed, corpus identity, losses). An interrupted run resumes from its checkpoint; an
ensemble skips members that are already finished.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import torch

from drafts.lm import LMShape, build_lm, encode_corpus, save_lm, train_lm
from drafts.training import finish_run, loss_summary, read_record, resolve_device, write_record
from server.engine.models import count_parameters, load_tokenizer


def steps_for(docs: list[list[int]], batch_size: int, seq_len: int, epochs: float) -> int:
    """Optimizer steps that cover the corpus `epochs` times with packed windows."""
    tokens = sum(len(d) for d in docs)
    return max(1, int(epochs * tokens / (batch_size * (seq_len + 1))))


def is_finished(model_dir: str | Path) -> bool:
    return bool(read_record(model_dir).get("finished"))


def train_target(
    texts: list[str],
    corpus: dict,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    shape: LMShape,
    *,
    epochs: float = 1.0,
    steps: int | None = None,
    batch_size: int = 16,
    seq_len: int = 128,
    lr: float = 3e-3,
    seed: int = 0,
    device: str = "cpu",
    checkpoint_every: int = 200,
    dtype: str = "float32",
    progress: bool = False,
) -> dict:
    """Train one target into `out_dir`; returns its training record."""
    if not texts:
        raise ValueError("Cannot train on an empty corpus.")
    tok = load_tokenizer(tokenizer_dir)
    docs = encode_corpus(texts, tok)
    steps = steps or steps_for(docs, batch_size, seq_len, epochs)
    dev = resolve_device(device)
    model = build_lm(shape, tok, seed=seed)
    losses = train_lm(model, docs, steps, batch_size=batch_size, seq_len=seq_len, lr=lr, seed=seed,
                      progress=progress, run_dir=out_dir, checkpoint_every=checkpoint_every, device=dev)
    save_lm(model.cpu().to(getattr(torch, dtype)), tok, out_dir)
    record = {
        "kind": "target",
        "finished": True,
        "shape": asdict(shape),
        "parameters": count_parameters(out_dir),
        "seed": seed,
        "settings": {"steps": steps, "epochs": epochs, "batch_size": batch_size, "seq_len": seq_len,
                     "lr": lr, "device": str(dev), "dtype": dtype},
        "corpus": corpus,
        "loss": loss_summary(losses),
    }
    write_record(out_dir, record)
    finish_run(out_dir)
    return record


def train_ensemble(texts: list[str], corpus: dict, tokenizer_dir: str | Path, out_dir: str | Path,
                   n: int, *, base_seed: int = 0, **kwargs) -> list[Path]:
    """N targets seeded base_seed … base_seed+N−1 in out_dir/member{i}; finished ones are kept."""
    if n < 1:
        raise ValueError(f"An ensemble needs at least 1 member (got {n}).")
    members = []
    for i in range(n):
        member = Path(out_dir) / f"member{i}"
        if not is_finished(member):
            train_target(texts, corpus, tokenizer_dir, member, seed=base_seed + i, **kwargs)
        members.append(member)
    return members
