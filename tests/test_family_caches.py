"""The prefix cache works for every mlx-lm cache type, and answers do not depend on it
(issue 12): a Claude-Code-shaped conversation on tiny random-weight models of each
architecture, through the real engine, against the same engine without a cache."""

from __future__ import annotations

import asyncio

import pytest

from anyclaude.engine.cache import PrefixCache
from anyclaude.engine.engine import Engine, KVQuantization, Loaded
from anyclaude.engine.events import Done, Failed, Generation, Job, Prefilled, Sampling, Token
from families import ARCHITECTURES, build

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0)
ANSWER = 6  # tokens per answer


class Cutting:
    """The model, for one request: cancels it after `calls` forward passes (a client that
    hangs up mid-prefill), to inject the fault behind the model's own interface."""

    def __init__(self, model):
        self.model, self.calls, self.generation = model, None, None

    def __call__(self, inputs, cache=None):
        if self.calls is not None:
            self.calls -= 1
            if self.calls == 0:
                self.generation.cancel()
        return self.model(inputs, cache=cache)

    def __getattr__(self, name):  # make_cache, layers: the model's own
        return getattr(self.model, name)


class Conversation:
    def __init__(self, model, tokenizer, cache_dir=None, persist=False, max_bytes=2**30, kv=None):
        self.model = Cutting(model)
        loaded = Loaded(model=self.model, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset(), cache_dir=cache_dir)
        self.cached = Engine(lambda: loaded, prefill_step=32, cache=PrefixCache(max_bytes), persist=persist, kv_quantization=kv)
        plain = Loaded(model=model, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset())
        # The reference: no cache, and another chunking of the same prompts.
        self.plain = Engine(lambda: plain, prefill_step=48, kv_quantization=kv)
        self.cached.start()
        self.plain.start()

    def ask(self, engine: Engine, prompt: list[int], checkpoint: int = 0, cut_after: int | None = None, **job):
        async def run():
            generation = Generation(asyncio.get_running_loop())
            self.model.calls, self.model.generation = cut_after, generation
            engine.submit(Job(prompt=prompt, max_tokens=ANSWER, sampling=GREEDY, checkpoint=checkpoint, **job), generation)
            tokens, cached = [], None
            self.lookup = None
            while True:
                event = await generation.next()
                if isinstance(event, Prefilled):
                    cached, self.lookup = event.cached, event.lookup
                elif isinstance(event, Token):
                    tokens.append(event.id)
                elif isinstance(event, (Done, Failed)):
                    self.model.calls = None
                    assert not isinstance(event, Failed), event
                    self.store = event.store  # what became of the request's cache entry
                    return tokens, cached, event.reason

        return asyncio.run(run())

    def turn(self, prompt: list[int], checkpoint: int = 0, **job) -> tuple[list[int], int]:
        """The answer with the cache (and what it reused), checked against no cache."""
        reference, _, _ = self.ask(self.plain, prompt)
        answer, cached, _ = self.ask(self.cached, prompt, checkpoint, **job)  # last: its lookup and store stay
        assert answer == reference, "the answer depends on the cache"
        return answer, cached

    def stop(self) -> None:
        for engine in (self.cached, self.plain):
            engine.stop()
            engine.wait_stopped()


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


# Keys and values quantized from token 64 on: inside the system prompt.
KV8 = KVQuantization(bits=8, group_size=32, start=64)


