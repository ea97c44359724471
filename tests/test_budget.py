"""The thinking budget (anyclaude.budget) on the tiny model's real tokenizer and model."""

from __future__ import annotations

import json
from pathlib import Path

import anthropic
import mlx.core as mx
import msgspec
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_logits_processors, make_sampler
from sse_grammar import check

from anyclaude import budget, families, prompt
from anyclaude.engine import decode
from anyclaude.api import wire
from anyclaude.budget import Budget, limit
from anyclaude.engine.engine import Engine, Loaded
from anyclaude.engine.events import Job, Sampling
from bench.harness import request, serving

PROMPT = "<|im_start|>user\nWhy?<|im_end|>\n<|im_start|>assistant\n"


@pytest.fixture(scope="module")
def special(tiny_model):
    """The tiny tokenizer with `<think>` and `</think>` as single special tokens."""
    from mlx_lm.utils import load_tokenizer

    return load_tokenizer(tiny_model, {"extra_special_tokens": ["<think>", "</think>"]})


@pytest.fixture(params=["multi", "special"])
def tok(request, tokenizer, special):
    return tokenizer if request.param == "multi" else special


def ids(tokenizer, text: str) -> list[int]:
    return list(tokenizer.encode(text, add_special_tokens=False))


def run(processor, tokenizer, prompt: str, script: list[int]) -> tuple[list[int], list[bool]]:
    """Generate with `processor`: each step takes the one token it allows when it masks
    all others, or else the next one of `script` (a model free to choose). Returns the
    tokens and, for each, whether it was forced."""
    width = len(tokenizer._tokenizer)
    seen = ids(tokenizer, prompt)
    out, forced = [], []
    script = list(script)
    while script:
        logits = processor(mx.array(seen), mx.zeros((1, width)))
        finite = np.flatnonzero(np.isfinite(np.asarray(logits[0])))
        if finite.size == width:
            token = script.pop(0)
        else:
            assert finite.size == 1
            token = int(finite[0])
        out.append(token)
        forced.append(finite.size == 1)
        seen.append(token)
    return out, forced


def test_the_format_has_the_markers_as_expected(tokenizer, special):
    assert families.detect(tokenizer).think_end == families.detect(special).think_end == "</think>"
    assert len(ids(tokenizer, "</think>")) == 3 and ids(special, "</think>") == [special.convert_tokens_to_ids("</think>")]


def test_open_from_the_prompt_closes_at_the_budget_then_is_free(tok):
    fmt = families.detect(tok)
    processor = Budget(tok, fmt, 6, open=True)
    reasoning = ids(tok, " hmm") * 3
    assert len(reasoning) == 6
    # After the close the model writes what it likes, markers included.
    after = ids(tok, " Yes. <think> More. </think> Done.") + ids(tok, " hmm") * 8
    out, forced = run(processor, tok, PROMPT + "<think>\n", reasoning + after)
    end = ids(tok, "</think>")
    assert out[:6] == reasoning and not any(forced[:6])
    assert out[6 : 6 + len(end)] == end and all(forced[6 : 6 + len(end)])
    assert out[6 + len(end) :] == after and not any(forced[6 + len(end) :])
    assert processor.state == "done" and processor.spent == 6


def test_counting_starts_when_the_model_opens_reasoning(tok):
    fmt = families.detect(tok)
    processor = Budget(tok, fmt, 4, open=False)
    start = ids(tok, "<think>")
    # Text before the start marker, and the marker itself, are not reasoning.
    script = ids(tok, "Well, ") + start + ids(tok, " hmm") * 10
    out, forced = run(processor, tok, PROMPT, script)
    opened = len(ids(tok, "Well, ")) + len(start)
    end = ids(tok, "</think>")
    assert not any(forced[: opened + 4])
    assert out[opened + 4 : opened + 4 + len(end)] == end and all(forced[opened + 4 : opened + 4 + len(end)])


def test_never_opened_means_never_forced(tok):
    processor = Budget(tok, families.detect(tok), 2, open=False)
    _, forced = run(processor, tok, PROMPT, ids(tok, " The answer is forty-two, as everyone knows.") * 2)
    assert not any(forced) and processor.spent == 0


def test_the_prompt_is_not_output(tok):
    # A prompt holding a closed reasoning block (an earlier turn) still ends in an open one.
    processor = Budget(tok, families.detect(tok), 3, open=True)
    _, forced = run(processor, tok, PROMPT + "<think>\nOld.</think>Old answer.<think>\n", ids(tok, " hmm") * 6)
    assert forced[3] and not any(forced[:3])


