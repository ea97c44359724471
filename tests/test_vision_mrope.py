"""Images reach models whose positions are mrope's (Qwen3.5, Qwen3.5-MoE, Qwen3-VL,
Qwen2.5-VL, Qwen2-VL): tiny random-weight models from mlx-vlm's own classes, with its Qwen
processor and Qwen3.5's real chat template (tests/vision_model.py, `build_qwen`).

The check that positions are right: through the real daemon, an answer is the one
mlx-vlm's own generate gives for the same model, prompt and image, cold, in a second
turn that reuses the cache past the image, and after a text-only request cached the
prefix the image request resumes from."""

from __future__ import annotations

import base64
import io
import json
import time

import anthropic
import mlx.core as mx
import numpy as np
import pytest

from anyclaude import prompt, vision
from anyclaude.api import wire
from bench.harness import request
from vision_model import build_qwen, logged, processed_once, said, serving

KINDS = ["qwen3_5", "qwen3_5_moe", "qwen3_vl", "qwen2_5_vl", "qwen2_vl"]
HYBRID = {"qwen3_5", "qwen3_5_moe"}  # linear-attention layers: caches reused by exact prefix only
SYSTEM = "You are a careful assistant who describes pictures, in a few words and plainly."
N = 8  # tokens of each answer


def png(seed: int, shape=(64, 30)) -> bytes:
    """An image 64 high and 30 wide: a 4x2 grid of image tokens (height and width differ)."""
    from PIL import Image

    pixels = np.random.default_rng(seed).integers(0, 255, (*shape, 3), dtype=np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, format="PNG")
    return out.getvalue()


def image(seed: int, shape=(64, 30)) -> dict:
    return {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": base64.b64encode(png(seed, shape)).decode()}}


def looking(*seeds: int) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "Look at this:"}, *[image(s) for s in seeds], {"type": "text", "text": "What is it?"}]}]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_model):
    root = tmp_path_factory.mktemp("mrope")
    return {kind: build_qwen(root / kind, tiny_model, kind, seed=i) for i, kind in enumerate(KINDS)}


@pytest.fixture(scope="module")
def loaded(folders):
    """Each model, its mlx-lm tokenizer and its Vision, loaded as the daemon loads them."""
    return {kind: vision.load(str(where), kind) for kind, where in folders.items()}


def rendered(seeing, messages: list[dict], tools: list[dict] | None = None) -> prompt.Rendered:
    _, tokenizer, v = seeing
    body = {"model": "m", "max_tokens": N, "system": SYSTEM, "messages": messages} | ({"tools": tools} if tools else {})
    return prompt.render(wire.decode_request(json.dumps(body).encode()), tokenizer, vision=v)


def reference(seeing, messages: list[dict], seeds: list[int], tmp_path, tools: list[dict] | None = None) -> str:
    """mlx-vlm's own greedy answer for the prompt anyclaude renders, cold."""
    return seeing[1].decode(reference_tokens(seeing, messages, seeds, tmp_path, tools))


def reference_tokens(seeing, messages: list[dict], seeds: list[int], tmp_path, tools: list[dict] | None = None) -> list[int]:
    from mlx_vlm import stream_generate

    model, tokenizer, v = seeing
    paths = []
    for seed in seeds:
        paths.append(tmp_path / f"{seed}.png")
        paths[-1].write_bytes(png(seed))
    text = rendered(seeing, messages, tools).text
    tokens = [g.token for g in stream_generate(model.vlm, v.processor, text, image=[str(p) for p in paths] or None, max_tokens=N, temperature=0.0)][:N]
    eos = set(tokenizer.eos_token_ids)
    if stop := [i for i, t in enumerate(tokens) if t in eos]:
        tokens = tokens[: stop[0]]
    return tokens


@pytest.mark.parametrize("kind", KINDS)
def test_positions_are_the_model_s_own(loaded, kind):
    """mrope_positions gives what mlx-vlm's get_rope_index gives for the whole prompt:
    two images of different grids, text between and after them."""
    seeing = loaded[kind]
    messages = [{"role": "user", "content": [{"type": "text", "text": "Which:"}, image(1), {"type": "text", "text": "or"}, image(2, (32, 96)), {"type": "text", "text": "?"}]}]
    r = rendered(seeing, messages)
    images = r.seen_images
    assert len(images.grids) == 2 and images.grids[0] != images.grids[1]
    ours, delta = vision.mrope_positions(len(r.ids), images.spans, images.grids, seeing[0].merge)
    theirs, deltas = seeing[0].language_model.get_rope_index(mx.array(r.ids)[None], mx.array(images.grids))
    assert np.array_equal(np.asarray(theirs)[:, 0], ours) and delta == int(deltas.item()) != 0
    # The request's positions: the prompt's, then index plus delta, for any pass.
    wrapped = vision.Prompted(seeing[0], r.ids, images, 0)
    n = len(r.ids)
    assert np.array_equal(wrapped.positions(3, n + 2)[:, : n - 3], ours[:, 3:])
    assert (wrapped.positions(n + 5, n + 6) == n + 5 + delta).all()


