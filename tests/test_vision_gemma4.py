"""Images reach Gemma 4, whose image tokens attend to each other both ways: a tiny
random-weight Gemma 4 from mlx-vlm's own classes (sliding and full attention, a layer
sharing another's keys and values, per-layer inputs), with mlx-vlm's Gemma 4 processor
and Gemma 4's real chat template (tests/vision_model.py, `build_gemma4`).

The check: an answer is the one mlx-vlm's own generate gives for the same model, prompt
and image (which computes a prompt with images in one pass), cold, resumed from a cached
text prefix, in the next turn that reuses the whole image prompt, with prefill chunks so
small they would cut the image, and after a cached prefix that ends inside the image.
And no forward pass of the engine begins or ends inside an image."""

from __future__ import annotations

import base64
import json

import anthropic
import mlx.core as mx
import pytest

from anyclaude import prompt, vision
from anyclaude.api import wire
from anyclaude.engine.cache import PrefixCache
from anyclaude.engine.engine import Engine, Loaded
from test_vision import READ, Cutting, ask, image, looking, png, read_back
from vision_model import build_gemma4, logged, processed_once, said, serving

SYSTEM = "You are a careful assistant who describes pictures, in a few words and plainly."
N = 6  # tokens of each answer (test_vision's `ask` asks for 6)


@pytest.fixture(scope="module")
def folder(tmp_path_factory, tiny_model):
    return build_gemma4(tmp_path_factory.mktemp("gemma4") / "gemma4", tiny_model)


@pytest.fixture(scope="module")
def seeing(folder):
    """The model, its mlx-lm tokenizer and its Vision, loaded as the daemon loads them."""
    return vision.load(str(folder), "gemma4")


def rendered(seeing, messages: list[dict], tools: list[dict] | None = None) -> prompt.Rendered:
    _, tokenizer, v = seeing
    body = {"model": "m", "max_tokens": N, "system": SYSTEM, "messages": messages} | ({"tools": tools} if tools else {})
    return prompt.render(wire.decode_request(json.dumps(body).encode()), tokenizer, vision=v)


def reference(seeing, messages: list[dict], seeds: list[int], tmp_path, tools: list[dict] | None = None) -> list[int]:
    """mlx-vlm's own greedy tokens for the prompt anyclaude renders, cold."""
    paths = []
    for seed in seeds:
        paths.append(tmp_path / f"{seed}.png")
        paths[-1].write_bytes(base64.b64decode(png(seed)))
    return generated(seeing, rendered(seeing, messages, tools).text, paths)


def generated(seeing, text: str, paths) -> list[int]:
    """mlx-vlm's generate, greedy, on a rendered prompt and its images' files."""
    from mlx_vlm import stream_generate

    model, tokenizer, v = seeing
    tokens = [g.token for g in stream_generate(model.vlm, v.processor, text, image=[str(p) for p in paths] or None, max_tokens=N, temperature=0.0)][:N]
    eos = set(tokenizer.eos_token_ids)
    if stop := [i for i, t in enumerate(tokens) if t in eos]:
        tokens = tokens[: stop[0]]
    return tokens


class Passes(Cutting):
    """The model, recording where each forward pass begins and ends (the cache's offset
    before it, plus its tokens)."""

    def __init__(self, model):
        super().__init__(model)
        self.passes: list[tuple[int, int]] = []

    def _record(self, inputs, cache) -> None:
        start = next(layer.offset for layer in cache if hasattr(layer, "offset"))
        self.passes.append((start, start + inputs.shape[-1]))

    def __call__(self, inputs, cache=None):
        self._record(inputs, cache)
        return super().__call__(inputs, cache)

    def embedded(self, inputs, embeddings, cache=None, **extra):
        self._record(inputs, cache)
        return super().embedded(inputs, embeddings, cache, **extra)


def inside(passes: list[tuple[int, int]], span: tuple[int, int]) -> list[int]:
    """The pass boundaries strictly inside an image's span."""
    start, end = span
    return sorted({edge for a, b in passes for edge in (a, b) if start < edge < end})


def asked(running: Engine, passes: Passes, r: prompt.Rendered) -> tuple[list[int], int]:
    """A request's greedy tokens and cached tokens; none of its passes begins or ends inside an image."""
    passes.passes = []
    answer, cached, _ = ask(running, passes, r)
    for span in r.seen_images.spans if r.seen_images else ():
        assert inside(passes.passes, span) == [], (span, passes.passes)
    return answer, cached


