"""Stop strings over token events: held back while ambiguous, cut at the match."""

from __future__ import annotations

from server.engine.stops import StopStringFilter
from server.engine.types import TokenEvent


def _ev(text, i=0):
    return TokenEvent(token_id=i, text=text, logprob=0.0, bias=None, variance=None, eu=None, flagged=False)


def _feed(stops, texts):
    f = StopStringFilter(stops)
    out = []
    for i, t in enumerate(texts):
        out += f.push(_ev(t, i))
        if f.stopped:
            return out, True
    return out + f.flush(), False


def test_no_stop_passes_everything_through():
    out, stopped = _feed((), ["a", "b"])
    assert [e.text for e in out] == ["a", "b"] and not stopped


def test_stop_spanning_tokens_is_removed_with_its_tokens():
    out, stopped = _feed(("\n\n",), ["x", " y", "\n", "\n", "z"])
    assert stopped and "".join(e.text for e in out) == "x y"
    assert [e.token_id for e in out] == [0, 1]


def test_token_straddling_the_stop_is_trimmed():
    out, stopped = _feed(("END",), ["ab", "cE", "ND!"])
    assert stopped and [e.text for e in out] == ["ab", "c"]


def test_false_alarm_is_released():
    out, stopped = _feed(("END",), ["a", "E", "N", "x"])
    assert not stopped and "".join(e.text for e in out) == "aENx"


def test_earliest_of_several_stops_wins():
    out, stopped = _feed(("cd", "b"), ["abcd"])
    assert stopped and "".join(e.text for e in out) == "a"
