"""Drafts with a reduced output vocabulary (`server/engine/draft_vocab.py`), built for a target.

A draft reads and predicts only S, the `size` most frequent target ids of its training data plus
the target's special tokens; target tokens outside S are read as draft token 0 (a special token).
Its distillation target is the teacher's distribution renormalized over S,
p_S(x) = p(x) / p(S) for x ∈ S, and the loss is KL(p_S ‖ q): the draft is trained to be the
target conditioned on S (as EAGLE-3 trains its reduced head). Served, q is 0 outside S, so bias
= KL(q̄ ‖ p) includes log 1/p(S) where the target puts mass outside S.

`embed_init="target"` starts the draft's (tied) embedding from the target's rows of S projected
onto their top principal components, rescaled to the draft's initial scale: the draft starts
with the target's token geometry instead of noise.
"""

from __future__ import annotations

import torch

from drafts.lm import LMShape, build_lm
from server.engine.draft_vocab import DraftVocab, most_frequent, tokenizer_digest

EMBED_INITS = ("random", "target")


def choose_vocab(docs: list[list[int]], size: int, tokenizer, target_vocab_size: int) -> DraftVocab:
    """S: the special tokens, then the most frequent ids of `docs`, `size` in all."""
    special = tuple(sorted({int(i) for i in tokenizer.all_special_ids if i is not None}))
    v = most_frequent(docs, size, target_vocab_size, always=special)
    v.tokenizer_digest = tokenizer_digest(tokenizer)
    return v


def coverage(docs: list[list[int]], vocab: DraftVocab) -> float:
    """Fraction of the tokens of `docs` that lie in S."""
    ids = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    inside = torch.zeros(vocab.target_vocab_size, dtype=torch.bool)
    inside[vocab.target_ids] = True
    return float(inside[ids].float().mean()) if ids.numel() else float("nan")


def build_reduced_draft(shape: LMShape, tokenizer, vocab: DraftVocab, seed: int, target=None,
                        embed_init: str = "random"):
    """A Llama draft over S (vocab_size = |S|), embedding initialized per `embed_init`."""
    if embed_init not in EMBED_INITS:
        raise ValueError(f"embed_init must be one of {', '.join(EMBED_INITS)}, not '{embed_init}'.")
    lm = build_lm(shape, tokenizer, seed, vocab_size=vocab.size)
    if embed_init == "target":
        if target is None:
            raise ValueError("embed_init 'target' needs the target model.")
        emb = target.get_input_embeddings().weight.detach().float()[vocab.target_ids]  # [V_d, E_t]
        centred = emb - emb.mean(0)
        _, _, v = torch.linalg.svd(centred, full_matrices=False)  # v [E_t', E_t]
        k = min(shape.hidden, v.shape[0])
        proj = centred @ v[:k].T  # [V_d, k]
        w = torch.zeros(vocab.size, shape.hidden)
        w[:, :k] = proj
        w *= lm.config.initializer_range / w.std().clamp(min=1e-8) * 4  # a little above init scale
        with torch.no_grad():
            lm.get_input_embeddings().weight.copy_(w)
    return lm


class ReducedStudent(torch.nn.Module):
    """Training view of a reduced draft: reads target ids, returns log-probs over S. [B, S] -> [B, S, V_d]"""

    def __init__(self, lm, vocab: DraftVocab) -> None:
        super().__init__()
        self.lm, self.vocab = lm, vocab

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        logits = self.lm(input_ids=self.vocab.to_draft(input_ids)).logits
        return torch.log_softmax(logits.float(), -1)
