"""What a request lets through of its token events: stop strings and stop-on-uncertainty.

Both engines end a stream the same way: the events pass a `StopStringFilter` (OpenAI
semantics), and with `stop_on_uncertainty` the stream ends right after the first flagged
token it releases. `EmissionGate.reason` says why it ended ("stop" or "uncertainty").
Events whose text the detokenizer still holds (mid UTF-8 sequence) wait in the gate until a
later token completes it, so a generation that ends there can put the held text (U+FFFD
included) on its last token at `flush`.
"""

from __future__ import annotations

from dataclasses import replace

from server.engine.stops import StopStringFilter
from server.engine.types import SamplingParams, TokenEvent


class EmissionGate:
    def __init__(self, params: SamplingParams) -> None:
        self._params = params
        self._stops = StopStringFilter(params.stop)
        self.reason: str | None = None  # set once the stream must end
        self._held: list[TokenEvent] = []  # events of an incomplete UTF-8 sequence

    def push(self, event: TokenEvent, text_pending: bool = False) -> list[TokenEvent]:
        """Feed one event; returns the events to emit now (none once `reason` is set).
        `text_pending`: the detokenizer holds this token's text back (incomplete UTF-8)."""
        if self.reason is not None:
            return []
        self._held.append(event)
        if text_pending:
            return []
        held, self._held = self._held, []
        return self._release(held)

    def flush(self, tail_text: str = "") -> list[TokenEvent]:
        """At the end of generation: the events held back (mid UTF-8 sequence, the last of them
        given `tail_text`, the detokenizer's flush; or as a possible stop-string start)."""
        if self.reason is not None:
            return []
        held, self._held = self._held, []
        if held:
            held[-1] = replace(held[-1], text=held[-1].text + tail_text)
        out = self._release(held)
        return out if self.reason is not None else out + self._stops.flush()

    def _release(self, events: list[TokenEvent]) -> list[TokenEvent]:
        out = []
        for event in events:
            for ev in self._stops.push(event):
                out.append(ev)
                if ev.flagged and self._params.stop_on_uncertainty:
                    self.reason = "uncertainty"
                    return out
            if self._stops.stopped:
                self.reason = "stop"
                return out
        return out
