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
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from fractions import Fraction

import torch

from measure.evaluation.labels import _ANNOTATION, parse_number, safe_eval

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
    target, tokenizer, ids: list[int], max_tokens: int, stop_ids: set[int]
) -> tuple[list[int], list[str]]:
    """The target's argmax continuation of `ids` (raw logits, KV-cached) until its text contains
    `>>`, a token of `stop_ids` (not kept) or `max_tokens` tokens. -> (token ids, their texts)"""
    out = model_out = None
    gen: list[int] = []
    pieces: list[str] = []
    x = torch.tensor([ids])  # [1, L]
    for _ in range(max_tokens):
        model_out = target(input_ids=x, past_key_values=out, use_cache=True)
        out = model_out.past_key_values
        t = int(model_out.logits[0, -1].argmax())
        if t in stop_ids:
            break
        gen.append(t)
        pieces.append(tokenizer.decode([t]))
        if ">>" in "".join(pieces):
            break
        x = torch.tensor([[t]])  # [1, 1]
    return gen, pieces


def forced_results(
    question: int,
    prompt_ids: list[int],
    solution: str,
    target,
    tokenizer,
    *,
    max_tokens: int = 12,
    stop_ids: set[int] | None = None,
) -> list[ForcedResult]:
    """Every cut of `solution` after `prompt_ids`, with the target's labelled greedy result.
    Cuts where the target writes nothing (its first token ends the turn) are left out."""
    stop = stop_ids if stop_ids is not None else {tokenizer.eos_token_id}
    out = []
    for c in cuts(solution):
        ids = prompt_ids + tokenizer(c.prefix, add_special_tokens=False)["input_ids"]
        gen, pieces = greedy_until_close(target, tokenizer, ids, max_tokens, stop)
        if not gen:
            continue
        result, wrong, labels = label_result(pieces, c.truth)
        out.append(ForcedResult(question, c, ids + gen, len(ids), pieces, result, wrong, labels))
    return out
