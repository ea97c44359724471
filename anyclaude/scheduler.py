"""Admission and order: which request an engine runs next, and which are turned away.

One engine runs one generation at a time; the others wait here, in this order:
1. by Claude Code's request class (`RANKS`): the main conversation, then subagents and
   workflows, then compaction, then side requests (titles, summaries and classifiers:
   its `auxiliary` class, or its haiku model), so that background work never holds up
   the conversation the user is waiting for;
2. oldest first within each class;
3. except that a request waiting longer than MAX_WAIT seconds goes first, so that the
   others are delayed, never starved.
A full queue is refused at once with 529 and `retry-after`, before any headers; so is
any request while the queue is drained (its model being replaced) or closed (the daemon
stopping).
"""

from __future__ import annotations

import asyncio
import itertools
import time

from msgspec import Struct

from .engine import Engine, Failed, Generation, Job
from .errors import Overloaded

MAX_WAIT = 30.0
# x-claude-code-request-class -> rank (a class it does not know ranks as main).
RANKS = {"main": 0, "subagent": 1, "workflow": 1, "compaction": 2, "auxiliary": 3}
SIDE = RANKS["auxiliary"]
RETRY_AFTER_SECONDS = 5


class _Waiting(Struct):
    job: Job
    generation: Generation
    since: float
    order: int


class Scheduler:
    """The queue in front of one engine."""

    def __init__(self, engine: Engine, *, queue_size: int):
        self.engine = engine
        self.queue_size = queue_size
        self._waiting: list[_Waiting] = []
        self._running: Generation | None = None
        self._order = itertools.count()
        self._idle: asyncio.Future | None = None
        self.closed: str | None = None  # why new work is turned away (a swap, a stop)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiting if not w.generation.cancelled)

    @property
    def running(self) -> bool:
        return self._running is not None

    def submit(self, job: Job) -> Generation:
        """Queue a job; raises Overloaded when the queue is full, drained or closed."""
        self.check_open()
        self._waiting = [w for w in self._waiting if not w.generation.cancelled]
        if self._running is not None and len(self._waiting) >= self.queue_size:
            raise Overloaded(
                f"the engine is busy and {len(self._waiting)} requests are waiting (queue_size {self.queue_size}); retry shortly",
                headers={"retry-after": str(RETRY_AFTER_SECONDS)},
            )
        generation = Generation(asyncio.get_running_loop(), on_end=self._ended)
        generation.submitted_at = time.monotonic()
        self._waiting.append(_Waiting(job, generation, generation.submitted_at, next(self._order)))
        self._dispatch()
        return generation

    def check_open(self) -> None:
        """Raise Overloaded (529, retry-after) if the queue is drained or closed."""
        if self.closed:
            raise Overloaded(self.closed, headers={"retry-after": str(RETRY_AFTER_SECONDS)})

    def drain(self, reason: str) -> None:
        """Turn new work away with `reason`; the work in hand goes on (`idle` waits for it)."""
        self.closed = reason

    def close(self, reason: str) -> None:
        """End the work in hand now, with `reason` as its error, and turn new work away."""
        self.drain(reason)
        waiting, self._waiting = self._waiting, []
        for generation in [w.generation for w in waiting] + [self._running]:
            if generation is not None and not generation.ended:
                generation.put(Failed(reason, retry=True))
                generation.cancel()

    def _dispatch(self) -> None:
        while self._running is None and self._waiting:
            chosen = min(self._waiting, key=self._rank)
            self._waiting.remove(chosen)
            if chosen.generation.cancelled:
                continue
            self._running = chosen.generation
            chosen.generation.started_at = time.monotonic()
            self.engine.submit(chosen.job, chosen.generation)

    def _rank(self, w: _Waiting) -> tuple[int, int]:
        overdue = w.job.rank > 0 and time.monotonic() - w.since > MAX_WAIT
        return (-1 if overdue else w.job.rank, w.order)

    async def idle(self) -> None:
        """Wait until nothing runs or waits here."""
        while self._running is not None or self.waiting:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def _ended(self, generation: Generation) -> None:
        if generation is self._running:
            self._running = None
            self._dispatch()
        if self._running is None and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
