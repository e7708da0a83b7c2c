"""Correctness labels from GSM8K calculator annotations and final answers.

A GSM8K solution writes each calculation as `<<expr=result>>result`. In a generated solution,
after `<<expr=` the model writes `result` itself: it is right when it equals the exact value
of `expr` (rational arithmetic, `safe_eval`; never Python's eval). Only the arithmetic is
checked: a wrong but well-computed expression counts as correct.

    token label   1 (wrong) / 0 (correct) on every token that overlaps a result's characters;
                  tokens outside results, and annotations whose expression or result cannot be
                  parsed or that are never closed by `>>`, get no label
    answer label  1 when the number after the final `#### ` differs from the reference (or is
                  missing), else 0; `response_wrong` falls back to the text's last number when
                  there is no `####` (a chat model's prose answer)
"""

from __future__ import annotations

import ast
import operator
import re
from dataclasses import dataclass
from fractions import Fraction

_BINOPS = {
    ast.Add: operator.add,
    ast.Sub: operator.sub,
    ast.Mult: operator.mul,
    ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv,
    ast.Mod: operator.mod,
    ast.Pow: operator.pow,
}
_MAX_EXPONENT = 64
_ANNOTATION = re.compile(r"<<([^<>=]*)=([^<>]*?)>>")
_NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def parse_number(text: str) -> Fraction | None:
    """'1,234.50' -> 1234.5; '$12' and '12%' -> 12; anything else -> None."""
    t = text.strip().lstrip("$").rstrip("%").replace(",", "").strip()
    try:
        return Fraction(t) if t and re.fullmatch(r"-?(\d+\.?\d*|\.\d+)", t) else None
    except (ValueError, ZeroDivisionError):
        return None


def safe_eval(expr: str) -> Fraction | None:
    """Exact value of an arithmetic expression (+ − × / // % ** and parentheses over decimal
    numbers; `x` or `×` for ×, `$`, `,` and `%` signs ignored), or None when it is malformed,
    divides by zero or has a large exponent."""
    src = expr.replace("×", "*").replace("x", "*").replace("$", "").replace(",", "").replace("%", "")
    src = src.replace("^", "**")
    if not src.strip() or len(src) > 200:
        return None
    try:
        return _value(ast.parse(src.strip(), mode="eval").body)
    except (SyntaxError, ValueError, ZeroDivisionError, TypeError, OverflowError, _Unsupported):
        return None


class _Unsupported(Exception):
    pass


def _value(node: ast.AST) -> Fraction:
    if (
        isinstance(node, ast.Constant)
        and isinstance(node.value, int | float)
        and not isinstance(node.value, bool)
    ):
        return Fraction(str(node.value))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.USub | ast.UAdd):
        v = _value(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and type(node.op) in _BINOPS:
        a, b = _value(node.left), _value(node.right)
        if isinstance(node.op, ast.Pow):
            if b.denominator != 1 or abs(b) > _MAX_EXPONENT:
                raise _Unsupported
            return a ** int(b)
        return Fraction(_BINOPS[type(node.op)](a, b))
    raise _Unsupported


@dataclass(frozen=True)
class Annotation:
    expr: str
    result: str
    start: int  # character span of `result` in the text
    end: int
    wrong: bool


def annotations(text: str) -> list[Annotation]:
    """The checkable calculator annotations of a text, in order (malformed ones skipped)."""
    out = []
    for m in _ANNOTATION.finditer(text):
        truth, claimed = safe_eval(m.group(1)), parse_number(m.group(2))
        if truth is None or claimed is None:
            continue
        out.append(Annotation(m.group(1), m.group(2), m.start(2), m.end(2), claimed != truth))
    return out


def token_labels(token_texts: list[str], text_offset: int, text: str) -> list[int | None]:
    """Per token: 1 wrong / 0 correct result token / None unlabeled. `token_texts` are the decoded
    tokens of the labelled part, which starts at character `text_offset` of `text`."""
    spans = [(a.start, a.end, int(a.wrong)) for a in annotations(text)]
    out: list[int | None] = []
    pos = text_offset
    for t in token_texts:
        a, b = pos, pos + len(t)
        pos = b
        hit = [w for s, e, w in spans if a < e and b > s]
        out.append(max(hit) if hit else None)
    return out


def final_answer(text: str) -> Fraction | None:
    """The number after the last '#### ', or None."""
    cut = text.rfind("####")
    if cut < 0:
        return None
    m = _NUMBER.search(text[cut + 4 :].split("\n")[0])
    return parse_number(m.group(0)) if m else None


def answer_wrong(generated: str, reference: str) -> int:
    truth, got = final_answer(reference), final_answer(generated)
    return int(truth is None or got is None or got != truth)


def stated_answer(text: str) -> Fraction | None:
    """The number after the last '#### ', else the last number of the text (a chat model states
    its answer in prose), or None."""
    got = final_answer(text)
    if got is not None:
        return got
    numbers = _NUMBER.findall(text.replace("**", " "))
    return parse_number(numbers[-1]) if numbers else None


def response_wrong(generated: str, reference: str) -> int:
    """answer label of a free response: `stated_answer(generated)` against the reference's `####`."""
    truth, got = final_answer(reference), stated_answer(generated)
    return int(truth is None or got is None or got != truth)
