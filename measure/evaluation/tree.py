"""A question's scored continuations as one token tree, run in one forward per model instance.

Every cut of a GSM8K reference solution (`forced_labels.py`) is the same prompt and solution up
to a point, then a few tokens of the target's own. Scoring each cut as its own sequence runs the
shared text once per cut; the tree runs it once:

    trunk      prompt + the solution's tokens up to the last cut           [T0]
    branch j   context trunk[:shared_j], then its own tokens               [n_j]
               (the cut's last prefix tokens where its own tokenization departs from the
               trunk's, then the generated tokens), tokens[scored_from:] scored

Laid out as one sequence [trunk; branch_1; …] (N = T0 + Σ n_j) with position ids shared_j + i
for branch j's token i and an attention mask in which a branch sees trunk[:shared_j] and its own
earlier tokens only. A causal LM run over it gives, at every position, exactly the distribution
the branch's own flat sequence gives there (tests check it against flat sequences). The token
at branch offset i is predicted by the output at the tree position of the token before it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass(frozen=True)
class Branch:
    shared: int  # trunk tokens this branch continues
    tokens: list[int]  # its own tokens after them
    scored_from: int = 0  # tokens[scored_from:] are scored

    def __post_init__(self) -> None:
        if self.shared < 1 or not 0 <= self.scored_from <= len(self.tokens):
            raise ValueError(f"a branch needs shared >= 1 and 0 <= scored_from <= {len(self.tokens)}")


@dataclass
class Tree:
    trunk: list[int]
    branches: list[Branch] = field(default_factory=list)

    def __post_init__(self) -> None:
        need = max((b.shared for b in self.branches), default=len(self.trunk))
        if need > len(self.trunk):
            raise ValueError(f"a branch shares {need} trunk tokens; the trunk has {len(self.trunk)}")
        self.trunk = self.trunk[:need]  # trunk tokens no branch sees are not run

    def __len__(self) -> int:
        return len(self.trunk) + sum(len(b.tokens) for b in self.branches)

    def offsets(self) -> list[int]:
        """Tree index of each branch's first token."""
        out, at = [], len(self.trunk)
        for b in self.branches:
            out.append(at)
            at += len(b.tokens)
        return out

    def ids(self) -> torch.Tensor:
        """[N]"""
        return torch.tensor(self.trunk + [t for b in self.branches for t in b.tokens])

    def positions(self) -> torch.Tensor:
        """[N] each token's position in its own flat sequence."""
        pos = list(range(len(self.trunk)))
        for b in self.branches:
            pos += range(b.shared, b.shared + len(b.tokens))
        return torch.tensor(pos)

    def allowed(self) -> torch.Tensor:
        """[N, N] bool: query i may attend to key j."""
        n, t0 = len(self), len(self.trunk)
        ok = torch.zeros(n, n, dtype=torch.bool)
        ok[:t0, :t0] = torch.ones(t0, t0, dtype=torch.bool).tril()
        for b, at in zip(self.branches, self.offsets(), strict=True):
            k = len(b.tokens)
            ok[at : at + k, : b.shared] = True
            ok[at : at + k, at : at + k] = torch.ones(k, k, dtype=torch.bool).tril()
        return ok

    def mask(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """[1, 1, N, N] additive attention mask (0 where allowed, the dtype's minimum elsewhere):
        transformers uses a 4-D mask as given, in its eager and SDPA attention alike."""
        return torch.zeros((), dtype=dtype).masked_fill(~self.allowed(), torch.finfo(dtype).min)[None, None]

    def scored(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(tree index of the output that predicts each scored token [T], the tokens [T], the
        branch of each [T]), branches in order."""
        pred, toks, which = [], [], []
        for j, (b, at) in enumerate(zip(self.branches, self.offsets(), strict=True)):
            for i in range(b.scored_from, len(b.tokens)):
                pred.append(at + i - 1 if i else b.shared - 1)
                toks.append(b.tokens[i])
                which.append(j)
        return torch.tensor(pred, dtype=torch.long), torch.tensor(toks, dtype=torch.long), torch.tensor(which)

    def sequence(self, j: int) -> tuple[list[int], int]:
        """Branch j as its own flat sequence, and the index of its first scored token."""
        b = self.branches[j]
        return self.trunk[: b.shared] + b.tokens, b.shared + b.scored_from


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


def branch_on(trunk: list[int], own: list[int], generated: list[int]) -> Branch:
    """The branch whose flat sequence is own + generated (own: the context tokenized on its own,
    which may depart from the trunk in its last tokens), scoring the generated tokens."""
    shared = common_prefix(trunk, own)
    if shared == len(own):  # the first generated token is predicted from trunk[shared - 1]
        return Branch(shared, list(generated), 0)
    return Branch(shared, own[shared:] + list(generated), len(own) - shared)


@torch.inference_mode()
def run_body(model, tree: Tree, *, hidden_at: int | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The causal LM's final hidden states over the tree [N, E] (after its final norm), and with
    `hidden_at` = k the hidden states entering decoder layer k [N, E] (`TeacherSampler.prefix`'s
    value when k = L − K)."""
    out = model.model(
        input_ids=tree.ids()[None],
        position_ids=tree.positions()[None],
        attention_mask=tree.mask(next(model.parameters()).dtype),
        use_cache=False,
        output_hidden_states=hidden_at is not None,
    )
    h = out.last_hidden_state[0]  # [N, E]
    return h, (out.hidden_states[hidden_at][0] if hidden_at is not None else None)


def head_logprobs(model, hidden: torch.Tensor) -> torch.Tensor:
    """log-softmax of the LM head over rows of final hidden states. [T, E] -> [T, V]"""
    w = model.get_output_embeddings().weight  # [V, E]
    return torch.log_softmax((hidden @ w.T).float(), dim=-1)
