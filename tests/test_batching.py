"""Continuous batching (issue 14): requests decoded together answer as they do alone, on
random-weight models of every architecture and on the tiny model; an ending or a cancel
leaves the others going; prefill goes by rank; a request whose KV does not fit waits."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

import mlx.core as mx

from anyclaude.engine.batch import Batch
from anyclaude.engine.cache import PrefixCache
from anyclaude.engine.decode import Decoder
from anyclaude.engine.engine import Engine, Loaded
from anyclaude.engine.events import Done, Failed, Generation, Job, Prefilled, Sampling, Token
from anyclaude.engine.scheduler import Scheduler
from families import ARCHITECTURES, build

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0)
ANSWER = 24


class Watched:
    """The model, recording the batch size of each forward pass; a pass can be held until
    the test lets it go (so that jobs submitted one after another are all waiting)."""

    def __init__(self, model):
        self.model, self.batches, self.times = model, [], []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs, cache=None):
        self.gate.wait()
        self.batches.append(inputs.shape[0])
        self.times.append(time.monotonic())
        return self.model(inputs, cache=cache)

    def __getattr__(self, name):  # make_cache, layers: the model's own
        return getattr(self.model, name)


@contextmanager
def engine(model, tokenizer, cache: PrefixCache | None = None, step: int = 32) -> Iterator[Engine]:
    loaded = Loaded(model=model, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset())
    e = Engine(lambda: loaded, prefill_step=step, cache=cache)
    e.start()
    e.wait_ready()
    try:
        yield e
    finally:
        e.stop()
        e.wait_stopped()


class Answer:
    def __init__(self):
        self.tokens: list[int] = []
        self.end: Done | Failed | None = None
        self.prefilled_at: int | None = None  # the order its first token came in


def run(e: Engine, jobs: list[Job], cancel_after: dict[int, int] | None = None, before=lambda: None) -> list[Answer]:
    """Submit `jobs` together; their answers. `cancel_after`: job index -> tokens after
    which its client hangs up."""

    async def main():
        loop = asyncio.get_running_loop()
        answers = [Answer() for _ in jobs]
        generations = [Generation(loop) for _ in jobs]
        for job, generation in zip(jobs, generations):
            e.submit(job, generation)
        before()
        order = iter(range(len(jobs)))
        await asyncio.gather(*(collect(g, a, order, (cancel_after or {}).get(i)) for i, (g, a) in enumerate(zip(generations, answers))))
        return answers

    return asyncio.run(main())


async def collect(generation: Generation, answer: Answer, order: Iterator[int], cancel_after: int | None = None) -> None:
    """Fill `answer` with `generation`'s events (its client hangs up after `cancel_after` tokens)."""
    while True:
        event = await generation.next(120)
        if event is None and generation.cancelled:
            continue  # the wake-up of a cancel; its end follows
        assert event is not None, "no event for 120 s"
        if isinstance(event, Prefilled):
            answer.prefilled_at = next(order)
        elif isinstance(event, Token):
            answer.tokens.append(event.id)
            if len(answer.tokens) == cancel_after:
                generation.cancel()
        else:
            answer.end = event
            return


def scheduled(scheduler: Scheduler, jobs: list[Job], before=lambda: None) -> tuple[list[Answer], list[Generation]]:
    """Submit `jobs` through `scheduler` (made on the loop by the caller's factory), together."""

    async def main():
        queue = scheduler()
        generations = [queue.submit(job) for job in jobs]
        before()
        answers = [Answer() for _ in jobs]
        order = iter(range(len(jobs)))
        await asyncio.gather(*(collect(g, a, order) for g, a in zip(generations, answers)))
        return answers, generations

    return asyncio.run(main())


def live_requests(cache: PrefixCache) -> list[int]:
    """How many requests hold a reservation in `cache`, after each change from now on."""
    counts: list[int] = []
    held: set = set()
    reserve = cache.reserve

    def counting(owner, tokens):
        (held.add if tokens else held.discard)(owner)
        counts.append(len(held))
        reserve(owner, tokens)

    cache.reserve = counting
    return counts


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def prompts(tokenizer) -> list[list[int]]:
    system = ids(tokenizer, "<|im_start|>system\nYou are a coding agent. Tools: Read(path), Bash(command). " * 2 + "<|im_end|>\n")
    asks = ["Read the README.", "Run the tests, then tell me which failed and why.", "What is in src?", "Explain the build, step by step, for a new contributor."]
    return [system + ids(tokenizer, f"<|im_start|>user\n{a}<|im_end|>\n<|im_start|>assistant\n") for a in asks]


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_answers_decoded_together_equal_answers_alone(architecture, tokenizer):
    model = Watched(build(architecture))
    with engine(model, tokenizer, PrefixCache(2**30)) as e:
        jobs = [Job(prompt=p, max_tokens=ANSWER, sampling=GREEDY) for p in prompts(tokenizer)]
        alone = [run(e, [job])[0].tokens for job in jobs]
        model.batches.clear()
        together = run(e, jobs)
    assert [a.tokens for a in together] == alone
    assert all(a.end == Done("length", a.end.store) for a in together)
    # They were decoded together, all four in one pass at some point.
    assert max(model.batches) == len(jobs), sorted(set(model.batches))


