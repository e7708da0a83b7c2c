"""The emission gate: stop strings and stop-on-uncertainty end a stream the same way in both engines."""

from __future__ import annotations

from server.engine.emission import EmissionGate
from server.engine.types import FlagThresholds, SamplingParams, TokenEvent


def _ev(text: str, eu: float) -> TokenEvent:
    return TokenEvent(
        token_id=1,
        text=text,
        logprob=0.0,
        bias=eu,
        variance=0.0,
        eu=eu,
        flagged=FlagThresholds(eu=0.5).flags(eu, 0.0, eu),
    )


def test_stop_on_uncertainty_ends_after_the_first_flagged_token():
    gate = EmissionGate(SamplingParams(stop_on_uncertainty=True))
    assert gate.push(_ev("a", 0.1)) == [_ev("a", 0.1)]
    assert [e.text for e in gate.push(_ev("b", 0.9))] == ["b"]
    assert gate.reason == "uncertainty"
    assert gate.push(_ev("c", 0.1)) == [] and gate.flush() == []


def test_flagged_tokens_pass_without_stop_on_uncertainty():
    gate = EmissionGate(SamplingParams())
    assert [e.text for e in gate.push(_ev("b", 0.9))] == ["b"]
    assert gate.reason is None


def test_stop_string_ends_the_stream_without_the_stop_text():
    gate = EmissionGate(SamplingParams(stop=("##",)))
    out = gate.push(_ev("x #", 0.1)) + gate.push(_ev("# y", 0.1))
    assert "".join(e.text for e in out) == "x "
    assert gate.reason == "stop"


def test_held_text_is_released_at_the_end():
    gate = EmissionGate(SamplingParams(stop=("##",)))
    assert gate.push(_ev("x #", 0.1)) == []
    assert [e.text for e in gate.flush()] == ["x #"]
