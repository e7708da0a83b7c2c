"""A draft's reduced vocabulary: a subset S of the target's token ids that the draft reads and predicts.

A draft with a reduced vocabulary is a plain Hugging Face causal LM whose own vocabulary is
S (|S| = V_d, usually a few thousand of the target's most frequent tokens), plus a file
`draft_vocab.json` beside its config:

    {"version": 1, "target_vocab_size": V, "target_ids": [...V_d ids...],
     "unknown": u, "tokenizer_digest": "..."}

`target_ids[d]` is the target id of draft token d (the "d2t" map of EAGLE-3-style drafts);
a target token outside S is read by the draft as draft token `unknown`. The draft's distribution
over the target vocabulary is q(x) = q_d(x) for x ∈ S and 0 elsewhere, so every EU quantity is
computed on the target's ids unchanged: variance is a divergence among distributions that share
the support S, and bias = KL(q̄ ‖ p) sums over S only (q̄ = 0 elsewhere contributes 0). Why: the
output head over the target's 49,152 tokens dominates a small draft's step; over S it costs
|S|/V of that (see scripts/bench_draft_shapes.py).

Errors: `DraftVocabError` (a ValueError) for a malformed map.
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

FILE = "draft_vocab.json"
VERSION = 1


class DraftVocabError(ValueError):
    """draft_vocab.json is malformed or does not fit the draft or the target."""


def vocab_digest(vocab: dict[str, int]) -> str:
    """An identity of a tokenizer's vocabulary (`tokenizer.get_vocab()`): sha256 of its (token, id)
    pairs in id order, 16 hex digits."""
    items = sorted(vocab.items(), key=lambda kv: kv[1])
    return hashlib.sha256(json.dumps(items).encode()).hexdigest()[:16]


@dataclass
class DraftVocab:
    target_ids: torch.Tensor  # [V_d] long: target id of each draft token
    target_vocab_size: int  # V
    unknown: int  # draft id read for target tokens outside S
    tokenizer_digest: str | None = None

    def __post_init__(self) -> None:
        ids = self.target_ids
        if ids.dim() != 1 or ids.numel() == 0:
            raise DraftVocabError("target_ids must be a non-empty list of target token ids.")
        if int(ids.min()) < 0 or int(ids.max()) >= self.target_vocab_size:
            raise DraftVocabError(f"target_ids must lie in [0, {self.target_vocab_size}).")
        if ids.unique().numel() != ids.numel():
            raise DraftVocabError("target_ids must not repeat a token.")
        if not 0 <= self.unknown < ids.numel():
            raise DraftVocabError(f"unknown must be a draft id in [0, {ids.numel()}), got {self.unknown}.")
        # [V] long: draft id of each target token (unknown outside S)
        self.to_draft_ids = torch.full((self.target_vocab_size,), self.unknown, dtype=torch.long)
        self.to_draft_ids[ids] = torch.arange(ids.numel())

    @property
    def size(self) -> int:
        return self.target_ids.numel()

    def to_draft(self, target_ids: torch.Tensor) -> torch.Tensor:
        """Target ids as the draft reads them. [...] long -> [...] long"""
        return self.to_draft_ids.to(target_ids.device)[target_ids]

    def to_target(self, draft_ids: torch.Tensor) -> torch.Tensor:
        """Draft ids as target ids. [...] -> [...] long"""
        return self.target_ids.to(draft_ids.device)[draft_ids.long()]

    def expand(self, draft_logprobs: torch.Tensor) -> torch.Tensor:
        """Draft log-probs over S as log-probs over the target vocabulary (−inf outside S).
        [..., V_d] -> [..., V]"""
        out = draft_logprobs.new_full((*draft_logprobs.shape[:-1], self.target_vocab_size), -math.inf)
        out[..., self.target_ids.to(draft_logprobs.device)] = draft_logprobs
        return out

    def same_as(self, other: DraftVocab | None) -> bool:
        return (
            other is not None
            and self.unknown == other.unknown
            and torch.equal(self.target_ids, other.target_ids)
        )

    def to_json(self) -> dict:
        return {
            "version": VERSION,
            "target_vocab_size": self.target_vocab_size,
            "target_ids": self.target_ids.tolist(),
            "unknown": self.unknown,
            "tokenizer_digest": self.tokenizer_digest,
        }

    def save(self, folder: str | Path) -> Path:
        path = Path(folder) / FILE
        path.write_text(json.dumps(self.to_json()) + "\n")
        return path


def read_draft_vocab(folder: str | Path) -> DraftVocab | None:
    """The draft's reduced vocabulary, or None for a draft that uses the target's whole vocabulary."""
    path = Path(folder) / FILE
    if not path.is_file():
        return None
    try:
        raw = json.loads(path.read_text())
        if raw.get("version") != VERSION:
            raise DraftVocabError(f"version {raw.get('version')} is not supported (expected {VERSION})")
        return DraftVocab(
            torch.tensor(raw["target_ids"], dtype=torch.long),
            int(raw["target_vocab_size"]),
            int(raw["unknown"]),
            raw.get("tokenizer_digest"),
        )
    except (KeyError, TypeError, json.JSONDecodeError, DraftVocabError) as exc:
        raise DraftVocabError(f"'{path}' is not a valid draft vocabulary: {exc}") from exc


def most_frequent(
    docs: list[list[int]], size: int, target_vocab_size: int, always: tuple[int, ...] = ()
) -> DraftVocab:
    """S = `always` (e.g. the special tokens) + the most frequent ids of `docs`, up to `size`;
    ties broken by id. `unknown` is draft id 0: the smallest id of `always` (else the most frequent)."""
    counts = torch.bincount(
        torch.tensor([t for d in docs for t in d], dtype=torch.long), minlength=target_vocab_size
    ).float()  # [V]
    counts[list(always)] = math.inf
    order = torch.argsort(-counts, stable=True)[:size]  # [V_d]
    keep = order[counts[order] > 0]
    return DraftVocab(keep, target_vocab_size, 0)


class FullVocabularyDraft(torch.nn.Module):
    """A reduced-vocabulary draft seen as a model over the target's vocabulary: reads target ids,
    returns logits [B, T, V] that are the draft's log-probs on S and −inf elsewhere (so
    log_softmax of them is the draft's distribution). Used where drafts are run as plain
    transformers models (reference engine, evaluation); the proposer maps natively."""

    def __init__(self, lm, vocab: DraftVocab) -> None:
        super().__init__()
        self.lm, self.vocab = lm, vocab
        self.config = lm.config

    def forward(self, input_ids: torch.Tensor, **kwargs):
        out = self.lm(input_ids=self.vocab.to_draft(input_ids), **kwargs)
        out.logits = self.vocab.expand(torch.log_softmax(out.logits.float(), -1))
        return out
