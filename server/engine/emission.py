"""What a request lets through of its token events: stop strings and stop-on-uncertainty.

Both engines end a stream the same way: the events pass a `StopStringFilter` (OpenAI
semantics), and with `stop_on_uncertainty` the stream ends right after the first flagged
token it releases. `EmissionGate.reason` says why it ended ("stop" or "uncertainty").
"""

from __future__ import annotations

from server.engine.stops import StopStringFilter
from server.engine.types import SamplingParams, TokenEvent


class EmissionGate:
    def __init__(self, params: SamplingParams) -> None:
        self._params = params
        self._stops = StopStringFilter(params.stop)
        self.reason: str | None = None  # set once the stream must end

    def push(self, event: TokenEvent) -> list[TokenEvent]:
        """Feed one event; returns the events to emit now (none once `reason` is set)."""
        if self.reason is not None:
            return []
        out = []
        for ev in self._stops.push(event):
            out.append(ev)
            if ev.flagged and self._params.stop_on_uncertainty:
                self.reason = "uncertainty"
                return out
        if self._stops.stopped:
            self.reason = "stop"
        return out

    def flush(self) -> list[TokenEvent]:
        """At the end of generation: the events held back as a possible stop-string start."""
        if self.reason is not None:
            return []
        return self._stops.flush()
