"""The exact EU of a given token sequence, by teacher forcing: the ground truth that the
engines' streamed numbers are checked against (tests, `epispec bench`, `epispec eval`).

Teacher forcing gives, at each position, exactly the distributions that decoding saw for the
same tokens (drafts and target are causal LMs over the same prefix), so one full forward per
model scores a whole sequence. For a sequence `ids` and the first scored index `start`, the
token ids[t], t ∈ [start, L), is scored with the distributions of the prefix ids[:t]; the
logits at index t − 1 predict it. Raw distributions (temperature 1), float32, full vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from server.engine.uncertainty import Uncertainty, decompose


@dataclass
class TeacherForced:
    target: torch.Tensor  # [T, V] the target's log-probs at the scored positions
    drafts: torch.Tensor  # [T, M, V] every draft's
    uncertainty: Uncertainty  # each [T]: exact bias, variance, eu

    def token_logprobs(self, tokens: list[int]) -> torch.Tensor:
        """The target's raw log-prob of each scored token. [T]"""
        return self.target[torch.arange(len(tokens)), torch.tensor(tokens)]


@torch.inference_mode()
def forced_logprobs(model, ids: list[int], start: int) -> torch.Tensor:
    """Log-probs of every next token from ids[start] on, one forward over ids. -> [L − start, V]"""
    if not 1 <= start <= len(ids):
        raise ValueError(f"start must be in [1, {len(ids)}], got {start}")
    logits = model(input_ids=torch.tensor([ids])).logits[0, start - 1 : len(ids) - 1]  # [T, V]
    return torch.log_softmax(logits.float(), -1)


def forced_member_logprobs(members: list, ids: list[int], start: int) -> torch.Tensor:
    """`forced_logprobs` of every member of an ensemble, stacked. -> [T, M, V]"""
    return torch.stack([forced_logprobs(m, ids, start) for m in members], 1)


def teacher_forced(target, drafts: list, prompt_ids: list[int], tokens: list[int]) -> TeacherForced:
    """Exact bias, variance and eu of every generated token (`tokens` after `prompt_ids`); drafts
    of either kind (`models.load_drafts`)."""
    ids, start = [*prompt_ids, *tokens], len(prompt_ids)
    p = forced_logprobs(target, ids, start)  # [T, V]
    q = forced_draft_logprobs(target, drafts, ids, start)  # [T, M, V]
    return TeacherForced(p, q, decompose(q, p))


@torch.inference_mode()
def forced_feature_logprobs(target, drafts, ids: list[int], start: int) -> torch.Tensor:
    """Feature drafts' log-probs of every next token from ids[start] on, each position reading the
    target's own features (as served). drafts: `feature_draft.FeatureDrafts`. -> [T, M, V]"""
    from server.engine.feature_draft import shifted_features
    from server.engine.stacked_layers import causal_attend

    if not 1 <= start <= len(ids):
        raise ValueError(f"start must be in [1, {len(ids)}], got {start}")
    x = torch.tensor([ids])  # [1, L]
    f = target.model(input_ids=x, use_cache=False).last_hidden_state.float()  # [1, L, E]
    pos = torch.arange(len(ids))[None]  # [1, L]
    cols = torch.arange(start - 1, len(ids) - 1)  # positions whose outputs predict ids[start:]
    lq, _ = drafts(x, shifted_features(f), pos, causal_attend(drafts.scale), (torch.zeros_like(cols), cols))
    return lq if drafts.vocab is None else drafts.vocab.expand(lq)  # [T, M, V]


def forced_draft_logprobs(target, drafts, ids: list[int], start: int) -> torch.Tensor:
    """The drafts' log-probs of every next token from ids[start] on, whatever their kind
    (`models.load_drafts`: stacked feature drafts, or a list of causal LMs). -> [T, M, V]"""
    if isinstance(drafts, list):
        return forced_member_logprobs(drafts, ids, start)
    return forced_feature_logprobs(target, drafts, ids, start)
