"""The engine: one thread that owns MLX, loads a model and generates tokens for requests.

The event loop talks to it through thread-safe queues only (DESIGN principle 3).
"""

from __future__ import annotations

import asyncio
import queue
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

from msgspec import Struct

from . import metal
from .cache import CHECKPOINT, FAILED, PrefixCache, prefix_copy, trimmable


class Sampling(Struct, frozen=True):
    temperature: float
    top_p: float
    top_k: int
    repetition_penalty: float = 1.0


class KVQuantization(NamedTuple):
    """`[engine] kv_bits`: attention layers' keys and values quantized from position `start` on.

    As in mlx-lm's `generate_step`, a layer's cache becomes a QuantizedKVCache once it
    holds `start` tokens; unlike it, a prefill chunk always ends right there, so the
    tokens before `start` are computed against full-precision keys and the ones after
    against quantized ones, however the prompt is cut into chunks and whatever came
    from the prefix cache: the answer does not depend on it.
    """

    bits: int
    group_size: int
    start: int


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


class Cancelled(Exception):
    pass


class Loaded(Struct):
    """What a loader returns: the model, its tokenizer wrapper, its context length, where it runs."""

    model: Any
    tokenizer: Any
    context_length: int
    eos_ids: frozenset[int]
    # Tokens the model chooses among (a request's top_k as large keeps them all).
    vocab_size: int = 2**31
    # The mlx-lm cache types of its layers (how the prefix cache can reuse them).
    cache_types: list[str] = []
    device: str = ""
    # Where this model's prefix-cache checkpoints go, when `[cache] persist` is on.
    cache_dir: Path | None = None
    weight_bytes: int = 0
    # What the models of this device may use in all (Metal's working set, or RAM; 0: unknown).
    memory_budget: int = 0
    # For a model that sees images: its processor and image token (vision.Vision), else None.
    vision: Any = None


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


class _Work(Struct):
    job: Job
    generation: Generation
    store: str = ""  # what became of its cache entry, for its last event


_STOP = object()


