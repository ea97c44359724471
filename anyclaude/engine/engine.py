"""The engine: one thread that owns MLX, loads a model and generates tokens for requests.

The event loop talks to it through thread-safe queues only (DESIGN principle 3).

It runs several requests at once. Each turn of its loop computes one prefill chunk, for
the first by rank (scheduler.RANKS) and age among the requests it holds, then decodes
one token for every request past its prefill, those that can be merged in one batched
forward pass (`batch.Batch`). So a new request's first token waits for one chunk of
someone else's prefill at most, and no stream stalls for longer than a chunk. A request
begins its prefill only once its KV (prompt plus `max_tokens`) fits in the cache budget
beside the live requests' (the stored entries give way to it); alone, it always runs.
Until then it is queued, not served: its `first_token` timer starts with its prefill.

Merging a sequence into a batch, and taking one out, copies the batch's KV beside the
old arrays for a moment; the budget holds that copy too, and a join whose copy does not
fit waits (the sequence decodes on its own meanwhile). Sequences of very different
lengths are not merged (MERGE_RATIO): the short one would be padded to the long one.
"""

from __future__ import annotations

import queue
import sys
import threading
import time
import itertools
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from msgspec import Struct

from . import metal
from .cache import CHECKPOINT, FAILED, REPLY, TURN, PrefixCache, Reuse, prefix_copy, trimmable, trimmable_at
from .events import Done, Failed, Generation, Job, Prefilled, Token

if TYPE_CHECKING:
    from .batch import Batch
    from .decode import Decoder


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


class _Work(Struct):
    job: Job
    generation: Generation


class _Sequence:
    """A job on the engine thread: its prompt computed a chunk at a time, then its tokens,
    in a batch with others."""

    def __init__(self, work: _Work, order: int):
        self.job, self.generation, self.order = work.job, work.generation, order
        self.key: list[int] = []  # its prompt as the prefix cache keys it
        self.decoder: Decoder | None = None  # once begun
        self.steps: Iterator[int | None] | None = None  # its prefill, until its first token
        self.generated: list[int] = []
        self.last = 0  # the last token generated, not yet fed to the model
        self.batch: Batch | None = None
        self.begun = 0.0
        self.reuse: Reuse | None = None
        self.ended = False
        self.mergeable = False  # its cache can be merged with others' in a batch

    @property
    def priority(self) -> tuple[int, int]:
        return (self.job.rank, self.order)