# --- through the daemon ----------------------------------------------------------


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache, folders):
    models = {kind: {"path": str(where), "max_tokens": N} for kind, where in folders.items()}
    with serving(tmp_path_factory.mktemp("mrope-daemon"), model_cache, models) as running:
        # Every model loaded before the first request: MLX's compile state is the
        # process's, and a model loading on one engine thread (evaluating its weights)
        # while another traces a compiled function fails that one.
        deadline = time.monotonic() + 120
        while any(m["state"] == "loading" for m in request(running.port, "GET", "/health").json()["models"].values()):
            assert time.monotonic() < deadline, running.output()
            time.sleep(0.2)
        yield running


@pytest.fixture(scope="module")
def sdk(daemon) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=daemon.url, api_key="sk-local-test", max_retries=0, timeout=120)


@pytest.mark.parametrize("kind", KINDS)
def test_an_image_answers_as_mlx_vlm_does_cold_resumed_and_in_the_next_turn(sdk, daemon, loaded, kind, tmp_path):
    seeing = loaded[kind]

    def ask(messages):
        reply = sdk.messages.create(model=kind, max_tokens=N, system=SYSTEM, messages=messages)
        return reply, logged(daemon, reply)

    # A text-only request: its positions are its indexes (given explicitly, not read
    # from the model). Its system prompt is cached, as its own entry.
    text = [{"role": "user", "content": "Name a colour."}]
    reply, _ = ask(text)
    assert said(reply) == reference(seeing, text, [], tmp_path)
    # An image request resumes from that text-only prefix, and answers as mlx-vlm cold.
    first = looking(1)
    r = rendered(seeing, first)
    (start, end), = r.seen_images.spans
    reply, line = ask(first)
    assert r.checkpoint <= line["cached_tokens"] <= start and r.checkpoint > 0 and "images_unseen" not in line
    assert said(reply) == reference(seeing, first, [1], tmp_path)
    # The same request again (a retry): resumed past the image, where the cache can be
    # trimmed to one token short of the prompt, or (linear attention: not trimmable,
    # reused at exact snapshots only) where its generation prompt begins; the answer at
    # index + delta.
    retry, line = ask(first)
    assert said(retry) == said(reply) and line["cached_tokens"] == (r.reply_start if kind in HYBRID else len(r.ids) - 1) > end
    # The next turn. Qwen3.5's template renders an earlier answer without the empty
    # thinking block its prompt ended with, so the next prompt parts from the last one
    # before its end: a linear-attention cache resumes from its snapshot there; plain
    # attention's is cut back to where they part. Both past the image.
    turn = first + [{"role": "assistant", "content": said(reply)}, {"role": "user", "content": "Say more."}]
    again, line = ask(turn)
    assert line["cached_tokens"] >= r.reply_start > end and (kind not in HYBRID or line["cached_tokens"] == r.reply_start)
    assert said(again) == reference(seeing, turn, [1], tmp_path)
    # Another image, the same words: a different answer (the model sees it).
    other, _ = ask(looking(2))
    assert said(other) != said(reply)


def test_an_image_read_by_the_read_tool_answers_as_mlx_vlm_does(sdk, daemon, loaded, tmp_path):
    """Claude Code's Read of a PNG: the image inside a tool result, in Qwen3.5's
    <tool_response>, after a tool call in its XML."""
    from test_vision import READ

    seeing = loaded["qwen3_5"]
    call = {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/tmp/a.png"}}
    messages = [
        {"role": "user", "content": "Read /tmp/a.png and say what it shows."},
        {"role": "assistant", "content": [call]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [image(1)]}]},
    ]
    r = rendered(seeing, messages, [READ])
    assert len(r.seen_images.spans) == 1 and "<tool_response>\n<|vision_start|><|image_pad|>" in r.text
    reply = sdk.messages.create(model="qwen3_5", max_tokens=N, system=SYSTEM, messages=messages, tools=[READ])
    assert logged(daemon, reply)["prompt_tokens"] == len(r.ids)
    assert said(reply) and said(reply) == reference(seeing, messages, [1], tmp_path, [READ])


# --- through the engine: a hang-up inside or past the image, then the retry ----------


