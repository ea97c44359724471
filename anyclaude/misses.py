"""Explaining prefix-cache misses: where a session's new prompt stopped matching its last one.

Each turn of a Claude Code session should extend the previous turn's prompt and
output token for token. When it does not, the cache reuses less than it could;
the request log then says at which token the prompts parted and in which part of
the request (system, tools, message N), which is what points at the cause (a
changing system block, tools in another order, history rendered differently).
"""

from __future__ import annotations

from collections import OrderedDict

import msgspec
import numpy as np

from . import prompt
from .api import wire
from .engine.cache import common_prefix


class Miss(msgspec.Struct):
    position: int
    part: str


class Sessions:
    """The last prompt and output tokens of recent sessions."""

    def __init__(self, keep: int = 64):
        self._last: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._keep = keep

    def check(self, key: tuple, ids: list[int]) -> int | None:
        """The first differing position if `ids` does not extend the session's last turn."""
        last = self._last.get(key)
        if last is None:
            return None
        position = common_prefix(last, np.asarray(ids))
        return position if position < min(len(last), len(ids)) else None

    def last(self, key: tuple) -> np.ndarray | None:
        """The session's last turn, prompt and answer (None if not seen)."""
        return self._last.get(key)

    def remember(self, key: tuple, tokens: list[int]) -> None:
        self._last[key] = np.asarray(tokens)
        self._last.move_to_end(key)
        while len(self._last) > self._keep:
            self._last.popitem(last=False)


def locate(request: wire.CountTokensRequest, tokenizer, ids: list[int], position: int, vision=None) -> str:
    """Which part of the request holds token `position`: system, tools, or message N.
    `ids`: the prompt as the prefix cache keys it (an image's tokens by the image, for a
    model that sees: `vision`)."""
    full = np.asarray(ids)

    def reach(**changes) -> int:
        # How far a rendering of part of the request agrees with the whole prompt.
        partial = msgspec.structs.replace(request, **changes)
        try:
            return common_prefix(np.asarray(prompt.render(partial, tokenizer, vision=vision).cache_key), full)
        except Exception:
            return 0

    # A part's rendering agrees with the whole prompt up to about where the part
    # ends: the first part that reaches past `position` holds it.
    if reach(tools=None, messages=[]) > position:
        return "system"
    if request.tools and reach(messages=[]) > position:
        return "tools"
    low, high = 0, len(request.messages) - 1
    while low < high:  # reach grows with the number of messages: search it
        middle = (low + high) // 2
        if reach(messages=request.messages[: middle + 1]) > position:
            high = middle
        else:
            low = middle + 1
    return f"message {low}"