class Engine:
    """A model on its own MLX thread. `submit` is the whole interface the scheduler uses."""

    def __init__(
        self,
        loader: Callable[[], Loaded],
        *,
        prefill_step: int | None = None,
        cache: PrefixCache | None = None,
        persist: bool = False,
        name: str = "engine",
        kv_quantization: KVQuantization | None = None,
        wired: metal.WiredLimit = metal.WIRED,
    ):
        self._loader = loader
        self._prefill_step = prefill_step  # None: the device's default, known on the engine thread
        self._device_step = metal.CPU_PREFILL_STEP
        self._wired = wired
        self._quantize = kv_quantization
        self.cache = cache
        self._persist = persist  # save the cache's checkpoints, and load them at start
        self._inbox: queue.SimpleQueue = queue.SimpleQueue()
        self._ready = threading.Event()
        self.loaded: Loaded | None = None
        self.load_error: str | None = None
        # A setting this model cannot have (turned off); weights close to Metal's working set.
        self.warning: str | None = None
        # Metal's wired limit in bytes while this engine's model is loaded (None: not on Metal).
        self.wired_limit: int | None = None
        self.stream = None  # the MLX stream the engine thread computes on, once it runs
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        self._thread.start()

    @property
    def ready(self) -> bool:
        # Loaded, and done with what follows the load (the cache's sizing pass among it).
        return self.loaded is not None and self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        """Finish the work in hand, then end the thread and let go of the model."""
        self._inbox.put(_STOP)

    def wait_stopped(self, timeout: float | None = None) -> None:
        """Block until a stopped engine has let go of its model (a thread other than the loop's)."""
        self._thread.join(timeout)

    @property
    def prefill_step(self) -> int:
        """Prompt tokens per prefill step: the profile's, or the device's default."""
        return self._device_step if self._prefill_step is None else self._prefill_step

    def set_prefill_step(self, tokens: int | None) -> None:
        self._prefill_step = tokens

    def configure_cache(self, max_bytes: int | None, persist: bool) -> None:
        """`[cache]` settings from an edited profile: the model need not load again."""
        self._persist = persist
        if self.cache is not None:
            loaded = self.loaded
            self.cache.configure(max_bytes, loaded.cache_dir if persist and loaded else None)

    def submit(self, job: Job, generation: Generation) -> None:
        """Hand `job` to the engine thread; its events arrive on `generation`."""
        self._inbox.put(_Work(job=job, generation=generation))

    # --- the engine thread -------------------------------------------------

    def _run(self) -> None:
        import mlx.core as mx

        # All of this thread's work on a stream of its own, as mlx-lm's server runs its
        # generation thread (Metal streams belong to the thread that makes them).
        self.stream = mx.new_stream(mx.default_device())
        with mx.stream(self.stream):
            self._serve()

    def _serve(self) -> None:
        self._device_step = metal.default_prefill_step()
        try:
            self.loaded = self._loader()
            self.wired_limit = self._wired.hold()
            if too_large := metal.size_warning(self.loaded.weight_bytes, self.wired_limit):
                self._warn(too_large)
            if self._quantize is not None:
                self._check_quantization()
            if self.cache is not None:
                # Its KV bytes per token, and a budget from memory unless [cache] max_gb says.
                self.cache.prepare(self.loaded.model, self.loaded.memory_budget, self.loaded.weight_bytes)
            if self.cache is not None and self._persist:
                self.cache.persist_dir = self.loaded.cache_dir
                self.cache.load_persisted()
        except Exception as exc:  # a load failure is reported, not raised into the void
            self.load_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()
        while True:
            work = self._inbox.get()
            if work is _STOP:
                self._release()
                return
            if self.loaded is None:
                self._send(work, Failed(f"the model failed to load: {self.load_error}"))
                continue
            try:
                ending: EngineEvent = Done(self._generate(work), work.store)
            except Cancelled:
                ending = Done("cancelled", work.store)
            except Exception as exc:
                _reset_random_state()
                ending = Failed(f"{type(exc).__name__}: {exc}", store=work.store)
            self._send(work, ending)
            if self.cache is not None:
                # Once the request has its end: a large model's checkpoint is gigabytes,
                # and writing it must not hold the answer up.
                self.cache.save()

    def _check_quantization(self) -> None:
        # Some attention layers cannot run on quantized keys (gpt-oss's attention sinks):
        # better a model with full-precision keys than one whose every request fails.
        import mlx.core as mx
        from mlx_lm.models.cache import make_prompt_cache

        from .decode import quantize_due

        kv = make_prompt_cache(self.loaded.model)
        try:
            self.loaded.model(mx.array([[0]]), cache=kv)
            quantize_due(kv, self._quantize._replace(start=0), 1)
            mx.eval(self.loaded.model(mx.array([[0]]), cache=kv))
        except (ValueError, NotImplementedError, RuntimeError) as exc:
            self._quantize = None
            self._warn(f"[engine] kv_bits is off for this model: {exc}")

    def _warn(self, warning: str) -> None:
        self.warning = f"{self.warning}; {warning}" if self.warning else warning
        print(f"anyclaude: {warning}", file=sys.stderr, flush=True)

    def _release(self) -> None:
        import gc

        import mlx.core as mx

        self.loaded = None
        self.cache = None
        gc.collect()
        if self.wired_limit is not None:
            mx.synchronize()  # the wired limit must not change during an evaluation
            self.wired_limit = None
            self._wired.release()
        mx.clear_cache()  # give the freed weights and KV caches back to the system

    def _send(self, work: _Work, event: EngineEvent) -> None:
        work.generation.put(event)

    def _generate(self, work: _Work) -> str:
        """Run a job; its ending ("stop", "length"), once its cache entry is stored."""
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        from . import decode

        job, loaded = work.job, self.loaded
        if work.generation.cancelled:
            raise Cancelled
        s = job.sampling
        sampler = make_sampler(temp=s.temperature, top_p=s.top_p if s.top_p < 1.0 else 0.0, top_k=s.top_k)
        started = time.perf_counter()
        # Images' tokens are keyed by the images' hashes.
        key = job.images.keys if job.images is not None else job.prompt
        reuse = self.cache.fetch(key) if self.cache else None
        kv = reuse.cache if reuse and reuse.cache is not None else make_prompt_cache(loaded.model)
        cached = reuse.tokens if reuse else 0
        if self.cache:
            # The budget holds this request's KV too, as long as it may grow.
            self.cache.reserve(len(job.prompt) + job.max_tokens)
        generated: list[int] = []
        failed = False
        # What the cache holds, whatever its type: the tokens given to the model.
        fed = _Counted(_with_images(loaded.model, job, cached), cached)
        try:
            done = cached
            if self.cache and cached < job.checkpoint < len(job.prompt) - 1:
                # The shared system+tools prefix becomes its own entry, for the side
                # requests and subagents that share it (and, saved, for the next start).
                # (Were it cached already, the fetch above would have reused it.)
                self._prefill(fed, kv, job.prompt[done : job.checkpoint], work)
                done = job.checkpoint
                self.cache.store(key[:done], prefix_copy(kv, done), CHECKPOINT)

            def check() -> None:
                if work.generation.cancelled:
                    raise Cancelled

            steps = decode.tokens(
                fed,
                job.prompt[done:],
                kv,
                max_tokens=job.max_tokens,
                sampler=sampler,
                processors=self._processors(job),
                prefill_step=self.prefill_step,
                check=check,
                history=job.prompt[:done],
                quantize=self._quantize,
            )
            try:
                for token in steps:
                    if not generated:
                        took = time.perf_counter() - started
                        self._send(work, Prefilled(len(job.prompt), took, cached, reuse.kind if reuse else "", reuse.lookup if reuse else ""))
                    generated.append(token)
                    if work.generation.cancelled:
                        raise Cancelled
                    if token in loaded.eos_ids:
                        return "stop"
                    self._send(work, Token(token))
                    if len(generated) == 1 and self.cache and not trimmable(kv):
                        # The prompt alone, before its answer: the next turn re-renders
                        # the answer and may part from it right there, and a cache that
                        # cannot be trimmed is reused by exact prefix only.
                        self.cache.store(key, prefix_copy(kv, len(job.prompt)), side=job.side)
                return "length"
            finally:
                steps.close()
        except Cancelled:
            raise
        except Exception:
            failed = True
            raise
        finally:
            # Whatever the KV cache holds now (all of it, or the prefill done before a
            # cancel or a timeout) is kept, so the next turn, or a retry, resumes from it.
            # Not after a failure: a forward pass cut short leaves its layers disagreeing.
            # (Before the last event goes out, so that it says what became of the entry.)
            if self.cache:
                self.cache.reserve(0)  # what the request holds is stored now, or freed
            if self.cache and failed:
                work.store = FAILED
            elif self.cache:
                work.store = self.cache.store((key + generated)[: fed.count], kv, prompt=len(job.prompt), side=job.side)

    def _processors(self, job: Job) -> list | None:
        from mlx_lm.sample_utils import make_logits_processors

        processors = []
        # A grammar decides the structure of a forced call; penalising its repeated
        # quotes and braces would only fight it.
        if job.sampling.repetition_penalty != 1.0 and not job.grammar:
            processors += make_logits_processors(repetition_penalty=job.sampling.repetition_penalty, repetition_context_size=64)
        if job.processors:
            processors += job.processors(self.loaded.tokenizer)
        return processors or None

    def _prefill(self, model: _Counted, kv: list, tokens: list[int], work: _Work) -> None:
        import mlx.core as mx

        from .decode import chunk_end, quantize_due

        while tokens:
            if work.generation.cancelled:
                raise Cancelled
            n = min(self.prefill_step, len(tokens), chunk_end(self._quantize, model.count) - model.count)
            model(mx.array(tokens[:n])[None], cache=kv)
            quantize_due(kv, self._quantize, model.count)
            mx.eval([c.state for c in kv])
            tokens = tokens[n:]


def _with_images(model, job: Job, position: int):
    if job.images is None:
        return model
    from .vision import Prompted

    return Prompted(model, job.prompt, job.images, position)


class _Counted:
    """A model that counts the tokens it is given (it is all a linear-attention or SSM
    layer's cache can tell of what it holds)."""

    def __init__(self, model, count: int):
        self.model, self.count = model, count

    def __call__(self, inputs, cache=None):
        out = self.model(inputs, cache=cache)
        self.count += inputs.shape[-1]
        return out


def _reset_random_state() -> None:
    # mlx-lm's compiled samplers take MLX's global random state as input and output; an
    # exception inside one leaves that state without a value, and every later sampled
    # request would fail on it. A fresh seed gives it one again.
    import os

    import mlx.core as mx

    mx.random.seed(int.from_bytes(os.urandom(4), "little"))