def test_an_ending_or_a_cancel_leaves_the_others_going(tokenizer):
    model = Watched(build("llama"))
    with engine(model, tokenizer, PrefixCache(2**30)) as e:
        ps = prompts(tokenizer)
        jobs = [Job(prompt=ps[0], max_tokens=12, sampling=GREEDY), Job(prompt=ps[1], max_tokens=ANSWER, sampling=GREEDY), Job(prompt=ps[2], max_tokens=ANSWER, sampling=GREEDY)]
        alone = [run(e, [job])[0].tokens for job in jobs]
        model.batches.clear()
        together = run(e, jobs, cancel_after={2: 6})
        # The cancelled one's KV is kept: its retry resumes from it.
        retry = run(e, [Job(prompt=ps[2] + together[2].tokens[:5], max_tokens=2, sampling=GREEDY)])[0]
    assert together[0].tokens == alone[0] and together[0].end.reason == "length"
    assert together[1].tokens == alone[1] and together[1].end.reason == "length"
    assert together[2].end.reason == "cancelled" and together[2].tokens == alone[2][: len(together[2].tokens)]
    assert together[2].end.store == "stored"
    assert retry.tokens == alone[2][5:7]
    assert max(model.batches) == 3


def test_prefill_goes_by_rank(tokenizer):
    model = Watched(build("llama"))
    with engine(model, tokenizer) as e:
        long = prompts(tokenizer)[3] * 4  # many prefill chunks
        short = prompts(tokenizer)[0]
        subagents = [Job(prompt=long, max_tokens=2, sampling=GREEDY, rank=1) for _ in range(3)]
        main = Job(prompt=short, max_tokens=2, sampling=GREEDY, rank=0)
        model.gate.clear()  # nothing runs until all four are in
        answers = run(e, [*subagents, main], before=model.gate.set)
    # The main conversation, sent last, had its first token first.
    assert answers[3].prefilled_at == 0, [a.prefilled_at for a in answers]


