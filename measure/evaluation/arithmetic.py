"""A response-level set with exact answers, built by code: graded arithmetic and word problems.

GSM8K is too hard for SmolLM2-135M (its free answers were wrong on 35 of 36 questions), so
response-level detection was degenerate. This set is generated deterministically from a seed,
with difficulty levels that span the target's ability; the mix of levels sets the error rate
(calibrated for SmolLM2-135M-Instruct by a small greedy run, docs/evaluation-at-scale.md).

    level  problem                                      answer       distinct problems
    1      what number comes right after n, n in 1..98 n + 1        98
    2      which is larger, a or b (1..99, a ≠ b)       max(a, b)    9,702
    3      a + b, a, b in 1..9                          a + b        81
    4      a − b, b in 1..9, b < a <= 20                a − b        144
    5      a × b, a, b in 2..9                          a × b        64
    6      a + b, a in 10..99, b in 1..9                a + b        810
    7      a + b, a, b in 10..99                        a + b        8,100
    8      word: has n items, finds k more (2..9)       n + k        many (names, items)

Measured on SmolLM2-135M-Instruct (greedy, 64 problems, 8 per level, an earlier level 4 of single
digits): right 5, 1, 4, 7, 4, 0, 1, 5 of 8 per level, 42 % overall — inside the 30–60 % the
evaluation needs; each run reports its own rate per level.

Answers are integers computed from the operands (exact by construction; a test re-derives each
from its question text). A response is right when its stated answer (`labels.stated_answer`:
after '####', else its last number) equals the answer.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import asdict, dataclass

INSTRUCTION = "Answer with the number only."
NAMES = ("Ana", "Ben", "Cleo", "Dev", "Eli", "Fay", "Gus", "Hana", "Ivo", "June")
ITEMS = ("apples", "stickers", "marbles", "pencils", "cards", "stamps", "shells", "coins")


@dataclass(frozen=True)
class Problem:
    question: str
    answer: int
    level: int
    expression: str  # the computation, in Python syntax

    def as_dict(self) -> dict:
        return asdict(self)

    def prompt(self) -> str:
        return f"{self.question} {INSTRUCTION}"


def _binary(op: str, a: int, b: int) -> Problem:
    sym = {"+": "+", "-": "-", "*": "×"}[op]
    value = {"+": a + b, "-": a - b, "*": a * b}[op]
    return Problem(f"What is {a} {sym} {b}?", value, 0, f"{a} {op} {b}")


def _level1(r: random.Random) -> Problem:
    n = r.randint(1, 98)
    return Problem(f"What number comes right after {n}?", n + 1, 0, f"{n} + 1")


def _level2(r: random.Random) -> Problem:
    a, b = r.sample(range(1, 100), 2)
    return Problem(f"Which number is larger, {a} or {b}?", max(a, b), 0, f"max({a}, {b})")


def _level3(r: random.Random) -> Problem:
    return _binary("+", r.randint(1, 9), r.randint(1, 9))


def _level4(r: random.Random) -> Problem:
    b = r.randint(1, 9)
    return _binary("-", r.randint(b + 1, 20), b)


def _level5(r: random.Random) -> Problem:
    return _binary("*", r.randint(2, 9), r.randint(2, 9))


def _level6(r: random.Random) -> Problem:
    return _binary("+", r.randint(10, 99), r.randint(1, 9))


def _level7(r: random.Random) -> Problem:
    return _binary("+", r.randint(10, 99), r.randint(10, 99))


def _level8(r: random.Random) -> Problem:
    name, item = r.choice(NAMES), r.choice(ITEMS)
    n, k = r.randint(2, 9), r.randint(2, 9)
    q = f"{name} has {n} {item} and finds {k} more. How many {item} does {name} have now?"
    return Problem(q, n + k, 0, f"{n} + {k}")


LEVELS: dict[int, Callable[[random.Random], Problem]] = {
    1: _level1,
    2: _level2,
    3: _level3,
    4: _level4,
    5: _level5,
    6: _level6,
    7: _level7,
    8: _level8,
}


def problems(
    n: int, seed: int, levels: tuple[int, ...] = tuple(LEVELS), exclude: set[str] | None = None
) -> list[Problem]:
    """n distinct problems, levels dealt round-robin (so every level has n / len(levels)), drawn by
    `random.Random(seed)`; questions in `exclude` (another split's) are never drawn."""
    bad = [lv for lv in levels if lv not in LEVELS]
    if bad or not levels:
        raise ValueError(f"levels must be among {sorted(LEVELS)}, got {list(levels)}")
    r, seen, out = random.Random(seed), set(exclude or ()), []
    tries = 0
    while len(out) < n:
        level = levels[len(out) % len(levels)]
        p = LEVELS[level](r)
        tries += 1
        if tries > 100 * n + 1000:
            raise ValueError(f"cannot draw {n} distinct problems of levels {list(levels)}")
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(Problem(p.question, p.answer, level, p.expression))
    return out


def splits(
    n_val: int, n_test: int, seed: int, levels: tuple[int, ...]
) -> tuple[list[Problem], list[Problem]]:
    """(validation, test): disjoint questions, drawn from seeds `seed` and `seed + 1`."""
    val = problems(n_val, seed, levels)
    return val, problems(n_test, seed + 1, levels, exclude={p.question for p in val})
