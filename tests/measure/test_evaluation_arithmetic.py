"""The generated arithmetic set (`arithmetic.py`): every answer re-derived from its question's text
alone, the same problems from the same seed, levels dealt evenly, splits disjoint."""

from __future__ import annotations

import re

import pytest

from measure.evaluation.arithmetic import INSTRUCTION, LEVELS, problems, splits


def from_text(question: str) -> int:
    """The answer a reader computes from the question (independent of the generator's code)."""
    n = [int(x) for x in re.findall(r"\d+", question)]
    if question.startswith("What number comes right after"):
        return n[0] + 1
    if question.startswith("Which number is larger"):
        return max(n)
    if " finds " in question:
        return n[0] + n[1]
    op = re.search(r"[+\-×]", question).group(0)
    if op == "+":
        return sum(n)
    if op == "-":
        return n[0] - n[1]
    return n[0] * n[1]


def test_every_answer_is_exact():
    ps = problems(480, seed=5)  # 60 per level: within every level's distinct problems
    assert all(p.answer == from_text(p.question) for p in ps)
    assert all(isinstance(p.answer, int) and p.answer >= 0 for p in ps)
    assert all(p.prompt() == f"{p.question} {INSTRUCTION}" for p in ps)


def test_deterministic_levels_dealt_evenly_and_distinct():
    a, b = problems(80, seed=1), problems(80, seed=1)
    assert a == b and problems(80, seed=2) != a
    assert [p.level for p in a] == [1 + i % len(LEVELS) for i in range(80)]
    assert len({p.question for p in a}) == 80
    assert {p.level for p in problems(9, seed=1, levels=(3, 5))} == {3, 5}


def test_splits_are_disjoint():
    val, test = splits(120, 240, seed=0, levels=tuple(LEVELS))  # the full recipe's sizes
    assert len(val) == 120 and len(test) == 240
    assert not {p.question for p in val} & {p.question for p in test}


def test_unknown_level_and_too_many_distinct_problems_are_refused():
    with pytest.raises(ValueError, match="levels"):
        problems(3, seed=0, levels=(9,))
    with pytest.raises(ValueError, match="distinct"):
        problems(200, seed=0, levels=(3,))  # 81 sums of two digits exist
