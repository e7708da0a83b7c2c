"""Every per-token score of a token tree (`tree.py`), the expensive ones sharing what they can.

One target pass over the tree gives the target's distribution at every scored position and the
hidden states entering its first noisy layer (the deterministic prefix of the low-rank families
with noise in the last K layers only); every score reuses them:

    ours.eu, ours.bias, ours.variance   the bundle's M drafts against the target (exact, full
                                        vocabulary; the drafts run on each branch's own sequence
                                        through `teacher_forced.forced_draft_logprobs`)
    single.bias                         one draft (the M = 1 ablation)
    entropy, max_prob, nll, logprob     the target's own, H(p), 1 − max p, −log p(x), log p(x)
    eu_star                             EU*: S instances, noise in the last K layers, on the prefix
    upper_bound                         M instances of EU*'s family (other seeds), on the prefix:
                                        the best an M-member estimator of EU* can do
    truth2                              the second ground truth: S₂ instances with noise on the
                                        attention projections of every layer (no draft is
                                        distilled from this family)
    tokur                               the TokUR baseline: S instances, every linear of every layer

Families other than the target's own pass are optional (`None`). Wall time and scored tokens are
counted per score (`Timer`), so the cost of each is measured, not assumed.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np
import torch

from measure.evaluation.noise import LowRankNoise
from measure.evaluation.tree import Tree, head_logprobs, run_body
from server.engine.teacher_forced import forced_draft_logprobs
from server.engine.uncertainty import decompose, entropy, one_minus_max_prob, token_nll


@dataclass
class Timer:
    seconds: dict[str, float] = field(default_factory=lambda: defaultdict(float))
    tokens: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def __call__(self, key: str, n: int, fn):
        t0 = time.perf_counter()
        out = fn()
        self.seconds[key] += time.perf_counter() - t0
        self.tokens[key] += n
        return out

    def per_token(self) -> dict[str, float]:
        """Seconds per scored token of each key that scores tokens."""
        return {k: self.seconds[k] / self.tokens[k] for k in self.seconds if self.tokens[k]}


@dataclass
class Scorer:
    target: torch.nn.Module
    drafts: object  # `models.load_drafts`: a list of causal LMs, or stacked feature drafts
    eu_star: LowRankNoise | None = None
    upper_bound: LowRankNoise | None = None
    truth2: LowRankNoise | None = None
    tokur: LowRankNoise | None = None
    timer: Timer = field(default_factory=Timer)

    def prefix_layer(self) -> int | None:
        """The layer whose input the prefix families share (None when none is run)."""
        layers = {f.prefix_layers for f in (self.eu_star, self.upper_bound) if f is not None}
        if len(layers) > 1:
            raise ValueError(f"EU* and the upper bound must share their noisy layers, got prefixes {layers}")
        return layers.pop() if layers else None

    @torch.inference_mode()
    def score(
        self, tree: Tree, *, truth: bool = True, truth2: bool = True, tokur: bool = True
    ) -> dict[str, np.ndarray]:
        """{key: [T]} for the tree's scored tokens, branches in order. `truth`: EU* and the upper
        bound; `truth2`: the second ground truth; `tokur`: the TokUR baseline."""
        pred, toks, _ = tree.scored()  # [T], [T]
        n = len(toks)
        at = self.prefix_layer() if truth else None
        # 1) the target's one pass: p at the scored positions, the prefix of the noisy layers
        h, prefix = self.timer("target", n, lambda: run_body(self.target, tree, hidden_at=at))
        p = head_logprobs(self.target, h[pred])  # [T, V]
        # 2) the drafts, branch by branch (the served estimator)
        q = self.timer("drafts", n, lambda: self._drafts(tree))  # [T, M, V]
        u = decompose(q, p)
        out = {"ours.eu": u.eu, "ours.bias": u.bias, "ours.variance": u.variance}
        out["single.bias"] = decompose(q[:, :1], p).bias
        nll = token_nll(p, toks)
        out |= {"entropy": entropy(p), "max_prob": one_minus_max_prob(p), "nll": nll, "logprob": -nll}
        # 3) instances of the target
        if truth:
            for key in ("eu_star", "upper_bound"):
                fam = getattr(self, key)
                if fam is not None:
                    out[key] = self.timer(key, n, lambda f=fam: f.mutual_information(tree, pred, prefix))
        for key, wanted in (("truth2", truth2), ("tokur", tokur)):
            fam = getattr(self, key)
            if wanted and fam is not None:
                out[key] = self.timer(key, n, lambda f=fam: f.mutual_information(tree, pred))
        return {k: v.double().numpy() for k, v in out.items()}

    def _drafts(self, tree: Tree) -> torch.Tensor:
        parts = []
        for j, b in enumerate(tree.branches):
            if b.scored_from < len(b.tokens):
                parts.append(forced_draft_logprobs(self.target, self.drafts, *tree.sequence(j)))
        return torch.cat(parts)  # [T, M, V]
