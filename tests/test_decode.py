"""The token loop (anyclaude.engine.decode) against mlx-lm's generate_step, on the tiny model."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler

from anyclaude.engine import decode
from anyclaude.engine.cache import length


@pytest.fixture(scope="module")
def tiny(tiny_net):
    return tiny_net


@pytest.fixture(scope="module")
def prompt(tiny):
    _, tokenizer = tiny
    return tokenizer.apply_chat_template([{"role": "user", "content": "Name the planets of the solar system in order."}], add_generation_prompt=True)


class Counted:
    """The model, counting its forward passes."""

    def __init__(self, model):
        self.model, self.sizes = model, []

    @property
    def passes(self) -> int:
        return len(self.sizes)

    def __call__(self, inputs, **kwargs):
        self.sizes.append(inputs.shape[1])
        return self.model(inputs, **kwargs)


def reference(model, prompt, max_tokens, processors=None) -> list[int]:
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=make_sampler(temp=0.0), logits_processors=processors, prompt_cache=make_prompt_cache(model), prefill_step_size=16)
    return [t for t, _ in steps]


def test_same_tokens_as_generate_step_with_one_pass_less(tiny, prompt):
    model, _ = tiny
    counted, cache = Counted(model), make_prompt_cache(model)
    got = list(decode.tokens(counted, prompt, cache, max_tokens=12, sampler=make_sampler(temp=0.0), prefill_step=16))
    assert got == reference(model, prompt, 12)
    chunks = -(-len(prompt) // 16)
    # One pass per prompt chunk, the first token included, then one per further token
    # (the last token is only sampled: its pass would be for the token after it).
    assert counted.passes == chunks + 11
    assert length(cache) == len(prompt) + 11


def test_processors_see_the_prompt_then_each_token(tiny, prompt):
    model, _ = tiny
    seen = []

    def record(tokens, logits):
        seen.append(tokens.tolist())
        return logits

    penalty = make_logits_processors(repetition_penalty=1.3, repetition_context_size=64)
    got = list(decode.tokens(model, prompt, make_prompt_cache(model), max_tokens=8, sampler=make_sampler(temp=0.0), processors=[record, *penalty], prefill_step=16))
    assert got == reference(model, prompt, 8, penalty)
    assert seen == [prompt + got[:i] for i in range(8)]


def test_check_can_stop_between_chunks(tiny, prompt):
    model, _ = tiny
    counted, calls = Counted(model), []

    def check():
        calls.append(counted.passes)
        if len(calls) == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        next(decode.tokens(counted, prompt, make_prompt_cache(model), max_tokens=4, sampler=make_sampler(temp=0.0), prefill_step=16, check=check))
    assert calls == [0, 1] and counted.passes == 1


def test_a_long_last_chunk_leaves_its_last_token_to_a_pass_of_its_own(tiny, prompt, monkeypatch):
    model, _ = tiny
    monkeypatch.setattr(decode, "MERGED", 8)
    counted = Counted(model)
    got = list(decode.tokens(counted, prompt, make_prompt_cache(model), max_tokens=3, sampler=make_sampler(temp=0.0), prefill_step=16))
    assert got == reference(model, prompt, 3)
    # Chunks of at most 16, the pass that gives the first token at most 8 long, then one
    # pass per further token (the last one only sampled).
    *chunks, first, second, third = counted.sizes
    assert max(chunks) <= 16 and first <= 8 and second == third == 1
    assert sum(chunks) + first == len(prompt)


def test_a_prefix_from_the_cache_does_not_change_the_answer(tiny):
    """With a repetition penalty, tokens the cache holds count as they would cold."""
    model, tokenizer = tiny
    text = "Repeat after me, then go on: " + "the cat sat on the mat and the dog sat on the log, " * 17
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True)
    assert 250 < len(prompt) < 400

    def answer(k: int) -> list[int]:
        cache = make_prompt_cache(model)
        if k:  # what the prefix cache would hand over: the first k tokens, prefilled
            model(mx.array(prompt[:k])[None], cache=cache)
            mx.eval([c.state for c in cache])
        penalty = make_logits_processors(repetition_penalty=1.2, repetition_context_size=64)
        steps = decode.tokens(model, prompt[k:], cache, max_tokens=24, sampler=make_sampler(temp=0.0), processors=penalty, history=prompt[:k])
        return list(steps)

    cold = answer(0)
    assert answer(len(prompt) - 5) == cold
    assert answer(len(prompt) // 2) == cold


def test_a_forced_call_continues_a_cached_prefix(tiny):
    """The grammar's first `tokens` is history and prompt together: none of it is output."""
    from claude_code import READ_SCHEMA

    from anyclaude import constrain
    from anyclaude.families import hermes

    model, tokenizer = tiny
    read = {"type": "function", "function": {"name": "Read", "description": "Reads a file.", "parameters": READ_SCHEMA}}
    messages = [{"role": "system", "content": "You are a helpful assistant."}, {"role": "user", "content": "Write a haiku about autumn leaves."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    cache = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])
    processor = constrain.forced_call(tokenizer, [read], "Read")
    out = []
    for token in decode.tokens(model, prompt[-1:], cache, max_tokens=80, sampler=make_sampler(temp=0.0), processors=[processor], history=prompt[:-1]):
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    assert processor.done
    name, arguments = hermes.CALLS.parse(tokenizer.decode(out))
    assert name == "Read" and isinstance(arguments["file_path"], str)
