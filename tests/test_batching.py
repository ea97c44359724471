"""Continuous batching (issue 14): requests decoded together answer as they do alone, on
random-weight models of every architecture and on the tiny model; an ending or a cancel
leaves the others going; prefill goes by rank; a request whose KV does not fit waits."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from anyclaude.engine.cache import PrefixCache
from anyclaude.engine.engine import Engine, Loaded
from anyclaude.engine.events import Done, Failed, Generation, Job, Prefilled, Sampling, Token
from families import ARCHITECTURES, build

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0)
ANSWER = 24


class Watched:
    """The model, recording the batch size of each forward pass; a pass can be held until
    the test lets it go (so that jobs submitted one after another are all waiting)."""

    def __init__(self, model):
        self.model, self.batches = model, []
        self.gate = threading.Event()
        self.gate.set()

    def __call__(self, inputs, cache=None):
        self.gate.wait()
        self.batches.append(inputs.shape[0])
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

        async def collect(i: int) -> None:
            answer, generation = answers[i], generations[i]
            while True:
                event = await generation.next(120)
                if event is None and generation.cancelled:
                    continue  # the wake-up of a cancel; its end follows
                assert event is not None, "no event for 120 s"
                if isinstance(event, Prefilled):
                    answer.prefilled_at = next(order)
                elif isinstance(event, Token):
                    answer.tokens.append(event.id)
                    if cancel_after and len(answer.tokens) == cancel_after.get(i):
                        generation.cancel()
                else:
                    answer.end = event
                    return

        await asyncio.gather(*(collect(i) for i in range(len(jobs))))
        return answers

    return asyncio.run(main())


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
        model.batches.clear()
        together = run(e, jobs)
    assert [a.tokens for a in together] == alone
    assert max(model.batches) == 2
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
