"""`thinking.budget_tokens`: the reasoning block closes at the budget and the answer follows.

A logits processor counts the tokens generated while reasoning is open (from the
first token when the prompt ends inside an opened reasoning block, or once the model
writes the start marker). When the budget is spent and the end marker has not come,
it forces the end marker's tokens, one per step, and leaves the rest to the model.
Only the first reasoning block is counted: once it has closed the processor lets
every token through, so it can never write a marker into the answer or into a call.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import mlx.core as mx
import numpy as np

from . import prompt

if TYPE_CHECKING:
    from .api import wire
    from .families.base import Format

# When the profile clamps max_tokens, what the answer keeps of it at least.
ANSWER_SHARE = 0.25
# Adaptive thinking's budget by effort, as a share of the request's max_tokens would be
# for `enabled` (`limit` scales it to what the profile allows); max: no budget.
ADAPTIVE = {"low": 1024, "medium": 4096, "high": 16384, "xhigh": 32768}


def limit(budget: int, asked: int, allowed: int) -> int:
    """The reasoning tokens a generation may write: `budget` of a request that asked for
    `asked` max_tokens and may generate `allowed` (a profile clamps it).

    Unclamped, the budget as given (Anthropic requires it below max_tokens). Clamped, the
    budget shrinks with max_tokens, keeping the request's share of thinking to answering,
    and leaves the answer at least ANSWER_SHARE: a client may give nearly all of a
    max_tokens several times what a local model is allowed to thinking.
    """
    budget = max(0, budget)
    if allowed >= asked and budget < asked:
        return budget
    share = min(budget / asked, 1 - ANSWER_SHARE)
    return int(allowed * share)


def for_request(request: wire.MessagesRequest, rendered: prompt.Rendered, max_tokens: int) -> Callable[[Any], list] | None:
    """The processors a request's thinking budget needs (a factory taking the tokenizer, as
    `Job.processors`), or None: no budget, or no reasoning for this request or model."""
    thinking = request.thinking
    if thinking is None:
        return None
    if thinking.type == "adaptive":
        # How long the model may think is the effort's say (Claude Code sends adaptive
        # thinking with an effort); low switches reasoning off (prompt.thinking_wanted).
        effort = request.output_config.effort if request.output_config else None
        asked = ADAPTIVE.get(effort or "medium")
    else:
        asked = thinking.budget_tokens if thinking.type == "enabled" else None
    if asked is None:
        return None
    fmt = rendered.format
    if not prompt.thinking_wanted(request) or not (fmt.think_start and fmt.think_end):
        return None
    tokens = limit(asked, request.max_tokens, max_tokens)
    return lambda tokenizer: [Budget(tokenizer, fmt, tokens, open=rendered.thinking_open)]


_WAITING, _OPEN, _DONE = "waiting", "open", "done"


class Budget:
    """The logits processor for one generation (see `for_request`).

    `open`: the prompt ends inside an opened reasoning block. As every processor of
    `decode.tokens`, its first call sees the prompt (and history), later calls one
    new token each.
    """

    def __init__(self, tokenizer: Any, fmt: Format, limit: int, *, open: bool):
        self._start = _Marker(tokenizer, fmt.think_start)
        self._end = _Marker(tokenizer, fmt.think_end)
        # A call's start marker ends reasoning, as it does for the parser (toolcalls).
        self._calls = [_Marker(tokenizer, m) for m in fmt.call_start if m]
        self._limit = limit
        self.state = _OPEN if open else _WAITING
        self.spent = 0  # reasoning tokens generated
        self._seen: int | None = None
        self._generated: list[int] = []
        self._since = 0  # where in `_generated` the current state began
        self._forcing: list[int] = []

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # numpy reads the evaluated buffer; an MLX slice would be one more op to schedule.
        seen = np.asarray(tokens)
        if self._seen is None:
            self._seen = seen.size  # the prompt: none of it is output
        elif seen.size > self._seen:
            for token in seen[self._seen :].tolist():
                self._consume(token)
            self._seen = seen.size
        if self.state == _OPEN and not self._forcing and self.spent >= self._limit:
            self._forcing = self._end.rest(self._generated, self._since)
        if not self._forcing:
            return logits
        allowed = mx.arange(logits.shape[-1]) == self._forcing[0]
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _consume(self, token: int) -> None:
        self._generated.append(token)
        if self._forcing:
            # Every other token was masked out: this is the one forced.
            self._forcing.pop(0)
            if not self._forcing:
                self._move(_DONE)
            return
        if self.state == _DONE:
            return
        if any(m.ends(self._generated, self._since) for m in self._calls):
            self._move(_DONE)
        elif self.state == _WAITING:
            if self._start.ends(self._generated, self._since):
                self._move(_OPEN)
        elif self._end.ends(self._generated, self._since):
            self._move(_DONE)
        else:
            self.spent += 1

    def _move(self, state: str) -> None:
        self.state = state
        self._since = len(self._generated)


class _Marker:
    """A marker (`</think>`), found where generated ids end with it."""

    def __init__(self, tokenizer: Any, text: str):
        self.text = text
        self.ids = list(tokenizer.encode(text, add_special_tokens=False))
        self._encode = tokenizer.encode
        self._decode = tokenizer.decode

    def rest(self, generated: list[int], since: int) -> list[int]:
        """The tokens that write the marker after `generated[since:]`: its own, or, where
        the model was writing it already, what it lacks (not `</thi</think>`)."""
        tail = generated[since:]
        for k in range(min(len(self.ids) - 1, len(tail)), 0, -1):
            if tail[-k:] == self.ids[:k]:
                return self.ids[k:]
        if len(self.ids) > 1:  # ordinary text: it may have begun with other tokens
            text = self._decode(tail[-len(self.text) :])
            for k in range(len(self.text) - 1, 0, -1):
                if text.endswith(self.text[:k]):
                    return list(self._encode(self.text[k:], add_special_tokens=False))
        return list(self.ids)

    def ends(self, generated: list[int], since: int) -> bool:
        """Whether the last of `generated` completes the marker, within `generated[since:]`."""
        n = len(self.ids)
        if len(generated) - since >= n and generated[-n:] == self.ids:
            return True
        # Ordinary text can be written with other tokens than the marker's own (" </"
        # takes the space before it along), and the parser reads text: so does this,
        # where the last token holds the marker's last character.
        if self.text[-1] not in self._decode(generated[-1:]):
            return False
        # A marker of k characters spans k tokens at most.
        window = generated[max(since, len(generated) - len(self.text)) :]
        return self.text in self._decode(window) and self.text not in self._decode(window[:-1])
