"""What the engine does on Metal (issue 12): a stream per engine thread. This machine has
no GPU: the real engine runs on the CPU. The model: a tiny random-weight Llama
(tests/families.py), quick to prefill a long prompt with."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest

from anyclaude.engine import Done, Engine, Generation, Job, Loaded, Sampling
from families import build

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0)
PROMPT = list(range(1000, 1700))  # 700 tokens


@pytest.fixture(scope="module")
def net():
    return build("llama")


class Watched:
    """A model, noting for each forward pass its tokens and the stream it runs on."""

    def __init__(self, model):
        self.model, self.passes, self.streams = model, [], set()

    def __call__(self, inputs, cache=None):
        self.passes.append(inputs.shape[-1])
        self.streams.add(str(mx.default_stream(mx.default_device())))
        return self.model(inputs, cache=cache)

    def __getattr__(self, name):
        return getattr(self.model, name)


def engine_on(net, tokenizer, weight_bytes: int = 0, **options) -> tuple[Engine, Watched]:
    model = Watched(net)
    loaded = Loaded(model=model, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset(), weight_bytes=weight_bytes)
    engine = Engine(lambda: loaded, **options)
    engine.start()
    assert engine.wait_ready(60) and engine.load_error is None
    return engine, model


def generate(engine: Engine, prompt: list[int], max_tokens: int = 2) -> None:
    async def run():
        generation = Generation(asyncio.get_running_loop())
        engine.submit(Job(prompt=prompt, max_tokens=max_tokens, sampling=GREEDY), generation)
        while not isinstance(event := await generation.next(), Done):
            assert event is not None

    asyncio.run(run())


def stop(*engines: Engine) -> None:
    for engine in engines:
        engine.stop()
        engine.wait_stopped()


def test_each_engine_thread_computes_on_a_stream_of_its_own(net, tokenizer):
    here = str(mx.default_stream(mx.default_device()))
    prompt = PROMPT[:20]
    one, one_model = engine_on(net, tokenizer)
    two, two_model = engine_on(net, tokenizer)
    try:
        generate(one, prompt, max_tokens=3)
        generate(two, prompt, max_tokens=3)
    finally:
        stop(one, two)
    assert len(one_model.streams) == len(two_model.streams) == 1  # every pass on its engine's stream
    assert one_model.streams != two_model.streams and here not in one_model.streams | two_model.streams
    assert one_model.streams == {str(one.stream)} and two_model.streams == {str(two.stream)}