def test_a_hybrid_model_resumes_a_prefill_cut_inside_or_past_the_image(loaded, tmp_path):
    """Qwen3.5's linear-attention cache is reused at exact snapshots only: here the one an
    interrupted prefill leaves at its last chunk's end, inside the image or past it."""
    from anyclaude.engine.cache import PrefixCache
    from anyclaude.engine.engine import Engine, Loaded
    from test_vision import Cutting, ask

    seeing = loaded["qwen3_5"]
    model, tokenizer, v = seeing
    cutting = Cutting(model)
    # Prefill chunks of 8 tokens: the image's 8 tokens are cut by a chunk's end.
    engine = Engine(lambda: Loaded(model=cutting, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset(), vision=v), prefill_step=8, cache=PrefixCache(2**30))
    engine.start()
    try:
        where = []
        # The first request prefills the system prompt (3 chunks) then 24-32, inside the
        # image (30-38); the second resumes from the system prompt and is cut at 40.
        for seed, cut in [(3, 4), (4, 2)]:
            r = rendered(seeing, looking(seed))
            (start, end), = r.seen_images.spans
            _, _, reason = ask(engine, cutting, r, cut_after=cut)
            assert reason == "cancelled"
            answer, cached, _ = ask(engine, cutting, r)
            assert answer == reference_tokens(seeing, looking(seed), [seed], tmp_path)[: len(answer)] and len(answer) == 6
            where.append((start < cached < end, cached > end))
        assert where == [(True, False), (False, True)], where
    finally:
        engine.stop()
        engine.wait_stopped()


@pytest.mark.parametrize("kind", ["qwen3_5", "qwen2_vl"])
def test_the_images_of_earlier_turns_are_not_processed_again(loaded, kind):
    # Of two sizes: their patches end to end, their grids one after the other.
    processed_once(loaded[kind][2], lambda messages: rendered(loaded[kind], messages), image)


def test_two_sequences_interleaved_on_one_model_answer_as_each_alone(loaded):
    """Nothing of a sequence is kept on the model: two image requests and a text-only
    one, their passes interleaved (as a batching engine runs them), answer as each does
    alone. (mlx-vlm's own state would give the second the first one's rope delta.)"""
    model, tokenizer, _ = seeing = loaded["qwen3_5"]
    requests = [rendered(seeing, looking(1)), rendered(seeing, looking(2, 5)), rendered(seeing, [{"role": "user", "content": "Name a colour."}])]

    def steps(r):
        """A request's greedy tokens, one pass at a time (prefill chunks of 8, then decode)."""
        kv = model.make_cache()
        fed = model if r.seen_images is None else vision.Prompted(model, r.ids, r.seen_images, 0)
        for i in range(0, len(r.ids), 8):
            logits = fed(mx.array(r.ids[i : i + 8])[None], cache=kv)
            yield None
        for _ in range(6):
            token = int(mx.argmax(logits[0, -1]).item())
            yield token
            logits = fed(mx.array([[token]]), cache=kv)

    alone = [[t for t in steps(r) if t is not None] for r in requests]
    running = dict(enumerate(steps(r) for r in requests))
    together: list[list[int]] = [[] for _ in requests]
    while running:  # one pass of each in turn
        for i, run in list(running.items()):
            token = next(run, "done")
            if token == "done":
                del running[i]
            elif token is not None:
                together[i].append(token)
    assert together == alone and len(set(map(tuple, alone))) == 3


def test_a_hybrid_model_s_saved_cache_is_reused_after_a_restart(loaded, tmp_path):
    """`[cache] persist`: Qwen3.5's linear-attention layers' caches (mlx-vlm's
    ArraysCache) are saved as mlx-lm's and loaded back as mlx-vlm's."""
    from anyclaude.engine.cache import PrefixCache
    from anyclaude.engine.engine import Engine, Loaded
    from test_vision import Cutting, ask

    seeing = loaded["qwen3_5"]
    model, tokenizer, v = seeing
    answers = []
    for seed in (1, 2):  # the second engine: the same model, started again
        cutting = Cutting(model)
        engine = Engine(lambda: Loaded(model=cutting, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset(), vision=v, cache_dir=tmp_path / "saved"), prefill_step=64, cache=PrefixCache(2**30), persist=True)
        engine.start()
        try:
            r = rendered(seeing, looking(seed))
            answer, cached, _ = ask(engine, cutting, r)
        finally:
            engine.stop()
            engine.wait_stopped()
        answers.append((cached, answer == reference_tokens(seeing, looking(seed), [seed], tmp_path)[: len(answer)]))
    assert answers == [(0, True), (r.checkpoint, True)]
