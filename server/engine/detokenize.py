"""Incremental detokenization: the text each new token adds to the output.

The prefix/read-offset scheme of vLLM and TGI: decode a short window that ends at the new
token and emit only the part beyond the window's previous text, holding back text that
ends in an incomplete UTF-8 sequence ("\ufffd") until the next token completes it.
A generation that ends mid-sequence gets the held text from `flush()`, U+FFFD included, so
the output equals `tokenizer.decode(token_ids)` as OpenAI-compatible servers return it.
"""

from __future__ import annotations

_CONTEXT = 5  # prompt tokens decoded with the first output tokens (spacing of word pieces)


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_token_ids: list[int]) -> None:
        self._tok = tokenizer
        self._ids: list[int] = list(prompt_token_ids[-_CONTEXT:])
        self._prefix = 0
        self._read = len(self._ids)

    def add(self, token_id: int) -> str:
        self._ids.append(token_id)
        return self._take(complete_only=True)

    @property
    def pending(self) -> bool:
        """Whether tokens were added whose text is held back (an incomplete UTF-8 sequence)."""
        return self._read < len(self._ids)

    def flush(self) -> str:
        """At the end of generation: the text held back, as it decodes now ("" if none)."""
        return self._take(complete_only=False) if self.pending else ""

    def _take(self, complete_only: bool) -> str:
        """The text beyond the window's previous text, advancing the window; with
        `complete_only`, "" (and no advance) while it ends in an incomplete UTF-8 sequence."""
        prefix_text = self._decode(self._ids[self._prefix : self._read])
        new_text = self._decode(self._ids[self._prefix :])
        if complete_only and (len(new_text) <= len(prefix_text) or new_text.endswith("\ufffd")):
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return new_text[len(prefix_text) :]

    def _decode(self, ids: list[int]) -> str:
        return self._tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