def engine(seeing, model, prefill_step: int, cache: PrefixCache | None) -> Engine:
    _, tokenizer, v = seeing
    made = Engine(lambda: Loaded(model=model, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset(tokenizer.eos_token_ids), vision=v), prefill_step=prefill_step, cache=cache)
    made.start()
    return made


def stop(running: Engine) -> None:
    running.stop()
    running.wait_stopped()


def test_the_prompt_has_gemma_4_s_image_tokens(seeing):
    model, _, v = seeing
    r = rendered(seeing, looking(1))
    (start, end), = r.seen_images.spans
    assert "\n\n<|image|>\n\n" in r.text and r.checkpoint < start and end - start > 8
    assert model.whole_images and vision.whole_spans(model, r.seen_images) == [(start, end)]
    assert r.ids[start - 1] == model.vlm.config.boi_token_id and r.ids[end] == model.vlm.config.eoi_token_id


@pytest.mark.parametrize("step", [512, 8, 5], ids=["whole", "chunks-of-8", "chunks-of-5"])
def test_an_image_answers_as_mlx_vlm_does_cold_resumed_and_in_the_next_turn(seeing, tmp_path, step):
    """Chunks of 8 and of 5 tokens would end inside the image (its 12 tokens are 31 to
    43): the chunk there stops before the image or runs to its end."""
    model, tokenizer, _ = seeing
    first = looking(1)
    r = rendered(seeing, first)
    span = r.seen_images.spans[0]
    expected = reference(seeing, first, [1], tmp_path)
    assert len(expected) == N

    # Cold, with no prefix cache: the prompt from token 0.
    passes = Passes(model)
    running = engine(seeing, passes, step, None)
    try:
        assert asked(running, passes, r) == (expected, 0)
    finally:
        stop(running)

    passes = Passes(model)
    running = engine(seeing, passes, step, PrefixCache(2**30))
    try:
        # A text-only request caches the system prompt; the image request resumes from
        # it, its image computed after a cached prefix.
        text = rendered(seeing, [{"role": "user", "content": "Name a colour."}])
        assert asked(running, passes, text)[0] == reference(seeing, [{"role": "user", "content": "Name a colour."}], [], tmp_path)
        answer, cached = asked(running, passes, r)
        assert answer == expected and 0 < r.checkpoint <= cached < span[0]
        # The same request again: resumed past the image, one token short of the prompt.
        assert asked(running, passes, r) == (expected, len(r.ids) - 1)
        # The next turn reuses the whole image prompt.
        turn = first + [{"role": "assistant", "content": tokenizer.decode(expected)}, {"role": "user", "content": "Say more."}]
        answer, cached = asked(running, passes, rendered(seeing, turn))
        assert answer == reference(seeing, turn, [1], tmp_path) and cached > span[1]
        # Another image, the same words: another answer (the model sees it).
        assert asked(running, passes, rendered(seeing, looking(2)))[0] != expected
    finally:
        stop(running)
    if step < 512:  # the chunk size alone would have cut the image
        assert any(span[0] < edge < span[1] for edge in range(r.checkpoint, len(r.ids), step))


def test_a_cached_prefix_that_ends_inside_the_image_is_resumed_at_its_start(seeing, tmp_path):
    """A prefix computed up to the middle of the image (its first tokens saw only the
    ones before them) is reused up to the image's start only."""
    model, _, _ = seeing
    r = rendered(seeing, looking(1))
    (start, end), = r.seen_images.spans
    middle = (start + end) // 2
    cache = PrefixCache(2**30)
    kv = model.make_cache()
    vision.Prompted(model, r.ids, r.seen_images, 0)(mx.array(r.ids[:middle])[None], cache=kv)
    mx.eval([layer.state for layer in kv])
    assert cache.store(r.cache_key[:middle], kv) == "stored" and cache.peek(r.cache_key) == middle
    passes = Passes(model)
    running = engine(seeing, passes, 512, cache)
    try:
        answer, cached = asked(running, passes, r)
    finally:
        stop(running)
    assert answer == reference(seeing, looking(1), [1], tmp_path)
    assert cached == start and passes.passes[0][0] == start


