"""Calculator-annotation labels on fixed strings: correct, wrong and malformed annotations."""

from __future__ import annotations

from fractions import Fraction

from measure.evaluation.labels import (
    annotations,
    answer_wrong,
    final_answer,
    parse_number,
    safe_eval,
    token_labels,
)


def test_safe_eval_exact_arithmetic():
    assert safe_eval("16-3-4") == 9
    assert safe_eval("1/3*3") == 1  # exact: no 0.999…
    assert safe_eval("100*.5") == 50
    assert safe_eval("(2+3)**2") == 25
    assert safe_eval("$1,200/4") == 300
    assert safe_eval("1/3") == Fraction(1, 3)


def test_safe_eval_refuses_malformed_and_unsafe():
    for bad in ["", "1/0", "2**1000", "a+b", "__import__('os')", "3+", "(1", "1 if 1 else 2", "[1]"]:
        assert safe_eval(bad) is None, bad


def test_parse_number():
    assert parse_number(" 1,234.50") == Fraction("1234.5")
    assert parse_number("$12") == 12
    assert parse_number("12 apples") is None


def test_annotations_correct_wrong_malformed():
    text = (
        "16 - 3 - 4 = <<16-3-4=9>>9 eggs. 9 * 2 = $<<9*2=19>>19. "
        "<<5+=3>>3 <<7/2=3.5>>3.5 <<1/0=1>>1 <<2+2=four>>four <<2+2=4 unclosed"
    )
    got = [(a.expr, a.result, a.wrong) for a in annotations(text)]
    assert got == [("16-3-4", "9", False), ("9*2", "19", True), ("7/2", "3.5", False)]
    first = annotations(text)[0]
    assert text[first.start : first.end] == "9"


def test_token_labels_mark_result_tokens_only():
    pieces = [
        " 3",
        "+",
        "4",
        "=",
        " <<",
        "3",
        "+",
        "4",
        "=",
        "8",
        ">>",
        "8",
        " and",
        " <<",
        "2",
        "*",
        "2",
        "=",
        "4",
        ">>",
        "4",
    ]
    labels = token_labels(pieces, 0, "".join(pieces))
    assert labels[9] == 1  # the wrong result 8 inside <<3+4=8>>
    assert labels[18] == 0  # the correct result 4 inside <<2*2=4>>
    assert sum(v is not None for v in labels) == 2


def test_token_labels_with_offset_and_multi_token_result():
    prefix = "Q: x\nA:"
    pieces = [" <<", "12", "*", "12", "=", "14", "4", ">>", "144"]
    text = prefix + "".join(pieces)
    labels = token_labels(pieces, len(prefix), text)
    assert labels[5] == 0 and labels[6] == 0  # "144" split in two tokens, both labelled correct
    assert [i for i, v in enumerate(labels) if v is not None] == [5, 6]


def test_final_answer_and_label():
    assert final_answer("so 5.\n#### 1,200") == 1200
    assert final_answer("no answer") is None
    assert answer_wrong("x\n#### 18", "y <<9*2=18>>18\n#### 18") == 0
    assert answer_wrong("x\n#### 17", "y\n#### 18") == 1
    assert answer_wrong("x without answer", "y\n#### 18") == 1
