"""Images reach a model that sees (issue 13): a tiny random-weight Gemma 3 from mlx-vlm's
classes, with a real processor and Gemma 3's real template (tests/vision_model.py), through
the engine and through the real daemon with the official SDK."""

from __future__ import annotations

import asyncio
import base64
import io
import json

import anthropic
import numpy as np
import pytest

from anyclaude import profiles, prompt, vision
from anyclaude.api import wire
from anyclaude.engine.cache import PrefixCache
from anyclaude.engine.engine import Engine, KVQuantization, Loaded
from anyclaude.engine.events import Done, Failed, Generation, Job, Prefilled, Sampling, Token
from bench.harness import request
from vision_model import IMAGE_TOKENS, build, logged, processed_once, serving

GREEDY = Sampling(temperature=0.0, top_p=1.0, top_k=0)
SEEING, BLIND = "claude-opus-4-8", "anyclaude-blind"
READ = {"name": "Read", "description": "Read a file.", "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}}


def png(seed: int) -> str:
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (40, 30, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return base64.b64encode(out.getvalue()).decode()


def image(seed: int) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": png(seed)}}


def looking(seed: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look at this:"}, image(seed), {"type": "text", "text": "What is it?"}]}]


def read_back(seed: int) -> list[dict]:
    """Claude Code's Read of a PNG: the image comes back inside the tool result."""
    call = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/tmp/a.png"}}
    result = {"type": "tool_result", "tool_use_id": "toolu_1", "content": [image(seed)]}
    return [{"role": "user", "content": "Read /tmp/a.png and say what it shows."}, {"role": "assistant", "content": [call]}, {"role": "user", "content": [result]}]


@pytest.fixture(scope="session")
def gemma_dir(tmp_path_factory, tiny_model):
    return build(tmp_path_factory.mktemp("vision") / "gemma3", tiny_model)


@pytest.fixture(scope="session")
def gemma(gemma_dir):
    """The model, its mlx-lm tokenizer and its Vision, loaded as the daemon loads them."""
    return vision.load(str(gemma_dir), "gemma3")


def rendered(gemma, messages: list[dict], tools: list[dict] | None = None, system: str | None = None) -> prompt.Rendered:
    _, tokenizer, seeing = gemma
    body = {"model": "m", "max_tokens": 8, "messages": messages} | ({"tools": tools} if tools else {}) | ({"system": system} if system else {})
    return prompt.render(wire.decode_request(json.dumps(body).encode()), tokenizer, vision=seeing)


def test_images_become_the_template_s_image_parts_and_the_processor_s_tokens(gemma):
    one = rendered(gemma, looking(1))
    assert one.text.count("<start_of_image>") == 1 and one.images == 0  # none unseen
    (span,) = one.seen_images.spans
    assert span[1] - span[0] == IMAGE_TOKENS and set(one.ids[span[0] : span[1]]) == {gemma[2].image_token}
    # Keyed by the image: the same image the same keys, another image others; the text the same.
    again, other = rendered(gemma, looking(1)), rendered(gemma, looking(2))
    assert again.cache_key == one.cache_key and other.ids == one.ids
    assert other.cache_key[: span[0]] == one.cache_key[: span[0]] and other.cache_key[span[0]] != one.cache_key[span[0]]
    assert all(k < 0 for k in one.cache_key[span[0] : span[1]]) and one.cache_key[span[1] :] == one.ids[span[1] :]
    # Inside a tool result, folded into a user turn by the generic family, in order.
    both = rendered(gemma, read_back(1) + [{"role": "user", "content": [image(2), {"type": "text", "text": "And this?"}]}], tools=[READ])
    assert len(both.seen_images.spans) == 2 and "<tool_response>" in both.text


def test_the_images_of_earlier_turns_are_not_processed_again(gemma):
    from test_vision_mrope import image as sized

    processed_once(gemma[2], lambda messages: rendered(gemma, messages), sized)


def test_bad_image_data_is_a_400_naming_it(gemma):
    for data, says in [("not base64 at all!", "not valid base64"), (base64.b64encode(b"\x89PNG but no").decode(), "cannot be read as image/png")]:
        bad = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": data}}]}]
        with pytest.raises(prompt.InvalidRequest, match=says):
            rendered(gemma, bad)


class Cutting:
    """The model, for one request: cancels it after `calls` forward passes (a hang-up
    mid-prefill), whether a pass is over token ids or image embeddings."""

    def __init__(self, model):
        self.model, self.calls, self.generation = model, None, None

    def _count(self) -> None:
        if self.calls is not None:
            self.calls -= 1
            if self.calls == 0:
                self.generation.cancel()

    def __call__(self, inputs, cache=None):
        self._count()
        return self.model(inputs, cache=cache)

    def embedded(self, inputs, embeddings, cache=None, **extra):  # Gemma 4's: per-layer inputs, token types
        self._count()
        return self.model.embedded(inputs, embeddings, cache=cache, **extra)

    def positioned(self, inputs, positions, embeddings=None, cache=None, **extra):  # an mrope model's passes
        self._count()
        return self.model.positioned(inputs, positions, embeddings, cache=cache, **extra)

    def __getattr__(self, name):
        return getattr(self.model, name)


def ask(engine: Engine, cutting: Cutting, r: prompt.Rendered, cut_after: int | None = None):
    async def run():
        generation = Generation(asyncio.get_running_loop())
        cutting.calls, cutting.generation = cut_after, generation
        engine.submit(Job(prompt=r.ids, max_tokens=6, sampling=GREEDY, checkpoint=r.checkpoint, images=r.seen_images), generation)
        tokens, cached = [], None
        while True:
            event = await generation.next()
            if isinstance(event, Prefilled):
                cached = event.cached
            elif isinstance(event, Token):
                tokens.append(event.id)
            elif isinstance(event, (Done, Failed)):
                cutting.calls = None
                assert not isinstance(event, Failed), event
                return tokens, cached, event.reason

    return asyncio.run(run())


# Keys and values quantized from token 28 on: inside the image (tokens 21-36 of the prompts).
KV8 = KVQuantization(bits=8, group_size=32, start=28)


@pytest.mark.parametrize("kv", [None, KV8], ids=["", "kv8-inside-the-image"])
def test_answers_with_images_do_not_depend_on_the_cache(gemma, kv):
    model, tokenizer, seeing = gemma
    cutting = Cutting(model)
    # Prefill chunks of 8 tokens cut the image's 16 tokens; the reference is not cut there.
    cached = Engine(lambda: Loaded(model=cutting, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset(), vision=seeing), prefill_step=8, cache=PrefixCache(2**30), kv_quantization=kv)
    plain = Engine(lambda: Loaded(model=model, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset(), vision=seeing), prefill_step=64, kv_quantization=kv)
    for engine in (cached, plain):
        engine.start()
    try:
        system = "You are a careful assistant who describes pictures."

        def turn(messages, cut_after=None):
            r = rendered(gemma, messages, system=system)
            reference, _, _ = ask(plain, Cutting(model), r)
            answer, reused, reason = ask(cached, cutting, r, cut_after)
            if cut_after is None:
                assert answer == reference, "the answer depends on the cache"
            return r, answer, reused, reason

        first, a1, reused, _ = turn(looking(1))
        assert reused == 0
        (start, end), = first.seen_images.spans
        assert start < KV8.start < end
        # The next turn reuses all of the first, image and all.
        history = looking(1) + [{"role": "assistant", "content": tokenizer.decode(a1)}, {"role": "user", "content": "Say more."}]
        _, _, reused, _ = turn(history)
        assert reused >= end
        # Another image: only the text before it.
        _, a3, reused, _ = turn(looking(2))
        assert reused == start and a3 != a1
        # A hang-up inside the image's prefill (its first 8 tokens; the text before it is
        # reused), then the retry: it resumes there, mid-image.
        cut = looking(3)
        _, _, _, reason = turn(cut, cut_after=1)
        assert reason == "cancelled"
        _, _, reused, _ = turn(cut)
        assert start < reused < end
    finally:
        for engine in (cached, plain):
            engine.stop()
            engine.wait_stopped()


# --- through the daemon ----------------------------------------------------------


@pytest.fixture(scope="module")
def seeing_daemon(tmp_path_factory, model_cache, gemma_dir):
    table = {"path": str(gemma_dir), "max_tokens": 8}
    with serving(tmp_path_factory.mktemp("vision-daemon"), model_cache, {"gemma": table, "blind": table | {"vision": False}}) as daemon:
        yield daemon


@pytest.fixture(scope="module")
def sdk(seeing_daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=seeing_daemon.url, api_key="sk-local-test", max_retries=0, timeout=120)


def test_an_image_reaches_the_model_and_the_next_turn_reuses_it(sdk, seeing_daemon, gemma):
    expected = rendered(gemma, looking(1))
    (start, end), = expected.seen_images.spans
    assert sdk.messages.count_tokens(model=SEEING, messages=looking(1)).input_tokens == len(expected.ids)
    first = sdk.messages.create(model=SEEING, max_tokens=8, messages=looking(1))
    one = logged(seeing_daemon, first)
    assert one["prompt_tokens"] == len(expected.ids) and "images_unseen" not in one
    # Another image, the same words: the model sees the difference; the text before it is reused.
    other = sdk.messages.create(model=SEEING, max_tokens=8, messages=looking(2))
    assert other.content[0].text != first.content[0].text
    assert logged(seeing_daemon, other)["cached_tokens"] == start
    # The next turn of the first: everything up to its answer, the image included.
    turn = looking(1) + [{"role": "assistant", "content": first.content[0].text}, {"role": "user", "content": "Say more."}]
    second = sdk.messages.create(model=SEEING, max_tokens=8, messages=turn)
    assert logged(seeing_daemon, second)["cached_tokens"] >= one["prompt_tokens"]
    assert second.usage.cache_read_input_tokens == logged(seeing_daemon, second)["cached_tokens"]


def test_a_turn_whose_earlier_image_changed_is_logged_as_a_miss_there(sdk, seeing_daemon, gemma):
    session = {"x-claude-code-session-id": "vision-session"}
    question = [{"role": "user", "content": [{"type": "text", "text": "Which of these two?"}, image(6), image(7)]}]
    first = sdk.messages.create(model=SEEING, max_tokens=8, messages=question, extra_headers=session)
    (_, _), (start, _) = rendered(gemma, question).seen_images.spans
    again = [{"role": "user", "content": [{"type": "text", "text": "Which of these two?"}, image(6), image(8)]}]
    turn = again + [{"role": "assistant", "content": first.content[0].text}, {"role": "user", "content": "Why?"}]
    second = sdk.messages.create(model=SEEING, max_tokens=8, messages=turn, extra_headers=session)
    line = logged(seeing_daemon, second)
    assert line["cache_miss"] == {"position": start, "part": "message 0"} and line["cached_tokens"] == start


def test_an_image_read_by_the_read_tool_reaches_the_model(sdk, seeing_daemon, gemma):
    expected = rendered(gemma, read_back(4), tools=[READ])
    one = sdk.messages.create(model=SEEING, max_tokens=8, messages=read_back(4), tools=[READ])
    two = sdk.messages.create(model=SEEING, max_tokens=8, messages=read_back(5), tools=[READ])
    assert logged(seeing_daemon, one)["prompt_tokens"] == len(expected.ids) and len(expected.seen_images.spans) == 1
    assert one.content[0].text != two.content[0].text


def test_a_text_request_to_a_model_that_sees(sdk, seeing_daemon):
    body = dict(model=SEEING, max_tokens=8, system="Be brief.", messages=[{"role": "user", "content": "Name a colour."}])
    first, second = sdk.messages.create(**body), sdk.messages.create(**body)
    assert first.content[0].text == second.content[0].text and first.stop_reason in ("end_turn", "max_tokens")
    assert logged(seeing_daemon, second)["cached_tokens"] == logged(seeing_daemon, second)["prompt_tokens"] - 1


def test_bad_image_data_is_a_400_and_the_daemon_serves_on(sdk, seeing_daemon):
    bad = [{"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "%%%"}}]}]
    with pytest.raises(anthropic.BadRequestError) as info:
        sdk.messages.create(model=SEEING, max_tokens=8, messages=bad)
    assert info.value.body["error"]["type"] == "invalid_request_error" and "base64" in info.value.body["error"]["message"]
    assert sdk.messages.create(model=SEEING, max_tokens=2, messages=looking(1)).content


def test_vision_false_gives_the_note_counted_and_warned_of_once(sdk, seeing_daemon):
    noted = [{"role": "user", "content": [{"type": "text", "text": "Look at this:"}, {"type": "text", "text": prompt.IMAGE_NOTE}, {"type": "text", "text": "What is it?"}]}]
    assert sdk.messages.count_tokens(model=BLIND, messages=looking(1)).input_tokens == sdk.messages.count_tokens(model=BLIND, messages=noted).input_tokens
    for _ in range(2):
        reply = sdk.messages.create(model=BLIND, max_tokens=2, messages=looking(1))
        assert logged(seeing_daemon, reply)["images_unseen"] == 1
    assert seeing_daemon.output().count("'blind' cannot see images") == 1
    models = request(seeing_daemon.port, "GET", "/health").json()["models"]
    assert (models["gemma"]["vision"], models["blind"]["vision"]) == ("gemma3", None)
    assert "'gemma' cannot see images" not in seeing_daemon.output()


def test_the_vision_setting_is_validated(tmp_path, gemma_dir, tiny_model):
    path = tmp_path / "v.toml"
    path.write_text('[models.a]\npath = "x"\nvision = "yes"\n')
    with pytest.raises(profiles.ProfileError, match=r"line 3: models\.a\.vision: Invalid enum value 'yes'"):
        profiles.load(str(path))
    assert vision.wanted("auto", str(gemma_dir)) == vision.wanted(True, str(gemma_dir)) == "gemma3"
    assert vision.wanted(False, str(gemma_dir)) is None and vision.wanted("auto", str(tiny_model)) is None
    with pytest.raises(ValueError, match="vision = true, but"):
        vision.wanted(True, str(tiny_model))
