"""Response-level detection on the generated arithmetic set (`arithmetic.py`): the target's greedy
answers, their labels, and response scores from the per-token scores.

1) answers   greedy, batched (left-padded), at most `max_new_tokens`, cut at the end of turn
2) tokens    every answer token scored teacher-forced (`tree_scores.Scorer` over a one-branch
             tree: prompt, then the answer), TokUR on test only (no ground truth: the answers
             are labelled exactly)
3) scores    per response, the mean and the max over its tokens of eu, bias, variance, entropy
             and TokUR (`mean.eu`, `max.eu`, …); label 1 when the stated answer is not the exact one
"""

from __future__ import annotations

import numpy as np
import torch
from tqdm import tqdm

from measure.evaluation.arithmetic import Problem
from measure.evaluation.labels import stated_answer
from measure.evaluation.tree import Branch, Tree
from measure.evaluation.tree_scores import Scorer

TOKEN_KEYS = {
    "eu": "ours.eu",
    "bias": "ours.bias",
    "variance": "ours.variance",
    "entropy": "entropy",
    "tokur": "tokur",
}
RESPONSE_SCORES = {f"{agg}_{name}": f"{agg}.{name}" for name in TOKEN_KEYS for agg in ("mean", "max")}


@torch.inference_mode()
def answers(
    target, tokenizer, prompts: list[list[int]], max_new_tokens: int, stop_ids: set[int], batch: int = 8
) -> list[list[int]]:
    """Greedy answers (end of turn excluded), `batch` prompts at a time, left-padded."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else min(stop_ids)
    out = []
    for i in range(0, len(prompts), batch):
        chunk = prompts[i : i + batch]
        width = max(map(len, chunk))
        x = torch.tensor([[pad] * (width - len(p)) + p for p in chunk])  # [B, W]
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in chunk])  # [B, W]
        gen = target.generate(
            input_ids=x,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=max_new_tokens,
            eos_token_id=sorted(stop_ids),
            pad_token_id=pad,
        )[:, width:].tolist()
        for g in gen:
            out.append(g[: next((k for k, t in enumerate(g) if t in stop_ids), len(g))])
    return out


def run(
    scorer: Scorer,
    tokenizer,
    problems: list[Problem],
    prompt_ids,
    *,
    max_new_tokens: int,
    stop_ids: set[int],
    baselines: bool,
    desc: str,
) -> dict:
    """{"labels" [n], "scores" {RESPONSE_SCORES key: [n]}, "tokens" [{key: [T]}], "texts", "levels"}
    over the problems whose answer is not empty. `prompt_ids(text)` builds a prompt."""
    prompts = [prompt_ids(p.prompt()) for p in problems]
    gens = scorer.timer(
        "answers", 0, lambda: answers(scorer.target, tokenizer, prompts, max_new_tokens, stop_ids)
    )
    labels, tokens, texts, levels = [], [], [], []
    for p, prompt, gen in tqdm(
        list(zip(problems, prompts, gens, strict=True)), desc=desc, unit="resp", dynamic_ncols=True
    ):
        if not gen:
            continue
        text = tokenizer.decode(gen)
        tokens.append(
            scorer.score(Tree(prompt, [Branch(len(prompt), gen)]), truth=False, truth2=False, tokur=baselines)
        )
        labels.append(int(stated_answer(text) != p.answer))
        texts.append(text)
        levels.append(p.level)
    return {
        "labels": np.array(labels, dtype=int),
        "scores": response_scores(tokens),
        "tokens": tokens,
        "texts": texts,
        "levels": np.array(levels, dtype=int),
    }


def response_scores(tokens: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
    """Mean and max over each response's tokens of the keys of TOKEN_KEYS it has. -> {name: [n]}"""
    out = {}
    for name, key in TOKEN_KEYS.items():
        if tokens and key in tokens[0]:
            out[f"mean_{name}"] = np.array([t[key].mean() for t in tokens])
            out[f"max_{name}"] = np.array([t[key].max() for t in tokens])
    return out


def by_level(levels: np.ndarray, labels: np.ndarray) -> dict[str, dict]:
    """Responses and their error rate per difficulty level."""
    return {
        str(int(lv)): {"responses": int((levels == lv).sum()), "wrong": int(labels[levels == lv].sum())}
        for lv in np.unique(levels)
    }
