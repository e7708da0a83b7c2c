"""Stop strings over a stream of token events.

OpenAI semantics: the output ends right before the first occurrence of a stop string and
the stop string itself is not returned. Tokens are held back while the text so far ends with
a proper prefix of some stop string (they might be the start of it); a match drops the tokens
inside the stop string and trims the one that straddles its start.
"""

from __future__ import annotations

from dataclasses import replace

from server.engine.types import TokenEvent


class StopStringFilter:
    def __init__(self, stops: tuple[str, ...]) -> None:
        self._stops = tuple(s for s in stops if s)
        self._held: list[TokenEvent] = []
        self._held_text = ""  # concatenated text of the held events
        self._tail = ""  # released text, kept just long enough to find a stop spanning it
        self.stopped = False

    def push(self, event: TokenEvent) -> list[TokenEvent]:
        """Feed one event; returns the events now safe to emit. Sets `stopped` on a match."""
        if not self._stops:
            return [event]
        self._held.append(event)
        self._held_text += event.text
        text = self._tail + self._held_text
        hits = [i for i in (text.find(s) for s in self._stops) if i >= 0]
        if hits:
            self.stopped = True
            return self._cut(min(hits) - len(self._tail))
        if any(text.endswith(s[:j]) for s in self._stops for j in range(1, len(s))):
            return []
        return self.flush()

    def flush(self) -> list[TokenEvent]:
        """Release everything held (end of generation without a match)."""
        out, self._held = self._held, []
        longest = max((len(s) for s in self._stops), default=1)
        self._tail = (self._tail + self._held_text)[-longest:]
        self._held_text = ""
        return out

    def _cut(self, keep: int) -> list[TokenEvent]:
        """Keep the first `keep` characters of held text (keep < 0: a stop began in released
        text, which cannot be taken back; emit nothing more)."""
        out: list[TokenEvent] = []
        pos = 0
        for ev in self._held:
            if pos >= keep:
                break
            room = keep - pos
            out.append(ev if len(ev.text) <= room else replace(ev, text=ev.text[:room]))
            pos += len(ev.text)
        self._held, self._held_text = [], ""
        return out
