"""Token labels teacher-forced up to `<<expr=` (`forced_labels.py`) and the answer of a chat
response (`labels.response_wrong`): exact extraction on hand-made examples, and the forced
sequences of a tiny target."""

from __future__ import annotations

import pytest

from drafts.corpus import format_prompt, synthetic_records
from measure.evaluation.forced_labels import cuts, forced_tree, label_result
from measure.evaluation.labels import response_wrong, stated_answer
from server.engine.models import load_causal_lm, load_tokenizer


def test_cuts_keep_the_checkable_annotations_with_their_exact_value():
    text = "a <<2+3=5>>5 b <<x=1>>1 c <<1/0=3>>3 d <<48/2=24>>24 e <<7/2=3.5>>3.5"
    got = cuts(text)
    assert [c.expr for c in got] == ["2+3", "48/2", "7/2"]
    assert [c.truth for c in got] == ["5", "24", "7/2"]
    assert got[0].prefix == "a <<2+3="
    assert got[1].prefix == "a <<2+3=5>>5 b <<x=1>>1 c <<1/0=3>>3 d <<48/2="


@pytest.mark.parametrize(
    ("pieces", "truth", "result", "wrong", "labels"),
    [
        (["1", "8", ">>"], "18", "18", 0, [0, 0, None]),  # closed: the text before >>
        ([" 2", "4>>", "24"], "24", " 24", 0, [0, 0, None]),  # a token that holds >> counts
        (["2", ".", "5", ">>"], "5/2", "2.5", 0, [0, 0, 0, None]),  # exact rational comparison
        (["1", "6", "*", "1", "0", "="], "9", "16", 1, [1, 1, None, None, None, None]),  # never closed
        (["4", " bolts", " of"], "1", "4", 1, [1, None, None]),
        (["2", "4", " clips"], "24", "24", 0, [0, 0, None]),  # unclosed but right
        ([">>", "5"], "5", "", 1, [1, None]),  # closed at once: empty and wrong
        (["$", "<<", "3", ">>"], "3", "$<<3", 1, [1, 1, 1, None]),  # not a number
        (["The", " answer"], "3", "", 1, [1, None]),
        (["1", ",", "000", ">>"], "1000", "1,000", 0, [0, 0, 0, None]),
    ],
)
def test_label_result(pieces, truth, result, wrong, labels):
    assert label_result(pieces, truth) == (result, wrong, labels)


def test_stated_answer_of_a_chat_response():
    assert stated_answer("She has 3 + 4 = 7 apples.\n#### 7") == 7
    assert stated_answer("So she makes **$18** every day.") == 18
    assert stated_answer("The total is 1,250.5 dollars.") == 1250.5
    assert stated_answer("No idea.") is None
    assert response_wrong("In total, 72 clips.", "... #### 72") == 0
    assert response_wrong("In total, 72 clips and 3 pens.", "... #### 72") == 1
    assert response_wrong("#### 72\nor maybe 5", "#### 72") == 0  # #### wins over the last number


def test_forced_cuts_of_a_tiny_target(tiny_models, few_threads):
    """Each sequence is the prompt + the solution up to `<<expr=` + the target's greedy tokens,
    scored from `start`; labels cover exactly the generated tokens."""
    target, tok = load_causal_lm(tiny_models["target"]), load_tokenizer(tiny_models["target"])
    seen = 0
    for i, r in enumerate(synthetic_records(4, seed=5)):
        prompt = [
            tok.bos_token_id,
            *tok(format_prompt(r["question"]).rstrip(), add_special_tokens=False)["input_ids"],
        ]
        solution = " " + r["answer"].strip()
        _, found = forced_tree(i, prompt, solution, target, tok, max_tokens=8)
        assert len(found) <= len(cuts(solution))
        for f in found:
            seen += 1
            assert f.ids[: len(prompt)] == prompt
            assert tok.decode(f.ids[len(prompt) : f.start]) == f.cut.prefix
            assert tok.decode(f.ids[f.start :]) == "".join(f.pieces)
            assert len(f.labels) == len(f.pieces) == len(f.ids) - f.start <= 8
            assert label_result(f.pieces, f.cut.truth) == (f.result, f.wrong, f.labels)
            assert f.labels[0] == f.wrong
    assert seen > 0