_STOP = object()
# The most generations an engine decodes together unless `[engine] max_batch` says.
DEFAULT_BATCH = 8
# Sequences are merged in one batch only while the longest is at most this many times
# the shortest: mlx-lm's batched caches left-pad every row to the longest, and a short
# request beside a long one would hold (and attend over) the long one's length, beyond
# its reservation (figures: bench/batch_memory.py). Further apart, they decode in
# separate batches, a forward pass each.
MERGE_RATIO = 4.0


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
        max_batch: int | None = None,
    ):
        self._loader = loader
        self._prefill_step = prefill_step  # None: the device's default, known on the engine thread
        self._device_step = metal.CPU_PREFILL_STEP
        self._wired = wired
        self._quantize = kv_quantization
        self._max_batch = max_batch  # None: from memory, once loaded
        self._default_batch = 1
        self.batch_copied = 0  # KV bytes copied into the batch and out (batch.Batch)
        self._steps = 0  # decode steps taken
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

    @property
    def max_batch(self) -> int:
        """Generations decoded together at most: the profile's, or as many requests of
        half the model's window as the KV budget holds (1 to DEFAULT_BATCH)."""
        return self._default_batch if self._max_batch is None else self._max_batch

    def set_max_batch(self, sequences: int | None) -> None:
        self._max_batch = sequences

    def configure_cache(self, max_bytes: int | None, persist: bool) -> None:
        """`[cache]` settings from an edited profile: the model need not load again."""
        self._persist = persist
        if self.cache is not None:
            loaded = self.loaded
            self.cache.configure(max_bytes, loaded.cache_dir if persist and loaded else None)

    def submit(self, job: Job, generation: Generation) -> None:
        """Hand `job` to the engine thread; its events arrive on `generation`, whose
        `started_at` the engine sets when it begins the prefill."""
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
            self._default_batch = self._batch_from_memory()
            if self.cache is not None and self._persist:
                self.cache.persist_dir = self.loaded.cache_dir
                self.cache.load_persisted()
        except Exception as exc:  # a load failure is reported, not raised into the void
            self.load_error = f"{type(exc).__name__}: {exc}"
        finally:
            self._ready.set()
        self._loop()

    def _loop(self) -> None:
        if self.loaded is None:
            while (work := self._inbox.get()) is not _STOP:
                work.generation.put(Failed(f"the model failed to load: {self.load_error}"))
            self._release()
            return
        order = itertools.count()
        # Received, not begun; begun, prefilling; decoding, in batches: those that can be
        # merged, grouped by length, and one of its own for each of the others.
        pending: list[_Sequence] = []
        filling: list[_Sequence] = []
        self._batches: list[Batch] = []
        copied = 0  # by the batches gone
        stopping = False
        while True:
            busy = bool(pending or filling or any(self._batches))
            if stopping and not busy:
                self._release()
                return
            work = self._inbox.get() if not busy else _get_nowait(self._inbox)
            while work is not None:
                if work is _STOP:
                    stopping = True
                else:
                    pending.append(_Sequence(work, next(order)))
                work = _get_nowait(self._inbox)
            for seq in [s for s in pending if s.generation.cancelled]:
                pending.remove(seq)
                seq.generation.put(Done("cancelled"))
            self._prefill_next(pending, filling)
            self._regroup()
            for batch in list(self._batches):
                if batch:
                    self._decode(batch)
            copied += sum(b.copied for b in self._batches if not b)
            self._batches = [b for b in self._batches if b]
            self.batch_copied = copied + sum(b.copied for b in self._batches)

    def _prefill_next(self, pending: list[_Sequence], filling: list[_Sequence]) -> None:
        """One prefill chunk, for the first in rank among those begun and the first of
        those received, if its KV fits beside the live ones'; one that has its first
        token joins a batch.

        The others received wait behind the first, even those that would fit: a large
        request waits for room, not for a gap that smaller ones never leave."""
        first = min(pending, key=lambda s: s.priority, default=None)
        candidates = filling + ([first] if first is not None and self._fits(first, filling) else [])
        if not candidates:
            return
        seq = min(candidates, key=lambda s: s.priority)
        if seq in pending:
            pending.remove(seq)
            filling.append(seq)
        try:
            if seq.steps is None:
                self._begin(seq)
            token = self._advance(seq)
            if token is not None:
                self._first(seq, token)
        except Exception as exc:
            self._fail(seq, exc)
        if seq.steps is None:  # it has its first token, or an end
            filling.remove(seq)

    def _fits(self, seq: _Sequence, filling: list[_Sequence]) -> bool:
        """Memory admission: a request waits while its KV would not fit beside the live
        ones' (it runs alone in any case: the prefix cache gives way to it).

        No room is kept back for the copy a batch makes when a member leaves (`_end`):
        the stored entries give way to it, and keeping it free would hold requests back
        for the whole answers of the others, at a budget that fits them all."""
        if self.cache is None or not (filling or any(self._batches)):
            return True
        return self.cache.room(len(seq.job.prompt) + seq.job.max_tokens)

    def _batch_from_memory(self) -> int:
        if self.cache is None:
            return DEFAULT_BATCH
        request = self.cache.size.bytes(self.loaded.context_length // 2)
        return max(1, min(DEFAULT_BATCH, self.cache.max_bytes // max(request, 1)))

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

    def _begin(self, seq: _Sequence) -> None:
        """Take the prompt's cached prefix and reserve its KV; its prefill, to run in steps."""
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        from .decode import Decoder

        job, loaded = seq.job, self.loaded
        seq.begun = time.perf_counter()
        # Taken up now, not when handed over: waiting for room beside the others is
        # queueing, and must not count against its prefill (the first_token timer).
        seq.generation.started_at = time.monotonic()
        s = job.sampling
        sampler = make_sampler(temp=s.temperature, top_p=s.top_p if s.top_p < 1.0 else 0.0, top_k=s.top_k)
        # Images' tokens are keyed by the images' hashes.
        seq.key = job.images.keys if job.images is not None else job.prompt
        reuse = seq.reuse = self.cache.fetch(seq.key) if self.cache else None
        kv = reuse.cache if reuse and reuse.cache is not None else make_prompt_cache(loaded.model)
        cached = reuse.tokens if reuse else 0
        whole = _whole_images(loaded.model, job)
        if reuse and whole:
            kv, cached = _resumable(loaded.model, kv, cached, whole)
            reuse.tokens = cached
        if self.cache:
            # The budget holds this request's KV too, as long as it may grow.
            self.cache.reserve(seq, len(job.prompt) + job.max_tokens)
        model = _with_images(loaded.model, job, cached)
        seq.decoder = Decoder(model, kv, sampler=sampler, processors=self._processors(job), history=job.prompt[:cached], quantize=self._quantize, sampling=s, whole=whole)
        if reuse:
            reuse.cache = None  # the decoder's now: held here too, it would outlive a join
        seq.steps = self._prefill(seq, cached)

    def _prefill(self, seq: _Sequence, cached: int) -> Iterator[int | None]:
        job, decoder = seq.job, seq.decoder
        done = cached
        if self.cache and cached < job.checkpoint < len(job.prompt) - 1:
            # The shared system+tools prefix becomes its own entry, for the side
            # requests and subagents that share it (and, saved, for the next start).
            # (Were it cached already, the fetch above would have reused it.)
            yield from decoder.extend(job.prompt[done : job.checkpoint], self.prefill_step)
            done = job.checkpoint
            with self._copying(self.cache.size.bytes(done)):
                checkpoint = prefix_copy(decoder.cache, done)
            self.cache.store(seq.key[:done], checkpoint, CHECKPOINT)  # counted as stored from here
        reply = job.reply_start
        if self.cache and done < reply < len(job.prompt) and not trimmable_at(decoder.cache, reply):
            # A cache that cannot be cut back is kept where the next turn renders this
            # one's answer from (perhaps otherwise than it is generated), and where a
            # retry of this prompt resumes.
            yield from decoder.extend(job.prompt[done:reply], self.prefill_step)
            done = reply
            with self._copying(self.cache.size.bytes(done)):
                snapshot = prefix_copy(decoder.cache, done)
            self.cache.store(seq.key[:done], snapshot, point=TURN if job.user_turn else REPLY, side=job.side)
        yield from decoder.prefill(job.prompt[done:], self.prefill_step)

    def _advance(self, seq: _Sequence) -> int | None:
        """One prefill chunk; the first token, once the prompt is computed."""
        if seq.generation.cancelled:
            self._end(seq, "cancelled")
            return None
        token = next(seq.steps)
        if token is not None:
            seq.steps = None
        return token

    def _first(self, seq: _Sequence, token: int) -> None:
        from .batch import Batch, batchable

        job, reuse = seq.job, seq.reuse
        took = time.perf_counter() - seq.begun
        seq.generation.put(Prefilled(len(job.prompt), took, reuse.tokens if reuse else 0, reuse.kind if reuse else "", reuse.lookup if reuse else ""))
        if self._took(seq, token):
            return
        if self.cache and not job.reply_start and not trimmable(seq.decoder.cache):
            # Where its generation prompt begins is not known: the prompt alone, before
            # its answer (the next turn re-renders the answer and may part from it right
            # there, and a cache that cannot be trimmed is reused by exact prefix only).
            with self._copying(self.cache.size.bytes(len(job.prompt))):
                prompt = prefix_copy(seq.decoder.cache, len(job.prompt))
            self.cache.store(seq.key, prompt, side=job.side, point=TURN)
        seq.mergeable = job.images is None and self._quantize is None and batchable(seq.decoder.cache)
        seq.batch = Batch(self.loaded.model)
        self._batches.append(seq.batch)
        seq.batch.join(seq)
        self._merge(seq)

    def _regroup(self) -> None:
        """Merge the mergeable sequences decoding on their own into a batch, where they
        fit now: their lengths have come closer, or the copy has room."""
        for batch in list(self._batches):
            if batch.alone and batch.members[0].mergeable:
                self._merge(batch.members[0])

    def _merge(self, seq: _Sequence) -> None:
        """Move `seq`, decoding on its own, into the batch of the others of about its
        length (MERGE_RATIO), when the copy that joining makes fits in the budget
        beside the live KV (the stored entries give way to it); else it goes on alone."""
        if not seq.mergeable:
            return
        others = [b for b in self._batches if b is not seq.batch and b and b.members[0].mergeable and b.fits(seq, MERGE_RATIO)]
        # The largest batch whose copy fits: the fewer batches, the fewer forward passes.
        costs = [(b, b.join_cost(seq)) for b in sorted(others, key=len, reverse=True)]
        batch, cost = next(((b, c) for b, c in costs if self.cache is None or self.cache.fits(c)), (None, 0))
        if batch is None:
            return
        seq.batch.leave(seq)  # alone: its own cache, nothing copied
        self._batches.remove(seq.batch)
        seq.batch = batch
        with self._copying(cost):
            batch.join(seq)

    def _took(self, seq: _Sequence, token: int) -> bool:
        """Record a generated token; whether that ended the sequence."""
        seq.generated.append(token)
        if seq.generation.cancelled:
            self._end(seq, "cancelled")
        elif token in self.loaded.eos_ids:
            self._end(seq, "stop")
        else:
            seq.generation.put(Token(token))
            seq.last = token
            if len(seq.generated) < seq.job.max_tokens:
                return False
            self._end(seq, "length")
        return True

    def _decode(self, batch: Batch) -> None:
        """One token for each member of `batch`."""
        for seq in [m for m in batch.members if m.generation.cancelled]:
            self._end(seq, "cancelled")
        members = list(batch.members)
        if not members:
            return
        try:
            tokens = batch.step()
        except Exception as exc:
            _reset_random_state()
            for seq in members:
                self._fail(seq, exc, reset=False)
            return
        for seq, token in zip(members, tokens):
            if isinstance(token, Exception):
                self._fail(seq, token)
            else:
                self._took(seq, token)
        self._steps += 1
        if self._steps % 256 == 0:
            import mlx.core as mx

            mx.clear_cache()

    def _fail(self, seq: _Sequence, exc: Exception, reset: bool = True) -> None:
        if reset:
            _reset_random_state()
        self._end(seq, error=f"{type(exc).__name__}: {exc}")

    def _end(self, seq: _Sequence, reason: str = "", error: str | None = None) -> None:
        """Its last event, once its cache entry is stored.

        Whatever the KV cache holds now (all of it, or the prefill done before a cancel
        or a timeout) is kept, so the next turn, or a retry, resumes from it. Not after a
        failure: a forward pass cut short leaves its layers disagreeing."""
        if seq.ended:
            return
        seq.ended = True
        if seq.batch is not None:
            with self._copying(seq.batch.leave_cost()):
                kv = seq.batch.leave(seq)
        else:
            kv = seq.decoder.cache if seq.decoder else None
        seq.batch = None
        store = ""
        if self.cache:
            self.cache.reserve(seq, 0)  # what the request holds is stored now, or freed
        if self.cache and seq.decoder is not None:
            if error is not None:
                store = FAILED
            else:
                store = self.cache.store((seq.key + seq.generated)[: seq.decoder.position], kv, prompt=len(seq.job.prompt), side=seq.job.side)
        seq.decoder = seq.steps = None
        seq.generation.put(Done(reason, store) if error is None else Failed(error, store=store))
        if self.cache is not None:
            # Once the request has its end: a large model's checkpoint is gigabytes,
            # and writing it must not hold the answer up.
            self.cache.save()

    @contextmanager
    def _copying(self, nbytes: int) -> Iterator[None]:
        # A copy of live KV (a batch merged or split, an entry cut out of a cache) holds
        # its bytes beside the originals until it is made: the budget holds them too,
        # the stored entries making way, for as long as it takes.
        if self.cache is None or not nbytes:
            yield
            return
        token = object()
        self.cache.hold(token, nbytes)
        try:
            yield
        finally:
            self.cache.hold(token, 0)

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


def _get_nowait(inbox: queue.SimpleQueue):
    try:
        return inbox.get_nowait()
    except queue.Empty:
        return None


def _with_images(model, job: Job, position: int):
    if job.images is None:
        return model
    from ..vision import Prompted

    return Prompted(model, job.prompt, job.images, position)


def _whole_images(model, job: Job) -> list[tuple[int, int]]:
    if job.images is None:
        return []
    from ..vision import whole_spans

    return whole_spans(model, job.images)


def _resumable(model, kv: list, cached: int, whole: list[tuple[int, int]]) -> tuple[list, int]:
    """The cache and its token count cut back to the start of the image its prefix ends
    inside of, if it does (an image whose tokens attend to each other both ways must be
    computed whole): trimmed, or, where it cannot be trimmed, none reused."""
    from mlx_lm.models.cache import make_prompt_cache, trim_prompt_cache

    from ..vision import resume_at

    start = resume_at(whole, cached)
    if start == cached:
        return kv, cached
    if trimmable(kv):
        trim_prompt_cache(kv, cached - start)
        return kv, start
    return make_prompt_cache(model), 0


def _reset_random_state() -> None:
    # mlx-lm's compiled samplers take MLX's global random state as input and output; an
    # exception inside one leaves that state without a value, and every later sampled
    # request would fail on it. A fresh seed gives it one again.
    import os

    import mlx.core as mx

    mx.random.seed(int.from_bytes(os.urandom(4), "little"))
