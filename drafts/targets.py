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
from drafts.training import (
    RunOptions,
    finish_run,
    loss_summary,
    read_record,
    resolve_device,
    write_record,
)
from server.engine.models import ModelFolderError, count_parameters, load_causal_lm, load_tokenizer


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
    opts: RunOptions = RunOptions(),
    *,
    seed: int = 0,
    init: str | Path | None = None,
) -> dict:
    """Train one target into `out_dir` (from fresh weights, or continuing the model `init`, which
    must use the same tokenizer); returns its training record."""
    if not texts:
        raise ValueError("Cannot train on an empty corpus.")
    tok = load_tokenizer(tokenizer_dir)
    docs = encode_corpus(texts, tok)
    steps = opts.steps or steps_for(docs, opts.batch_size, opts.seq_len, opts.epochs)
    dev = resolve_device(opts.device)
    if init:
        if load_tokenizer(init).get_vocab() != tok.get_vocab():
            raise ModelFolderError(f"Model '{init}' has a different tokenizer from '{tokenizer_dir}'.")
        model = load_causal_lm(init)
    else:
        model = build_lm(shape, tok, seed=seed)
    losses = train_lm(
        model,
        docs,
        steps,
        batch_size=opts.batch_size,
        seq_len=opts.seq_len,
        lr=opts.lr,
        seed=seed,
        progress=opts.progress,
        run_dir=out_dir,
        checkpoint_every=opts.checkpoint_every,
        device=dev,
    )
    save_lm(model.cpu().to(getattr(torch, opts.dtype)), tok, out_dir)
    record = {
        "kind": "target",
        "finished": True,
        "shape": None if init else asdict(shape),
        "init": str(Path(init).resolve()) if init else None,
        "parameters": count_parameters(out_dir),
        "seed": seed,
        "settings": {
            **opts.settings(steps, seed).as_dict(),
            "epochs": opts.epochs,
            "device": str(dev),
            "dtype": opts.dtype,
        },
        "corpus": corpus,
        "loss": loss_summary(losses),
    }
    write_record(out_dir, record)
    finish_run(out_dir)
    return record


def train_ensemble(
    texts: list[str],
    corpus: dict,
    tokenizer_dir: str | Path,
    out_dir: str | Path,
    n: int,
    shape: LMShape,
    opts: RunOptions = RunOptions(),
    *,
    base_seed: int = 0,
) -> list[Path]:
    """N targets seeded base_seed … base_seed+N−1 in out_dir/member{i}; finished ones are kept."""
    if n < 1:
        raise ValueError(f"An ensemble needs at least 1 member (got {n}).")
    members = []
    for i in range(n):
        member = Path(out_dir) / f"member{i}"
        if not is_finished(member):
            train_target(texts, corpus, tokenizer_dir, member, shape, opts, seed=base_seed + i)
        members.append(member)
    return members
