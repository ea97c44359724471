"""What crosses between the event loop and the engine thread: a job going in, its events
coming back (Prefilled once, Token per token, then Done or Failed), and the handle the
loop holds (Generation). The stream state machine depends on these alone."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Callable
from typing import Any

from msgspec import Struct


class Sampling(Struct, frozen=True):
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float = 1.0


class Job(Struct, frozen=True):
    """One generation, as the engine thread receives it."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling
    # Tokens of the shared system+tools prefix, kept as a cache checkpoint (0: none).
    checkpoint: int = 0
    # Gives the logits processors (constrained decoding, the thinking budget) on the
    # engine thread, from the tokenizer.
    processors: Callable[[Any], list] | None = None
    # Whether those include a grammar (a forced call).
    grammar: bool = False
    # A side request (Claude Code's haiku model): cached apart.
    side: bool = False
    # Its place in the engine's queue (scheduler.RANKS): 0 for the conversation the user
    # waits on, higher for subagents, compaction and side requests.
    rank: int = 0
    # The prompt's images (vision.Images), for a model that sees them.
    images: Any = None
    # Tokens before the generation prompt (prompt.Rendered.reply_start; 0: unknown), and
    # whether the user spoke last: where a cache that cannot be trimmed is kept for the
    # next turn, which renders this one's answer from there.
    reply_start: int = 0
    user_turn: bool = False


# What the engine sends back, in order: Prefilled once, Token per token, then Done or Failed.
class Prefilled(Struct, frozen=True):
    tokens: int
    seconds: float
    # Prompt tokens that came from the prefix cache instead of being computed, and
    # the kind of entry they came from (conversation, checkpoint; "" for none).
    cached: int = 0
    source: str = ""
    # Why no more came from it (cache.HIT and the other lookup reasons; "": no cache).
    lookup: str = ""


class Token(Struct, frozen=True):
    id: int


class Done(Struct, frozen=True):
    # "stop" (end of sequence), "length" (max_tokens) or "cancelled".
    reason: str
    # What became of the request's prefix-cache entry (cache.STORED and the other
    # store outcomes; "": no cache, or nothing computed).
    store: str = ""


class Failed(Struct, frozen=True):
    message: str
    retry: bool = False  # not the engine's fault (the daemon is stopping): worth a retry
    store: str = ""  # as Done's


EngineEvent = Prefilled | Token | Done | Failed


class Generation:
    """One job, seen from the event loop: its events arrive here, and it can be cancelled."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_end: Callable[[Generation], None] | None = None):
        self._loop = loop
        self._events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._cancel = threading.Event()
        self._on_end = on_end
        self.ended = False
        # Monotonic times: queued; taken up by the engine (its prefill begun), which
        # starts the first_token timer and ends the request log's queue wait. The
        # engine's thread sets the latter (None until then).
        self.submitted_at: float | None = None
        self.started_at: float | None = None
        # What became of its prefix-cache entry, once the engine has ended it (see Done.store).
        self.cache_store: str | None = None
        self._ended_callbacks: list[Callable[[], None]] = []

    async def next(self, timeout: float | None = None) -> EngineEvent | None:
        """The next event, or None if `timeout` seconds pass first or the work is cancelled."""
        try:
            event = await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None
        return None if event is _WAKE else event

    def cancel(self) -> None:
        """Stop the work; the engine notices within one decode or prefill step, and a
        waiting `next` returns at once."""
        if self._cancel.is_set():
            return
        self._cancel.set()
        try:
            self._loop.call_soon_threadsafe(self._events.put_nowait, _WAKE)
        except RuntimeError:  # the loop is gone
            pass

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block (an engine thread) until the work is cancelled."""
        return self._cancel.wait(timeout)

    def when_ended(self, callback: Callable[[], None]) -> None:
        """Call `callback` on the loop once the engine has ended the work (now, if it has)."""
        if self.ended:
            callback()
        else:
            self._ended_callbacks.append(callback)

    def put(self, event: EngineEvent) -> None:
        """Deliver an event from any thread (the engine's, or a test's fake engine)."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            self._cancel.set()

    def _deliver(self, event: EngineEvent) -> None:
        self._events.put_nowait(event)
        if isinstance(event, (Done, Failed)) and event.store:
            self.cache_store = event.store
        if isinstance(event, (Done, Failed)) and not self.ended:
            self.ended = True
            if self._on_end is not None:
                self._on_end(self)
            callbacks, self._ended_callbacks = self._ended_callbacks, []
            for callback in callbacks:
                callback()


_WAKE = object()  # not an engine event: wakes a `next` waiting on cancelled work