@pytest.mark.parametrize("close", ["</think>", " </think>", "\n\n</think>\n\n"])
def test_a_model_that_closes_in_time_is_left_alone(tok, close):
    processor = Budget(tok, families.detect(tok), 12, open=True)
    # " </think>" is other tokens than the marker's own: the text still closes reasoning.
    closing = ids(tok, close)
    _, forced = run(processor, tok, PROMPT + "<think>\n", ids(tok, " hmm") * 3 + closing + ids(tok, " Yes.") * 12)
    assert not any(forced) and processor.state == "done" and processor.spent < 6 + len(closing)


@pytest.mark.parametrize("begun, spaced", [("</", ""), (" </", " "), ("</think", "")])
def test_a_marker_begun_at_the_budget_is_completed(tokenizer, begun, spaced):
    begun_ids = ids(tokenizer, begun)
    processor = Budget(tokenizer, families.detect(tokenizer), 6 + len(begun_ids), open=True)
    answer = ids(tokenizer, " Yes.")
    out, forced = run(processor, tokenizer, PROMPT + "<think>\n", ids(tokenizer, " hmm") * 3 + begun_ids + answer)
    assert tokenizer.decode(out) == f" hmm hmm hmm{spaced}</think> Yes."
    assert out[-len(answer) :] == answer and not any(forced[: 6 + len(begun_ids)]) and not any(forced[-len(answer) :])
    assert all(forced[6 + len(begun_ids) : -len(answer)])


def test_a_call_ends_reasoning(tokenizer):
    # The parser ends reasoning at a call's start marker: no end marker goes into the call.
    processor = Budget(tokenizer, families.detect(tokenizer), 12, open=True)
    call = ids(tokenizer, '<tool_call>\n{"name": "Read", "arguments": {"file_path": "/a/long/path/to/some/file.txt"}}\n</tool_call>')
    _, forced = run(processor, tokenizer, PROMPT + "<think>\n", ids(tokenizer, " hmm") * 2 + call)
    assert not any(forced) and processor.state == "done"


def test_a_zero_budget_closes_at_once(tok):
    processor = Budget(tok, families.detect(tok), 0, open=True)
    out, forced = run(processor, tok, PROMPT + "<think>\n", ids(tok, " Yes."))
    end = ids(tok, "</think>")
    assert out[: len(end)] == end and all(forced[: len(end)]) and not forced[-1]


def test_limit():
    assert limit(1024, 2048, 2048) == 1024  # as asked
    assert limit(1024, 2048, 64) == 32  # clamped: the same share
    assert limit(31999, 32000, 4096) == 3072  # clamped: the answer keeps a quarter
    assert limit(5000, 4000, 4000) == 3000  # more than max_tokens (Anthropic refuses it)
    assert limit(-1, 100, 100) == 0


def test_the_repetition_penalty_stays_beside_a_budget(tokenizer):
    # Only a grammar (a forced call) turns the penalty off: it would fight the grammar.
    engine = Engine(lambda: None)
    engine.loaded = Loaded(model=None, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset())
    job = Job(prompt=[1], max_tokens=1, sampling=Sampling(0.0, 1.0, 0, repetition_penalty=1.2), processors=lambda t: ["budget"])
    assert len(engine._processors(job)) == 2 and engine._processors(job)[-1] == "budget"
    assert engine._processors(msgspec.structs.replace(job, grammar=True)) == ["budget"]


def test_with_the_real_model_the_answer_follows(tiny_net):
    """The tiny model never closes `<think>` on its own: the budget does, with the
    repetition penalty beside it, and the model goes on writing after it."""
    model, tokenizer = tiny_net
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "Think about the number seven."}], add_generation_prompt=True, tokenize=False)
    prompt += "<think>\n"
    processor = Budget(tokenizer, families.detect(tokenizer), 12, open=True)
    penalty = make_logits_processors(repetition_penalty=1.2, repetition_context_size=64)
    out = []
    for token in decode.tokens(model, ids(tokenizer, prompt), make_prompt_cache(model), max_tokens=24, sampler=make_sampler(temp=0.0), processors=[*penalty, processor]):
        out.append(token)
    end = ids(tokenizer, "</think>")
    assert "</think>" not in tokenizer.decode(out[:12])
    assert out[12 : 12 + len(end)] == end
    assert len(out) == 24 and processor.state == "done"


# --- through the daemon -------------------------------------------------------------

