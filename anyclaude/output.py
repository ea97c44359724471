"""Generated token ids -> text, with stop sequences found, held back and cut."""

from __future__ import annotations

from typing import Any


class Output:
    """Incremental detokenizer for one response.

    Text that could be the start of a stop sequence is held back until it is
    known not to be one, so a matched stop sequence never reaches the client.
    """

    def __init__(self, tokenizer: Any, stop_sequences: list[str] | None = None):
        self._detokenizer = tokenizer.detokenizer  # a fresh one per response
        self._stops = [s for s in stop_sequences or [] if s]
        self._held = ""
        self.stop_sequence: str | None = None

    def add(self, token: int) -> str:
        """Feed one token; returns the text that may be sent now."""
        self._detokenizer.add_token(token)
        return self._feed(self._detokenizer.last_segment)

    def finish(self) -> str:
        """The text still held back at the end of generation."""
        self._detokenizer.finalize()
        text = self._feed(self._detokenizer.last_segment)
        if self.stop_sequence is None:
            text, self._held = text + self._held, ""
        return text

    def _feed(self, segment: str) -> str:
        if self.stop_sequence is not None:
            return ""
        buffer = self._held + segment
        match = min(
            ((buffer.find(s), s) for s in self._stops if s in buffer),
            default=None,
        )
        if match is not None:
            self.stop_sequence = match[1]
            self._held = ""
            return buffer[: match[0]]
        keep = max((_overlap(buffer, s) for s in self._stops), default=0)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]


def _overlap(text: str, stop: str) -> int:
    """Length of the longest end of `text` that is a proper start of `stop`."""
    for n in range(min(len(text), len(stop) - 1), 0, -1):
        if text.endswith(stop[:n]):
            return n
    return 0
