"""Token labels on a target that writes no calculator annotations of its own: teacher-forced up
to `<<expr=`.

A pretrained chat target (SmolLM2) answers GSM8K in prose, so its free generations carry no
`<<expr=result>>` to check (`labels.py`). Instead, for every checkable annotation of the
*reference* solution, the target is fed the question (as its chat prompt builds it) and the
reference solution up to and including that annotation's `<<expr=`, and greedily writes the
result itself (raw argmax, no sampling or logit processing) until `>>`, its end of turn or
`max_tokens`. The result is right when it equals the exact value of `expr` (`labels.safe_eval`).

    result        the generated text before the first `>>`; when `>>` never comes, the number
                  the text starts with (`24 clips` -> `24`), else nothing
    wrong         1 when `parse_number(result)` differs from `safe_eval(expr)` or does not parse
                  (`2 dozen>>`, an empty result), else 0
    token labels  `wrong` on every generated token that overlaps the result's characters (a
                  token `4>>` counts; for an empty result, the first token); the tokens after
                  them get no label

The scored positions are the generated tokens (teacher forcing over prefix + generation gives
exactly the distributions the greedy decode saw, `server.engine.teacher_forced`).

`forced_tree` decodes the cuts of one solution over one KV cache (the shared text is run once,
the cache cropped back to each cut) and returns them as one `tree.Tree`, which every score then
runs in one forward.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from measure.evaluation.labels import _ANNOTATION, parse_number, safe_eval
from measure.evaluation.tree import Tree, branch_on, common_prefix

_LEADING_NUMBER = re.compile(r"\s*\$?-?(?:\d[\d,]*(?:\.\d+)?|\.\d+)%?")


@dataclass(frozen=True)
class Cut:
    """One annotation of a reference solution: the text fed before the result, and its truth."""

    prefix: str  # the solution up to and including `<<expr=`
    expr: str
    truth: str  # the exact value of expr, as a fraction string


def cuts(solution: str) -> list[Cut]:
    """The annotations of `solution` whose expression evaluates, in order."""
    out = []
    for m in _ANNOTATION.finditer(solution):
        truth = safe_eval(m.group(1))
        if truth is not None:
            out.append(Cut(solution[: m.start(2)], m.group(1), str(truth)))
    return out


@dataclass
class ForcedResult:
    """The target's greedy result after one cut, with its labels."""

    question: int
    cut: Cut
    ids: list[int]  # prompt + prefix + generated tokens
    start: int  # index of the first generated token
    pieces: list[str]  # the decoded generated tokens
    result: str
    wrong: int
    labels: list[int | None]  # per generated token


def label_result(pieces: list[str], truth: str) -> tuple[str, int, list[int | None]]:
    """(result, wrong, per-token labels) of generated token texts after `<<expr=` whose exact value
    is `truth` (a fraction string, as `Cut.truth`)."""
    value = Fraction(truth)
    text = "".join(pieces)
    end = text.find(">>")
    if end >= 0:
        result = text[:end]
    else:  # never closed: the number it starts with, if any
        m = _LEADING_NUMBER.match(text)
        result = m.group(0) if m else ""
    got = parse_number(result)
    wrong = int(got is None or got != value)
    span = max(len(result), 1)  # an empty result: its first token is the wrong one
    labels: list[int | None] = []
    pos = 0
    for p in pieces:
        a, b = pos, pos + len(p)
        pos = b
        labels.append(wrong if a < span and a < b else None)
    return result, wrong, labels


@torch.no_grad()
def greedy_until_close(
    target, tokenizer, ids: list[int], max_tokens: int, stop_ids: set[int], cache=None, cached: int = 0
) -> tuple[list[int], list[str]]:
    """The target's argmax continuation of `ids` (raw logits, KV-cached) until its text contains
    `>>`, a token of `stop_ids` (not kept) or `max_tokens` tokens. -> (token ids, their texts)

    With `cache` (a transformers cache holding the keys and values of ids[:cached], cached <
    len(ids)) only the rest is fed; the cache then holds every token fed, a prefix of ids + gen."""
    from transformers import DynamicCache

    cache = DynamicCache() if cache is None else cache
    gen: list[int] = []
    pieces: list[str] = []
    x = ids[cached:]
    for _ in range(max_tokens):
        out = target(input_ids=torch.tensor([x]), past_key_values=cache, use_cache=True, logits_to_keep=1)
        t = int(out.logits[0, -1].argmax())
        if t in stop_ids:
            break
        gen.append(t)
        pieces.append(tokenizer.decode([t]))
        if ">>" in "".join(pieces):
            break
        x = [t]
    return gen, pieces


@torch.no_grad()
def forced_tree(
    question: int,
    prompt_ids: list[int],
    solution: str,
    target,
    tokenizer,
    *,
    max_tokens: int = 12,
    stop_ids: set[int] | None = None,
    max_cuts: int | None = None,
) -> tuple[Tree, list[ForcedResult]]:
    """The cuts of `solution` (its first `max_cuts`, or all) after `prompt_ids`, each with the
    target's labelled greedy result, decoded over one KV cache; cuts where the target writes
    nothing (its first token ends the turn) are left out. And the tree of their scored branches
    (one per result, in order; trunk = prompt + the solution up to the last cut).

    The cache holds a prefix of what was fed; for each cut it is cropped to the longest prefix it
    shares with the cut's context (at least one token is fed anew, for the next-token logits)."""
    from transformers import DynamicCache

    stop = stop_ids if stop_ids is not None else {tokenizer.eos_token_id}
    chosen = cuts(solution)[:max_cuts]
    owns = [(c, prompt_ids + tokenizer(c.prefix, add_special_tokens=False)["input_ids"]) for c in chosen]
    if not owns:
        return Tree(list(prompt_ids)), []
    trunk = max((o for _, o in owns), key=len)
    cache, fed = DynamicCache(), []  # fed: the tokens whose keys and values the cache holds
    results, branches = [], []
    for c, own in owns:
        keep = min(common_prefix(fed, own), len(own) - 1)
        if len(fed) > keep:
            cache.crop(keep - len(fed))  # drop the tokens after `keep`
        gen, pieces = greedy_until_close(target, tokenizer, own, max_tokens, stop, cache, keep)
        fed = (own + gen)[: cache.get_seq_length()]
        if not gen:
            continue
        result, wrong, labels = label_result(pieces, c.truth)
        results.append(ForcedResult(question, c, own + gen, len(own), pieces, result, wrong, labels))
        branches.append(branch_on(trunk, own, gen))
    return Tree(trunk, branches), results