MODEL = "claude-opus-4-8"
GREEDY = {"extra_body": {"temperature": 0}}
QUESTION = [{"role": "user", "content": "Think it through step by step: what is 17 times 23?"}]
ANSWER_CAP = 64  # the profile's max_tokens: every request is clamped to it
# Its generation prompt opens `<think>` (with thinking on), an ordinary-text marker here.
QWEN35 = (Path(__file__).parent / "templates" / "Qwen3.5-4B.jinja").read_text()
READ = {"name": "Read", "description": "Reads a file.", "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}}
FORCED = dict(tools=[READ], tool_choice={"type": "tool", "name": "Read"}, messages=[{"role": "user", "content": "Read /etc/hosts."}])


def test_a_forced_call_turns_reasoning_off(tiny_model):
    from mlx_lm.utils import load_tokenizer

    tokenizer = load_tokenizer(tiny_model, {"chat_template": QWEN35})
    thinking = {"type": "enabled", "budget_tokens": 1024}
    for forced, opened in [(False, True), (True, False)]:
        body = dict(model=MODEL, max_tokens=2048, thinking=thinking, **(FORCED if forced else {"messages": QUESTION}))
        request = wire.decode_request(json.dumps(body).encode())
        rendered = prompt.render(request, tokenizer)
        assert rendered.thinking_open is opened and rendered.text.endswith("<think>\n" if opened else "</think>\n\n")
        assert (budget.for_request(request, rendered, ANSWER_CAP) is not None) is opened


@pytest.fixture(scope="module")
def thinker(tmp_path_factory, model_cache, tiny_model):
    """A daemon on the tiny model with Qwen3.5's chat template."""
    directory = tmp_path_factory.mktemp("budget")
    model = directory / "model"
    model.mkdir()
    for f in tiny_model.iterdir():
        if f.name != "tokenizer_config.json":
            (model / f.name).symlink_to(f)
    config = json.loads((tiny_model / "tokenizer_config.json").read_text())
    config["chat_template"] = QWEN35
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    yield from serving(directory, model_cache, "budget", models={"smollm2": {"path": str(model), "max_tokens": ANSWER_CAP}})


@pytest.fixture(scope="module")
def thinking_client(thinker) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=thinker.url, api_key="sk-local-test", max_retries=0, timeout=300)


def test_without_a_budget_the_tiny_model_only_thinks(thinking_client):
    # What the budget is for: on its own this model never closes its reasoning (it
    # ends it with the turn), so it never answers. Adaptive at effort max has no budget.
    message = thinking_client.messages.create(
        model=MODEL, max_tokens=40, thinking={"type": "adaptive"}, messages=QUESTION, extra_body={"temperature": 0, "output_config": {"effort": "max"}}
    )
    assert [b.type for b in message.content] == ["thinking"] and message.usage.output_tokens > 32


def test_adaptive_thinking_gets_a_budget_by_its_effort(thinking_client, tokenizer):
    # Claude Code's way: adaptive, with an effort. Medium gives 4096 of a request's
    # max_tokens (the profile's clamp scales it: at most 3/4 of 40 here).
    message = thinking_client.messages.create(
        model=MODEL, max_tokens=40, thinking={"type": "adaptive"}, messages=QUESTION, extra_body={"temperature": 0, "output_config": {"effort": "medium"}}
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    assert len(ids(tokenizer, message.content[0].thinking)) <= limit(budget.ADAPTIVE["medium"], 40, 40) == 30


def test_the_thinking_block_closes_at_the_budget_and_the_answer_follows(thinking_client, tokenizer):
    # A request Anthropic accepts; the profile clamps its max_tokens to 64, and the
    # budget with it, to the same share: 1024 of 2048 -> 32 of 64.
    message = thinking_client.messages.create(
        model=MODEL, max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024}, messages=QUESTION, **GREEDY
    )
    assert [b.type for b in message.content] == ["thinking", "text"]
    thinking, text = message.content
    assert 16 < len(ids(tokenizer, thinking.thinking)) <= limit(1024, 2048, ANSWER_CAP) == 32
    assert thinking.signature and text.text.strip() and "think>" not in text.text
    assert message.usage.output_tokens > 32


def test_a_streamed_budget_is_a_well_formed_thinking_block_then_text(thinker, tokenizer):
    body = dict(model=MODEL, max_tokens=40, stream=True, temperature=0, thinking={"type": "enabled", "budget_tokens": 8}, messages=QUESTION)
    reply = request(thinker.port, "POST", "/v1/messages", json.dumps(body).encode())
    events = check(reply.body)
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["thinking", "text"]
    thought = "".join(e["delta"].get("thinking", "") for e in events if e["type"] == "content_block_delta")
    assert 0 < len(ids(tokenizer, thought)) <= 8


def test_a_forced_call_is_made_without_reasoning(thinking_client):
    # With reasoning open, this model writes a call that never ends (the grammar takes it).
    message = thinking_client.messages.create(model=MODEL, max_tokens=2048, thinking={"type": "enabled", "budget_tokens": 1024}, **FORCED, **GREEDY)
    assert [b.type for b in message.content] == ["tool_use"] and message.stop_reason == "tool_use"
