"""Synthetic distillation data: continuations sampled from the target for the prompts of a corpus.

A GSM8K document's prompt is its question up to "Answer: "; any other text's prompt is its first
half. Sampling is plain ancestral sampling at temperature 1 (the target's own distribution), in
left-padded batches, up to `max_new_tokens` or the end-of-sequence token.
"""

from __future__ import annotations

import torch

from drafts.corpus import ANSWER_PREFIX
from drafts.lm import generate_batch


def prompt_of(text: str) -> str:
    cut = text.find(ANSWER_PREFIX)
    return text[: cut + len(ANSWER_PREFIX)] if cut >= 0 else text[: max(1, len(text) // 2)]


def sample_continuations(
    model, tokenizer, prompts: list[str], *, max_new_tokens: int = 128, batch_size: int = 32, seed: int = 0
) -> list[list[int]]:
    """[bos] + prompt ids + sampled ids (+ eos when sampled), one list per prompt."""
    torch.manual_seed(seed)
    out: list[list[int]] = []
    for i in range(0, len(prompts), batch_size):
        ids = [
            [tokenizer.bos_token_id, *tokenizer(p, add_special_tokens=False)["input_ids"]]
            for p in prompts[i : i + batch_size]
        ]
        new = generate_batch(
            model, tokenizer, ids, max_new_tokens, do_sample=True, temperature=1.0, top_k=0, top_p=1.0
        )
        out.extend(x + y for x, y in zip(ids, new, strict=True))
    return out
