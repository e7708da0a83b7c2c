"""A question's cuts as one token tree (`tree.py`, `forced_labels.forced_tree`): the tree's
forward equals every branch's own flat sequence, and the tree decode finds the results the
per-cut decode finds."""

from __future__ import annotations

import pytest
import torch

from drafts.corpus import format_prompt, synthetic_records
from measure.evaluation.forced_labels import forced_tree, greedy_until_close
from measure.evaluation.tree import Branch, Tree, branch_on, head_logprobs, run_body
from server.engine.models import load_causal_lm, load_tokenizer
from server.engine.teacher_forced import forced_logprobs

pytestmark = pytest.mark.usefixtures("few_threads")


def test_layout_of_a_hand_made_tree():
    t = Tree([1, 2, 3, 4, 5], [Branch(3, [7, 8], 0), Branch(5, [9], 0), Branch(2, [6, 7, 8], 1)])
    assert t.ids().tolist() == [1, 2, 3, 4, 5, 7, 8, 9, 6, 7, 8]
    assert t.positions().tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 2, 3, 4]
    ok = t.allowed()
    assert ok[5].tolist() == [1, 1, 1, 0, 0, 1, 0, 0, 0, 0, 0]  # branch 0's first token: trunk[:3] + itself
    assert ok[7].tolist() == [1, 1, 1, 1, 1, 0, 0, 1, 0, 0, 0]
    assert ok[10].tolist() == [1, 1, 0, 0, 0, 0, 0, 0, 1, 1, 1]
    pred, toks, which = t.scored()
    # branch 0 predicted from trunk[2] then itself; branch 2 scores from its second token
    assert pred.tolist() == [2, 5, 4, 8, 9] and toks.tolist() == [7, 8, 9, 7, 8]
    assert which.tolist() == [0, 0, 1, 2, 2]
    assert t.sequence(2) == ([1, 2, 6, 7, 8], 3)
    assert Tree([1, 2, 3, 4], [Branch(2, [5])]).trunk == [1, 2]  # unseen trunk tokens are not run


def test_branch_on_a_context_that_departs_from_the_trunk():
    assert branch_on([1, 2, 3, 4], [1, 2, 3], [9]) == Branch(3, [9], 0)
    assert branch_on([1, 2, 3, 4], [1, 2, 5], [9, 8]) == Branch(2, [5, 9, 8], 1)


def test_tree_forward_equals_each_flat_sequence(tiny_models):
    target = load_causal_lm(tiny_models["target"])
    t = Tree(
        list(range(3, 40)), [Branch(10, [50, 51, 52]), Branch(37, [60, 61]), Branch(20, [70, 71, 72], 1)]
    )
    pred, _, which = t.scored()
    h, _ = run_body(target, t)
    got = head_logprobs(target, h[pred])  # [T, V]
    want = torch.cat([forced_logprobs(target, *t.sequence(j)) for j in range(len(t.branches))])
    assert which.tolist() == [0, 0, 0, 1, 1, 2, 2]
    torch.testing.assert_close(got, want, atol=2e-5, rtol=0)


def test_forced_tree_equals_the_per_cut_decode(tiny_models):
    """Decoding over one cropped cache gives each cut's own fresh greedy decode, and each branch
    of the tree is that cut's flat sequence."""
    target, tok = load_causal_lm(tiny_models["target"]), load_tokenizer(tiny_models["target"])
    seen = 0
    for i, r in enumerate(synthetic_records(4, seed=5)):
        prompt = [
            tok.bos_token_id,
            *tok(format_prompt(r["question"]).rstrip(), add_special_tokens=False)["input_ids"],
        ]
        tree, found = forced_tree(i, prompt, " " + r["answer"].strip(), target, tok, max_tokens=8)
        assert len(tree.branches) == len(found)
        for j, f in enumerate(found):
            fresh = greedy_until_close(target, tok, f.ids[: f.start], 8, {tok.eos_token_id})
            assert fresh == (f.ids[f.start :], f.pieces)
            assert tree.sequence(j) == (f.ids, f.start)
            seen += 1
    assert seen > 0
