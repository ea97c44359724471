"""Admission and order: which requests an engine runs, and which are turned away.

An engine decodes up to `max_batch` generations together (its own default, from
memory, unless `[engine] max_batch` says); the others wait here, in this order:
1. by Claude Code's request class (`RANKS`): the main conversation, then subagents and
   workflows, then compaction, then side requests (titles, summaries and classifiers:
   its `auxiliary` class, or its haiku model), so that background work never holds up
   the conversation the user is waiting for;
2. oldest first within each class;
3. except that a request waiting longer than MAX_WAIT seconds goes first, so that the
   others are delayed, never starved.
A main-conversation request is let in even when the batch is full, if no other one
runs: the engine prefills in the same order, so its first token waits for one prefill
chunk of someone else's at most, never for their answers.
A full queue is refused at once with 529 and `retry-after`, before any headers; so is
any request while the queue is drained (its model being replaced) or closed (the daemon
stopping).

Nothing is handed to an engine still loading its model: its `max_batch` comes from the
memory the model leaves, and the requests that came meanwhile go in together once it is
known, in the order above (`admit` does the same when the setting changes).
The engine, not the queue, says when a request is taken up (`Generation.started_at`, the
start of its `first_token` timer): when its prefill begins, which may be later than its
hand-off if its KV must wait for room beside the others'.
"""

from __future__ import annotations

import asyncio
import itertools
import time

from msgspec import Struct

from .engine import Engine
from .events import Failed, Generation, Job
from ..api.errors import Overloaded

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
        self._running: dict[Generation, Job] = {}
        self._order = itertools.count()
        self._idle: asyncio.Future | None = None
        self._loading: asyncio.Task | None = None  # waiting for the engine's model
        self.closed: str | None = None  # why new work is turned away (a swap, a stop)

    @property
    def waiting(self) -> int:
        return sum(1 for w in self._waiting if not w.generation.cancelled)

    @property
    def running(self) -> int:
        return len(self._running)

    def submit(self, job: Job) -> Generation:
        """Queue a job; raises Overloaded when the queue is full, drained or closed."""
        self.check_open()
        self._waiting = [w for w in self._waiting if not w.generation.cancelled]
        if self._running and len(self._waiting) >= self.queue_size:
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
        for generation in [w.generation for w in waiting] + list(self._running):
            if not generation.ended:
                generation.put(Failed(reason, retry=True))
                generation.cancel()

    def admit(self) -> None:
        """Hand the engine what it takes now: after its `max_batch` changed."""
        self._dispatch()

    def _dispatch(self) -> None:
        if self._waiting and not self.engine.wait_ready(0):
            # Loading: its max_batch is not known yet (one would let the first request
            # in alone, and the others wait for its whole answer).
            if self._loading is None:
                self._loading = asyncio.get_running_loop().create_task(self._loaded())
            return
        while self._waiting:
            chosen = min(self._waiting, key=self._rank)
            if chosen.generation.cancelled:
                self._waiting.remove(chosen)
                continue
            if not self._admits(chosen.job):
                return
            self._waiting.remove(chosen)
            self._running[chosen.generation] = chosen.job
            self.engine.submit(chosen.job, chosen.generation)

    async def _loaded(self) -> None:
        try:
            await asyncio.to_thread(self.engine.wait_ready)  # a threading.Event
        finally:
            self._loading = None
        self._dispatch()

    def _admits(self, job: Job) -> bool:
        if len(self._running) < self.engine.max_batch:
            return True
        return job.rank == 0 and all(j.rank > 0 for j in self._running.values())

    def _rank(self, w: _Waiting) -> tuple[int, int]:
        overdue = w.job.rank > 0 and time.monotonic() - w.since > MAX_WAIT
        return (-1 if overdue else w.job.rank, w.order)

    async def idle(self) -> None:
        """Wait until nothing runs or waits here."""
        while self._running or self.waiting:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle

    def _ended(self, generation: Generation) -> None:
        if self._running.pop(generation, None) is not None:
            self._dispatch()
        if not self._running and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)