def test_a_request_whose_kv_does_not_fit_beside_the_others_waits(tokenizer):
    model = Watched(build("llama"))
    cache = PrefixCache(2**30)
    with engine(model, tokenizer, cache) as e:
        jobs = [Job(prompt=p, max_tokens=ANSWER, sampling=GREEDY) for p in prompts(tokenizer)[:3]]
        alone = [run(e, [job])[0].tokens for job in jobs]
        # Room for two of them live at once, not three.
        need = max(cache.size.bytes(len(j.prompt) + j.max_tokens) for j in jobs)
        cache.configure(2 * need + need // 2, None)
        cache.peak_bytes = 0
        live = live_requests(cache)
        together = run(e, jobs)
    assert [a.tokens for a in together] == alone
    assert max(live) == 2
    assert cache.peak_bytes <= cache.max_bytes


def test_a_processor_that_fails_ends_its_own_request_only(tokenizer):
    model = Watched(build("llama"))

    def failing(_tokenizer):
        calls = []

        def processor(seen, logits):
            calls.append(1)
            if len(calls) == 5:
                raise RuntimeError("the grammar has no way on")
            return logits

        return [processor]

    with engine(model, tokenizer) as e:
        ps = prompts(tokenizer)
        jobs = [Job(prompt=ps[0], max_tokens=ANSWER, sampling=GREEDY), Job(prompt=ps[1], max_tokens=ANSWER, sampling=GREEDY, processors=failing)]
        alone = run(e, [jobs[0]])[0].tokens
        model.batches.clear()
        together = run(e, jobs)
    assert together[0].tokens == alone and together[0].end.reason == "length"
    assert isinstance(together[1].end, Failed) and "no way on" in together[1].end.message
    assert len(together[1].tokens) == 4
    assert max(model.batches) == 2


def test_a_join_is_made_only_when_the_copy_it_makes_fits_in_the_budget(tokenizer):
    model = Watched(build("llama"))
    cache = PrefixCache(2**30)
    with engine(model, tokenizer, cache) as e:
        jobs = [Job(prompt=p, max_tokens=ANSWER, sampling=GREEDY) for p in prompts(tokenizer)[:2]]
        alone = [run(e, [job])[0].tokens for job in jobs]
        # Room for both requests' KV, not for the merged cache built beside theirs.
        need = sum(cache.size.bytes(len(j.prompt) + j.max_tokens) for j in jobs)
        cache.configure(need + need // 4, None)
        cache.peak_bytes = 0
        live = live_requests(cache)
        model.batches.clear()
        apart = run(e, jobs)
        apart_batches, peak = list(model.batches), cache.peak_bytes
        cache.configure(2**30, None)  # room for the copy: the same two are merged
        model.batches.clear()
        merged = run(e, jobs)
    assert [a.tokens for a in apart] == alone and [a.tokens for a in merged] == alone
    assert max(live) == 2 and max(apart_batches) == 1  # decoded at once, in two batches
    assert max(model.batches) == 2
    assert peak <= need + need // 4


def test_the_copies_a_batch_makes_stay_within_what_it_says_they_cost():
    # mlx-lm's extend, filter and extract copy the batched cache; MLX counts what it allocates.
    import gc

    model = build("llama")

    def member(length: int, seed: int):
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        m = type("Member", (), {})()
        m.decoder = Decoder(model, make_prompt_cache(model), sampler=make_sampler(temp=0.0))
        *_, m.last = m.decoder.prefill([(seed * 31 + i) % 1000 + 1 for i in range(length)], 256)
        return m

    def held() -> int:
        gc.collect()
        mx.synchronize()
        mx.clear_cache()
        mx.reset_peak_memory()
        return mx.get_active_memory()

    batch, members = Batch(model), []
    for i, length in enumerate([700, 40, 300, 1200, 40]):
        members.append(member(length, i))
        cost = batch.join_cost(members[-1])
        before = held()
        batch.join(members[-1])
        assert mx.get_peak_memory() - before <= cost + 4096, (length, cost)  # (offsets, paddings)
    for m in members[:-1]:
        cost = batch.leave_cost()
        before = held()
        batch.leave(m)
        assert mx.get_peak_memory() - before <= cost + 4096, (m.decoder.position, cost)


def test_sequences_far_apart_in_length_decode_in_separate_batches(tokenizer):
    # Merged, a short one is left-padded to the long one's length (memory and attention).
    model = Watched(build("llama"))
    with engine(model, tokenizer, PrefixCache(2**30)) as e:
        ps = prompts(tokenizer)
        jobs = [Job(prompt=ps[3] * 8, max_tokens=ANSWER, sampling=GREEDY), Job(prompt=ps[0], max_tokens=ANSWER, sampling=GREEDY), Job(prompt=ps[1], max_tokens=ANSWER, sampling=GREEDY)]
        alone = [run(e, [job])[0].tokens for job in jobs]
        model.batches.clear()
        together = run(e, jobs)
    assert [a.tokens for a in together] == alone
    assert max(model.batches) == 2  # the short two together, the long one apart


def test_requests_queued_while_the_model_loads_are_batched_once_it_is_up(tokenizer):
    model = Watched(build("llama"))
    loading = threading.Event()
    loaded = Loaded(model=model, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset())
    e = Engine(lambda: loading.wait() and loaded, prefill_step=32, cache=PrefixCache(2**30))
    e.start()
    try:
        jobs = [Job(prompt=p, max_tokens=ANSWER, sampling=GREEDY) for p in prompts(tokenizer)[:3]]
        answers, _ = scheduled(lambda: Scheduler(e, queue_size=8), jobs, before=loading.set)
    finally:
        e.stop()
        e.wait_stopped()
    assert all(a.end.reason == "length" for a in answers)
    assert max(model.batches) == 3  # not one at a time: max_batch is known once loaded


def test_a_larger_max_batch_lets_the_waiting_requests_in(tokenizer):
    model = Watched(build("llama"))
    with engine(model, tokenizer, PrefixCache(2**30)) as e:
        e.set_max_batch(1)
        jobs = [Job(prompt=p, max_tokens=ANSWER, sampling=GREEDY) for p in prompts(tokenizer)[:3]]
        queue = []

        def factory():
            queue.append(Scheduler(e, queue_size=8))
            return queue[0]

        def wider():  # while the first is held in its first forward pass
            e.set_max_batch(3)
            queue[0].admit()
            model.gate.set()

        model.gate.clear()
        answers, _ = scheduled(factory, jobs, before=wider)
    assert all(a.end.reason == "length" for a in answers)
    assert max(model.batches) == 3


def test_the_first_token_timer_starts_with_the_prefill_not_while_the_kv_waits_for_room(tokenizer):
    model = Watched(build("llama"))
    cache = PrefixCache(2**30)
    with engine(model, tokenizer, cache) as e:
        jobs = [Job(prompt=p, max_tokens=ANSWER, sampling=GREEDY) for p in prompts(tokenizer)[:2]]
        cache.configure(max(cache.size.bytes(len(j.prompt) + j.max_tokens) for j in jobs) * 3 // 2, None)  # one at a time
        model.times.clear()
        answers, generations = scheduled(lambda: Scheduler(e, queue_size=8), jobs)
    assert all(a.end.reason == "length" for a in answers)
    first, second = generations
    assert first.submitted_at <= first.started_at <= model.times[0]
    # The second was handed to the engine at once, and taken up once the first had its
    # whole answer: its timer ran from there.
    assert sum(t < second.started_at for t in model.times) >= ANSWER