@pytest.mark.parametrize("kv", [None, KV8], ids=["", "kv8"])
@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_a_claude_code_conversation_reuses_the_cache_and_answers_as_without_it(architecture, kv, tokenizer, tmp_path):
    model = build(architecture)
    chat = Conversation(model, tokenizer, cache_dir=tmp_path, persist=True, kv=kv)
    chat.cached.wait_ready()
    # gpt-oss's attention sinks cannot run on quantized keys (mlx-lm): it is turned off, and said.
    assert (chat.cached.warning is not None) is (kv is not None and architecture == "gpt_oss"), chat.cached.warning
    try:
        system = ids(tokenizer, "<|im_start|>system\nYou are a coding agent. Tools: Read(path), Bash(command). " * 4 + "<|im_end|>\n")
        end = ids(tokenizer, "<|im_end|>\n")

        def user(text: str) -> list[int]:
            return ids(tokenizer, f"<|im_start|>user\n{text}<|im_end|>\n<|im_start|>assistant\n")

        first = system + user("Read the README and tell me what it says.")
        a1, cached = chat.turn(first, checkpoint=len(system))
        assert cached == 0 and chat.lookup == "no_entries" and chat.store == "stored"
        # The next turn: the answer re-rendered, then the user's reply.
        second = first + a1 + end + user("Now run the tests.")
        a2, cached = chat.turn(second, checkpoint=len(system))
        assert cached >= len(first), (cached, len(first))
        # A side request (a title, a classifier) shares only the system prompt.
        _, cached = chat.turn(system + user("Write a title for this chat."), checkpoint=len(system))
        assert cached >= len(system)
        # The conversations share its "<|im_start|>user\n" too; only plain attention is cut back to it.
        trims = architecture == "llama"
        assert chat.lookup == ("hit" if trims else "not_trimmable") and (cached > len(system)) is trims
        # A branch: the same history as the second turn, another reply.
        _, cached = chat.turn(first + a1 + end + user("No, show me the diff."), checkpoint=len(system))
        assert cached >= len(first)
        # A prefill cut short (a hang-up), then the retry: it resumes where the cut was.
        long = second + a2 + end + user("Summarise every file in the repository, one line each. " * 12)
        _, _, reason = chat.ask(chat.cached, long, len(system), cut_after=4)
        assert reason == "cancelled" and chat.store == "stored"
        _, cached = chat.turn(long, checkpoint=len(system))
        assert cached >= len(second) + 3 * 32, (cached, len(second))
        assert chat.cached.cache.peak_bytes <= chat.cached.cache.max_bytes
        held = {type(c).__name__ for e in chat.cached.cache._entries for c in e.cache}
        assert ("QuantizedKVCache" in held) is (kv is not None and chat.cached.warning is None)
    finally:
        chat.stop()
    # Persisted: after a restart, the system prompt's checkpoint is there.
    again = Conversation(model, tokenizer, cache_dir=tmp_path, persist=True, kv=kv)
    try:
        _, cached = again.turn(system + user("What can you do?"), checkpoint=len(system))
        assert cached >= len(system)
    finally:
        again.stop()


def test_a_model_whose_cache_cannot_be_trimmed_resumes_the_user_s_next_message_after_their_last(tiny_model):
    """Qwen3.5's real template leaves out the reasoning of the turns before the user's
    last message: the next message parts from what was generated at the first of them.
    On a hybrid model (linear attention: reused by exact prefix only) the turn resumes
    at the end of the user's previous message, kept apart from the tool loop's entries."""
    from anyclaude import prompt
    from anyclaude.api import wire
    from anyclaude.engine.cache import REPLY, TURN
    from test_templates import QWEN_THINK, family_tokenizer

    tok = family_tokenizer(tiny_model, "Qwen3.5-4B.jinja", QWEN_THINK)
    chat = Conversation(build("qwen3_next", vocab_size=len(tok.vocab)), tok)
    tool = {"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {"path": {"type": "string"}}}}

    def render(messages: list[dict]) -> prompt.Rendered:
        body = {"model": "m", "max_tokens": 64, "system": "You are a coding agent. " * 20, "tools": [tool], "messages": messages}
        return prompt.render(wire.decode_request(wire.encoder.encode(body | {"thinking": {"type": "enabled", "budget_tokens": 512}})), tok)

    def ask(messages: list[dict]) -> tuple[prompt.Rendered, list[int], int]:
        rendered = render(messages)
        answer, cached = chat.turn(rendered.ids, rendered.checkpoint, reply_start=rendered.reply_start, user_turn=rendered.user_turn)
        return rendered, answer, cached

    def said(answer: list[int], *extra: dict) -> dict:
        thought = {"type": "thinking", "thinking": "Let me see.", "signature": "x"}
        return {"role": "assistant", "content": [thought, {"type": "text", "text": tok.decode(answer)}, *extra]}

    try:
        chat.cached.wait_ready()
        u1 = {"role": "user", "content": "What does the README say?"}
        first, a1, cached = ask([u1])
        assert 0 < first.checkpoint < first.reply_start < len(first.ids) and first.user_turn
        assert cached == 0
        u2 = {"role": "user", "content": "Now read setup.py."}
        second, a2, cached = ask([u1, said(a1), u2])
        # The first answer comes back without its reasoning: resumed where the user's
        # first message ends, not at the system prompt.
        assert cached == first.reply_start, (cached, first.reply_start, first.checkpoint)
        call = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"path": "setup.py"}}
        result = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "from setuptools import setup"}]}
        loop = [u1, said(a1), u2, said(a2, call), result]
        third, a3, cached = ask(loop)
        assert not third.user_turn and cached >= second.reply_start
        # The user speaks again: the tool loop's reasoning goes, and the turn resumes at
        # the end of their last message, kept while the loop's own entries came and went.
        u3 = {"role": "user", "content": "Thanks. Summarise both."}
        fourth, _, cached = ask([*loop, said(a3), u3])
        assert cached == second.reply_start, (cached, second.reply_start)
        points = [e.point for e in chat.cached.cache._entries]
        assert points.count(REPLY) <= 1 and points.count(TURN) >= 2, points
    finally:
        chat.stop()
