"""What the engine does on Metal (issue 12): the wired limit, a stream per engine thread,
the prefill step by device. This machine has no GPU: the real engine runs on the CPU,
and where Metal itself would answer (`mx.metal.is_available`, the device's working set,
`mx.set_wired_limit`) a fake answers behind the same small interface. The model: a tiny
random-weight Llama (tests/families.py), quick to prefill a long prompt with."""

from __future__ import annotations

import asyncio

import mlx.core as mx
import pytest

from anyclaude import profiles
from anyclaude.engine import metal
from anyclaude.engine.engine import Engine, Loaded
from anyclaude.engine.events import Done, Generation, Job, Sampling
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


def test_the_prefill_step_is_mlx_lms_on_metal_and_512_on_the_cpu_unless_the_profile_sets_one(net, tokenizer, monkeypatch):
    assert profiles.Engine().prefill_step is None  # unset: the device decides
    prompt = PROMPT
    cpu, cpu_model = engine_on(net, tokenizer)
    set_, set_model = engine_on(net, tokenizer, prefill_step=100)
    try:
        assert cpu.prefill_step == 512 and set_.prefill_step == 100
        generate(cpu, prompt)
        generate(set_, prompt)
    finally:
        stop(cpu, set_)
    # Chunks of the step, then the rest with the first token (one pass, as it is short).
    assert cpu_model.passes[:3] == [512, 700 - 512, 1]
    assert set_model.passes[:8] == [100] * 7 + [1]
    monkeypatch.setattr(mx.metal, "is_available", lambda: True)
    assert metal.default_prefill_step() == 2048
    gpu, gpu_model = engine_on(net, tokenizer, wired=metal.WiredLimit(info=lambda: {}))
    try:
        assert gpu.prefill_step == 2048
        generate(gpu, prompt)
        gpu.set_prefill_step(128)  # an edited profile
        assert gpu.prefill_step == 128
        gpu.set_prefill_step(None)  # the key removed again
        assert gpu.prefill_step == 2048
    finally:
        stop(gpu)
    # One chunk: all the prompt but its last token, whose pass gives the first token.
    assert gpu_model.passes[:2] == [699, 1]


class FakeMetal:
    """The device's info and `mx.set_wired_limit`, as Metal would answer them."""

    def __init__(self, working_set: int, limit: int = 0):
        self.working_set, self.limit, self.calls = working_set, limit, []

    def info(self) -> dict:
        return {"max_recommended_working_set_size": self.working_set, "device_name": "Apple M4 Max"}

    def set_wired_limit(self, limit: int) -> int:
        self.calls.append(limit)
        previous, self.limit = self.limit, limit
        return previous


def test_the_wired_limit_is_raised_while_models_are_loaded_and_put_back_after_the_last(net, tokenizer):
    working_set = 48 * 2**30  # a 64 GB Mac's
    device = FakeMetal(working_set, limit=7)
    wired = metal.WiredLimit(info=device.info, set_limit=device.set_wired_limit)
    large, _ = engine_on(net, tokenizer, weight_bytes=46 * 2**30, wired=wired)
    small, _ = engine_on(net, tokenizer, weight_bytes=2**30, wired=wired)
    try:
        assert large.wired_limit == small.wired_limit == working_set == device.limit
        assert device.calls == [working_set]  # raised once for both
        assert "47104 MB, close to or above Metal's recommended working set of 49152 MB" in large.warning
        assert small.warning is None
    finally:
        stop(large)
        assert device.limit == working_set and large.wired_limit is None  # the other model is still loaded
        stop(small)
    assert device.calls == [working_set, 7] and device.limit == 7
    assert small.wired_limit is None


def test_on_the_cpu_the_wired_limit_is_left_alone(net, tokenizer):
    calls = []
    wired = metal.WiredLimit(set_limit=calls.append)  # the real device info: no Metal here
    engine, _ = engine_on(net, tokenizer, weight_bytes=10**12, wired=wired)
    try:
        assert engine.wired_limit is None and engine.warning is None
    finally:
        stop(engine)
    assert calls == []
    assert metal.size_warning(10**12, None) is None


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
