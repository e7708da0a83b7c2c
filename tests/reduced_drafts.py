"""Reduced-vocabulary copies of the tiny drafts, built on the fly: every weight is kept and the
embedding / output rows are those of a subset S of the vocabulary, so on S the copy's logits are
exactly the original's (its distribution is the original's renormalized over S)."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from server.engine.draft_vocab import DraftVocab, vocab_digest
from server.engine.models import load_causal_lm, load_tokenizer, model_config


def kept_ids(vocab_size: int, keep: int, seed: int = 0) -> list[int]:
    """The special ids 0–2 and a seeded random subset: `keep` target ids, S's order."""
    rest = list(range(3, vocab_size))
    random.Random(seed).shuffle(rest)
    return [0, 1, 2, *sorted(rest[: keep - 3])]


def reduced_copy(draft: str | Path, target: str | Path, out: str | Path, ids: list[int]) -> Path:
    from transformers import LlamaForCausalLM

    out = Path(out)
    if (out / "draft_vocab.json").is_file():
        return out
    lm = load_causal_lm(draft)
    cfg = lm.config
    cfg.vocab_size = len(ids)
    small = LlamaForCausalLM(cfg)
    state = lm.state_dict()
    sel = torch.tensor(ids)
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        state[name] = state[name][sel].clone()
    small.load_state_dict(state)
    small.save_pretrained(str(out), safe_serialization=True)
    DraftVocab(
        sel, int(model_config(target)["vocab_size"]), 0, vocab_digest(load_tokenizer(target).get_vocab())
    ).save(out)
    return out


def reduced_drafts(tiny: dict, root: str | Path, keep: int | None = None) -> list[str]:
    """Reduced copies of tiny["drafts"] sharing one S (half the vocabulary by default)."""
    vocab = int(model_config(tiny["target"])["vocab_size"])
    ids = kept_ids(vocab, keep or vocab // 2)
    return [
        str(reduced_copy(d, tiny["target"], Path(root) / f"reduced{m}", ids))
        for m, d in enumerate(tiny["drafts"])
    ]
