"""Incremental detokenization reproduces the full decode, including multi-byte characters."""

from __future__ import annotations

from transformers import AutoTokenizer

from server.engine.detokenize import IncrementalDetokenizer


def test_incremental_text_concatenates_to_the_full_decode(tiny_models):
    tok = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    prompt = tok("Question: how many?", add_special_tokens=False)["input_ids"]
    text = " Ann has 3 €uros and 4 ünïcode pens.\n#### 7 😀"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    d = IncrementalDetokenizer(tok, prompt)
    pieces = [d.add(i) for i in ids]
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
