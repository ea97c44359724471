"""The engine: one thread that owns MLX, loads a model and generates tokens for requests.

The event loop talks to it through thread-safe queues only (DESIGN principle 3).
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from collections.abc import Callable
from typing import Any

from msgspec import Struct


class Sampling(Struct, frozen=True):
    temperature: float
    top_p: float
    top_k: int


class Job(Struct, frozen=True):
    """One generation, as the engine thread receives it."""

    prompt: list[int]
    max_tokens: int
    sampling: Sampling


# What the engine sends back, in order: Prefilled once, Token per token, then Done or Failed.
class Prefilled(Struct, frozen=True):
    tokens: int
    seconds: float


class Token(Struct, frozen=True):
    id: int


class Done(Struct, frozen=True):
    # "stop" (end of sequence), "length" (max_tokens) or "cancelled".
    reason: str


class Failed(Struct, frozen=True):
    message: str


EngineEvent = Prefilled | Token | Done | Failed


class Cancelled(Exception):
    pass


class Loaded(Struct):
    """What a loader returns: the model, its tokenizer wrapper, its context length, where it runs."""

    model: Any
    tokenizer: Any
    context_length: int
    eos_ids: frozenset[int]
    device: str = ""


class Generation:
    """One job, seen from the event loop: its events arrive here, and it can be cancelled."""

    def __init__(self, loop: asyncio.AbstractEventLoop, on_end: Callable[[Generation], None] | None = None):
        self._loop = loop
        self._events: asyncio.Queue[EngineEvent] = asyncio.Queue()
        self._cancel = threading.Event()
        self._on_end = on_end
        self.ended = False
        # Monotonic times, for the request log: queued, and handed to the engine.
        self.submitted_at: float | None = None
        self.started_at: float | None = None

    async def next(self, timeout: float | None = None) -> EngineEvent | None:
        """The next event, or None if `timeout` seconds pass first."""
        try:
            return await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None

    def cancel(self) -> None:
        """Stop the work; the engine notices within one decode or prefill step."""
        self._cancel.set()

    @property
    def cancelled(self) -> bool:
        return self._cancel.is_set()

    def wait_cancelled(self, timeout: float | None = None) -> bool:
        """Block (an engine thread) until the work is cancelled."""
        return self._cancel.wait(timeout)

    def put(self, event: EngineEvent) -> None:
        """Deliver an event from any thread (the engine's, or a test's fake engine)."""
        try:
            self._loop.call_soon_threadsafe(self._deliver, event)
        except RuntimeError:  # the loop is gone (shutdown): nobody is listening
            self._cancel.set()

    def _deliver(self, event: EngineEvent) -> None:
        self._events.put_nowait(event)
        if isinstance(event, (Done, Failed)) and not self.ended:
            self.ended = True
            if self._on_end is not None:
                self._on_end(self)


class _Work(Struct):
    job: Job
    generation: Generation


_STOP = object()


class Engine:
    """A model on its own MLX thread. `submit` is the whole interface the scheduler uses."""

    def __init__(self, loader: Callable[[], Loaded], *, prefill_step: int = 512, name: str = "engine"):
        self._loader = loader
        self._prefill_step = prefill_step
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self.loaded: Loaded | None = None
        self.load_error: str | None = None
        self.busy = False
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        return self.loaded is not None

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        self._inbox.put(_STOP)

    def submit(self, job: Job, generation: Generation) -> None:
        """Hand `job` to the engine thread; its events arrive on `generation`."""
        self._inbox.put(_Work(job=job, generation=generation))

    # --- the engine thread -------------------------------------------------

    def _run(self) -> None:
        try:
            self.loaded = self._loader()
        except Exception as exc:  # a load failure is reported, not raised into the void
            self.load_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()
        while True:
            work = self._inbox.get()
            if work is _STOP:
                return
            if self.loaded is None:
                self._send(work, Failed(f"the model failed to load: {self.load_error}"))
                continue
            self.busy = True
            try:
                self._generate(work)
            except Cancelled:
                self._send(work, Done("cancelled"))
            except Exception as exc:
                self._send(work, Failed(f"{type(exc).__name__}: {exc}"))
            finally:
                self.busy = False

    def _send(self, work: _Work, event: EngineEvent) -> None:
        work.generation.put(event)

    def _generate(self, work: _Work) -> None:
        import mlx.core as mx
        from mlx_lm.generate import generate_step
        from mlx_lm.sample_utils import make_sampler

        job, loaded = work.job, self.loaded
        if work.generation.cancelled:
            raise Cancelled
        s = job.sampling
        sampler = make_sampler(temp=s.temperature, top_p=s.top_p if s.top_p < 1.0 else 0.0, top_k=s.top_k)

        def progress(done: int, total: int) -> None:
            if work.generation.cancelled:
                raise Cancelled

        started = time.perf_counter()
        steps = generate_step(
            mx.array(job.prompt),
            loaded.model,
            max_tokens=job.max_tokens,
            sampler=sampler,
            prefill_step_size=self._prefill_step,
            prompt_progress_callback=progress,
        )
        produced = 0
        try:
            for token, _ in steps:
                if produced == 0:
                    self._send(work, Prefilled(tokens=len(job.prompt), seconds=time.perf_counter() - started))
                if work.generation.cancelled:
                    raise Cancelled
                if token in loaded.eos_ids:
                    self._send(work, Done("stop"))
                    return
                produced += 1
                self._send(work, Token(token))
            self._send(work, Done("length"))
        finally:
            steps.close()
