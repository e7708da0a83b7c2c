"""Calculator annotations: parsing, safe arithmetic, and the teacher-forced accuracy count."""

from __future__ import annotations

import pytest

from drafts.calc import (
    annotation_prefixes,
    evaluate_expression,
    evaluate_model,
    same_number,
    to_number,
)


def test_annotation_prefixes_end_at_the_equals_sign():
    items = annotation_prefixes("Q?", "She pays <<48/2=24>>24 and <<24+6=30>>30.\n#### 30")
    assert [gold for _, gold in items] == ["24", "30"]
    assert items[0][0].endswith("<<48/2=") and items[1][0].endswith("<<24+6=")
    assert items[0][0].startswith("Question: Q?\nAnswer: ")


@pytest.mark.parametrize(("expr", "value"), [("48/2", 24), ("2*(3+4)", 14), ("-3+1,000", 997), ("2**3", 8)])
def test_evaluate_expression(expr, value):
    assert evaluate_expression(expr) == value


@pytest.mark.parametrize("expr", ["__import__('os')", "1/0", "2**1000", "a+1", ""])
def test_evaluate_expression_refuses(expr):
    assert evaluate_expression(expr) is None


def test_numbers():
    assert same_number(to_number("1,200"), 1200.0) and same_number(to_number("24."), 24.0)
    assert to_number("24x") is None and not same_number(None, 1.0)


def test_evaluate_model_on_a_tiny_target(tiny_models, records):
    out = evaluate_model(tiny_models["target"], records[:6], format_samples=2)
    assert out["annotations"] == 6 and 0 <= out["calc_correct"] <= 6  # one annotation per synthetic record
    assert 0 < out["test_loss"] < 6.0  # trained: well below log(400) ≈ 6
    assert out["format"]["samples"] == 2
    with pytest.raises(ValueError, match="GSM8K-format"):
        evaluate_model(tiny_models["target"], [{"text": "plain"}])