def test_a_sliding_window_shorter_than_the_prompt(tmp_path_factory, tiny_model, tmp_path):
    """Sliding-window layers of 16 tokens (a RotatingKVCache past its window cannot be
    trimmed: its entries are reused by exact prefix only): the image computed in one
    pass after the window has rotated, cold, resumed from the system prompt, and in the
    next turn, as mlx-vlm's generate computes it."""
    seeing = vision.load(str(build_gemma4(tmp_path_factory.mktemp("gemma4-narrow") / "m", tiny_model, seed=1, sliding_window=16)), "gemma4")
    model, tokenizer, _ = seeing
    first = looking(3)
    r = rendered(seeing, first)
    assert r.checkpoint > 16
    expected = reference(seeing, first, [3], tmp_path)
    passes = Passes(model)
    running = engine(seeing, passes, 8, PrefixCache(2**30))
    try:
        answer, cached = asked(running, passes, r)
        assert (answer, cached) == (expected, 0)
        # A retry shares all but the last token of the stored prompt, which cannot be
        # trimmed to it; the next turn parts from it before its end (Gemma 4's template
        # renders an earlier answer without the empty thought channel its prompt ended
        # with). Both resume from the system prompt's checkpoint, past the window.
        assert asked(running, passes, r) == (expected, r.checkpoint)
        turn = first + [{"role": "assistant", "content": tokenizer.decode(expected)}, {"role": "user", "content": "Say more."}]
        assert asked(running, passes, rendered(seeing, turn)) == (reference(seeing, turn, [3], tmp_path), r.checkpoint)
    finally:
        stop(running)


def test_the_images_of_earlier_turns_are_not_processed_again(seeing):
    from test_vision_mrope import image as sized

    # Of two sizes: the processor gives them as a list, not one array.
    processed_once(seeing[2], lambda messages: rendered(seeing, messages), sized)


def test_two_images_of_different_sizes_answer_as_mlx_vlm_does(seeing, tmp_path):
    """Images whose pixels differ in shape (the processor keeps each one's aspect): they
    reach mlx-vlm's vision tower as a list; chunks of 6 tokens would cut both."""
    from test_vision_mrope import png as sized

    model, _, _ = seeing
    other = sized(7, (64, 30))
    tall = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(other).decode()}}
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which:"}, image(1), {"type": "text", "text": "or"}, tall, {"type": "text", "text": "?"}]}]
    r = rendered(seeing, messages)
    assert len(r.seen_images.spans) == 2 and r.seen_images.pixels[0].shape != r.seen_images.pixels[1].shape
    passes = Passes(model)
    running = engine(seeing, passes, 6, None)
    try:
        answer, _ = asked(running, passes, r)
    finally:
        stop(running)
    paths = [tmp_path / "1.png", tmp_path / "7.png"]
    paths[0].write_bytes(base64.b64decode(png(1)))
    paths[1].write_bytes(other)
    assert answer == generated(seeing, r.text, paths)


# --- through the daemon ----------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache, folder):
    # Prefill chunks of 8 tokens: the image (tokens 31 to 43) would be cut.
    models = {"gemma4": {"path": str(folder), "max_tokens": N}}
    with serving(tmp_path_factory.mktemp("gemma4-daemon"), model_cache, models, engine={"prefill_step": 8}) as running:
        yield running


@pytest.fixture(scope="module")
def sdk(daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="sk-local-test", max_retries=0, timeout=120)


def test_an_image_in_a_message_and_in_a_tool_result_through_the_daemon(sdk, daemon, seeing, tmp_path):
    _, tokenizer, _ = seeing
    reply = sdk.messages.create(model="gemma4", max_tokens=N, system=SYSTEM, messages=looking(1))
    line = logged(daemon, reply)
    assert "images_unseen" not in line and line["prompt_tokens"] == len(rendered(seeing, looking(1)).ids)
    assert said(reply) == tokenizer.decode(reference(seeing, looking(1), [1], tmp_path))
    # Claude Code's Read of a PNG: the image inside a tool result.
    r = rendered(seeing, read_back(2), [READ])
    assert len(r.seen_images.spans) == 1 and "<|turn>tool\n\n\n<|image|>" in r.text
    reply = sdk.messages.create(model="gemma4", max_tokens=N, system=SYSTEM, messages=read_back(2), tools=[READ])
    assert said(reply) == tokenizer.decode(reference(seeing, read_back(2), [2], tmp_path, [READ]))
