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

from pathlib import Path

import torch

from drafts.folder import TOKENIZER_FILES
from drafts.lm import LMShape, build_lm
from server.engine.draft_vocab import DraftVocab, most_frequent, vocab_digest

EMBED_INITS = ("random", "target")


def choose_vocab(docs: list[list[int]], size: int, tokenizer, target_vocab_size: int) -> DraftVocab:
    """S: the special tokens, then the most frequent ids of `docs`, `size` in all."""
    special = tuple(sorted({int(i) for i in tokenizer.all_special_ids if i is not None}))
    v = most_frequent(docs, size, target_vocab_size, always=special)
    v.tokenizer_digest = vocab_digest(tokenizer.get_vocab())
    return v


def coverage(docs: list[list[int]], vocab: DraftVocab) -> float:
    """Fraction of the tokens of `docs` that lie in S."""
    ids = torch.tensor([t for d in docs for t in d], dtype=torch.long)
    inside = torch.zeros(vocab.target_vocab_size, dtype=torch.bool)
    inside[vocab.target_ids] = True
    return float(inside[ids].float().mean()) if ids.numel() else float("nan")


def build_reduced_draft(
    shape: LMShape, tokenizer, vocab: DraftVocab, seed: int, target=None, embed_init: str = "random"
):
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


def full_vocabulary_copy(draft: str | Path, target: str | Path, out: str | Path) -> Path:
    """A reduced draft rewritten over the target's whole vocabulary, for engines that need the
    target's vocabulary (vLLM's own `draft_model` speculation, the benchmark's baseline).

    Embedding rows outside S are the `unknown` row (the draft reads those tokens as it does
    served); output rows outside S are zero, so those tokens get logit 0 — next to in-S logits
    of typically +10…+20 their mass is small but not 0. Greedy proposals are the reduced
    draft's whenever its best logit is positive. The head is untied and covers V: the cost of a
    draft that cannot use a reduced vocabulary. Tokenizer files are the target's."""
    import shutil

    from transformers import LlamaForCausalLM

    from server.engine.draft_vocab import read_draft_vocab
    from server.engine.models import load_causal_lm

    vocab = read_draft_vocab(draft)
    if vocab is None:
        raise ValueError(f"Draft '{draft}' has no reduced vocabulary to expand.")
    lm = load_causal_lm(draft)
    emb = lm.get_input_embeddings().weight.detach()  # [V_d, E]
    head = lm.get_output_embeddings().weight.detach()  # [V_d, E]
    cfg = lm.config
    cfg.vocab_size, cfg.tie_word_embeddings = vocab.target_vocab_size, False
    big = LlamaForCausalLM(cfg)
    state = {
        k: v for k, v in lm.state_dict().items() if k not in ("model.embed_tokens.weight", "lm_head.weight")
    }
    full_emb = emb[vocab.to_draft_ids].clone()  # [V, E]: unknown's row outside S
    full_head = torch.zeros(vocab.target_vocab_size, emb.shape[1], dtype=head.dtype)
    full_head[vocab.target_ids] = head
    state["model.embed_tokens.weight"], state["lm_head.weight"] = full_emb, full_head
    big.load_state_dict(state)
    out = Path(out)
    big.to(lm.dtype).save_pretrained(str(out), safe_serialization=True)
    for name in (*TOKENIZER_FILES, "generation_config.json"):
        if (Path(target) / name).exists():
            shutil.copy2(Path(target) / name, out / name)
    return out
