"""Generated token ids -> segments: text, reasoning and tool calls, with stop sequences cut.

Tokens are detokenized incrementally; stop sequences are found in the raw text
(held back while they might be starting, so a matched one never reaches the
client); the rest goes through the model family's parser (`toolcalls`).
"""

from __future__ import annotations

from typing import Any

from .toolcalls import BadCall, Parser, Segment, overlap


class Output:
    """The output side of one response."""

    def __init__(self, tokenizer: Any, parser: Parser, stop_sequences: list[str] | None = None):
        self._tokenizer = tokenizer
        self._detokenizer = tokenizer.detokenizer  # a fresh one per response
        self._begun = False  # the detokenizer has given text
        self._parser = parser
        self._stops = [s for s in stop_sequences or [] if s]
        self._held = ""
        self.stop_sequence: str | None = None
        # Calls that could not be made valid (shown as text), for the log.
        self.bad_calls: list[str] = []

    @property
    def in_call(self) -> bool:
        return self._parser.in_call

    def add(self, token: int) -> list[Segment]:
        """Feed one token; returns the segments that are certain now."""
        self._detokenizer.add_token(token)
        return self._parse(self._cut(self._first(self._detokenizer.last_segment)))

    def finish(self, *, cut: bool = False) -> list[Segment]:
        """Generation is over. `cut`: it was stopped short, so a call still open is dropped."""
        self._detokenizer.finalize()
        text = self._cut(self._first(self._detokenizer.last_segment))
        if self.stop_sequence is None:
            text, self._held = text + self._held, ""
        segments = self._parse(text)
        dropping = cut and self._parser.in_call
        rest = self._parser.finish()
        if dropping:  # half a call is never sent: it would not be valid
            rest = [s for s in rest if not (isinstance(s, BadCall) and s.reason == "truncated")]
        return segments + self._note(rest)

    def _first(self, segment: str) -> str:
        # mlx-lm's streaming detokenizers drop a space that starts the text. Where the
        # tokenizer's own decoding keeps it (byte-level BPE: the model wrote it), it is
        # part of the reply, and the next turn must render it back (prefix cache).
        if self._begun or not segment:
            return segment
        self._begun = True
        decoded = self._tokenizer.decode(self._detokenizer.tokens)
        i = decoded.find(self._detokenizer.text)
        return decoded[:i] + segment if i > 0 and decoded[:i].isspace() else segment

    def _parse(self, text: str) -> list[Segment]:
        return self._note(self._parser.feed(text)) if text else []

    def _note(self, segments: list[Segment]) -> list[Segment]:
        self.bad_calls += [s.reason for s in segments if isinstance(s, BadCall)]
        return segments

    def _cut(self, segment: str) -> str:
        if self.stop_sequence is not None:
            return ""
        buffer = self._held + segment
        match = min(((buffer.find(s), s) for s in self._stops if s in buffer), default=None)
        if match is not None:
            self.stop_sequence = match[1]
            self._held = ""
            return buffer[: match[0]]
        keep = max((overlap(buffer, s) for s in self._stops), default=0)
        self._held = buffer[len(buffer) - keep :]
        return buffer[: len(buffer) - keep]
