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


def test_generation_ending_mid_character_keeps_its_tail(tiny_models):
    """Tokens that end inside a multi-byte UTF-8 character: the gate holds their events and
    its flush puts the held text (U+FFFD included) on the last one, so the emitted texts
    concatenate to `tokenizer.decode(token_ids)`."""
    from server.engine.emission import EmissionGate
    from server.engine.types import SamplingParams, TokenEvent

    tok = AutoTokenizer.from_pretrained(tiny_models["tokenizer"])
    ids = tok(" pay 3 €", add_special_tokens=False)["input_ids"]
    partial = [t for t in tok.convert_ids_to_tokens(ids)]
    cut = ids[:-1]  # the byte-level BPE splits "€" (3 bytes); drop its last piece
    assert tok.decode(cut).endswith("\ufffd"), partial
    d = IncrementalDetokenizer(tok, [tok.bos_token_id])
    gate = EmissionGate(SamplingParams())
    out = []
    for i in cut:
        ev = TokenEvent(
            token_id=i, text=d.add(i), logprob=0.0, bias=None, variance=None, eu=None, flagged=False
        )
        out += gate.push(ev, d.pending)
    assert len(out) < len(cut)  # the character's first bytes wait in the gate
    out += gate.flush(d.flush())
    assert [e.token_id for e in out] == cut
    assert "".join(e.text for e in out) == tok.decode(cut, skip_special_tokens=True)
