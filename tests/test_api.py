"""The official anthropic SDK against the real daemon and the tiny model."""

from __future__ import annotations

import anthropic
import pytest

from bench.harness import request
from sse_grammar import check

MODEL = "claude-opus-4-8"
# The SDK no longer takes sampling parameters; the daemon still honours them.
GREEDY = {"extra_body": {"temperature": 0}}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


def test_messages_create_answers_paris(client):
    message = client.messages.create(model=MODEL, max_tokens=40, **GREEDY, messages=FRANCE)
    assert message.type == "message" and message.role == "assistant"
    assert message.id.startswith("msg_") and message.model == MODEL
    assert "Paris" in "".join(b.text for b in message.content if b.type == "text")
    assert message.stop_reason in ("end_turn", "max_tokens")
    assert message.usage.input_tokens > 0 and message.usage.output_tokens > 0
    assert message._request_id.startswith("req_")


def test_stream_final_message_matches_non_streaming(client):
    kwargs = dict(model=MODEL, max_tokens=24, **GREEDY, messages=FRANCE)
    plain = client.messages.create(**kwargs)
    with client.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert streamed.model_dump(exclude={"id", "usage"}) == plain.model_dump(exclude={"id", "usage"})
    total = lambda u: (u.input_tokens + u.cache_read_input_tokens, u.output_tokens)  # noqa: E731
    assert total(streamed.usage) == total(plain.usage)


def test_count_tokens_equals_message_start_input_tokens(client, daemon):
    body = dict(
        model=MODEL,
        system=[{"type": "text", "text": "You are terse.", "cache_control": {"type": "ephemeral"}}],
        messages=[{"role": "user", "content": "Name a colour."}],
        tools=[{"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}}}],
    )
    counted = client.messages.count_tokens(**body)
    with client.messages.stream(max_tokens=4, **body) as stream:
        for event in stream:
            if event.type == "message_start":
                usage = event.message.usage
                break
    # The prefix cache splits the prompt between input_tokens and cache_read_input_tokens.
    assert counted.input_tokens == usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens
    assert usage.input_tokens > 0
    without_tools = client.messages.count_tokens(**{k: v for k, v in body.items() if k != "tools"})
    assert without_tools.input_tokens < counted.input_tokens


def test_models_list_terminates_and_retrieve(client):
    ids = [m.id for m in client.models.list()]
    # The aliases, then the id each model always answers to (what `anyclaude claude` sends).
    assert ids == ["claude-opus-4-8", "claude-sonnet-4-6", "claude-haiku-4-5", "anyclaude-smollm2"]
    info = client.models.retrieve("claude-haiku-4-5")
    assert info.id == "claude-haiku-4-5" and info.type == "model"
    assert client.models.retrieve("anyclaude-smollm2").max_input_tokens == 8192
    with pytest.raises(anthropic.NotFoundError):
        client.models.retrieve("gpt-4o")


def test_stop_sequence_is_reported_and_cut(client, daemon):
    message = client.messages.create(
        model=MODEL,
        max_tokens=40,
        **GREEDY,
        stop_sequences=["Paris"],
        messages=FRANCE,
    )
    text = "".join(b.text for b in message.content if b.type == "text")
    assert message.stop_reason == "stop_sequence" and message.stop_sequence == "Paris"
    assert "Paris" not in text
    # The answer ended before the engine did: the log line follows once it has, and says
    # what the engine kept.
    daemon.wait_idle()
    (logged,) = [r for r in daemon.records() if r["request_id"] == message._request_id]
    assert logged["outcome"] == "stop_sequence" and logged["cache_store"] == "stored"


def test_max_tokens_stop_reason_and_usage(client):
    message = client.messages.create(model=MODEL, max_tokens=3, **GREEDY, messages=[{"role": "user", "content": "Write a long poem about the sea."}])
    assert message.stop_reason == "max_tokens" and message.usage.output_tokens == 3


def test_streamed_bytes_follow_the_grammar(daemon):
    body = b'{"model":"claude-opus-4-8","max_tokens":16,"stream":true,"messages":[{"role":"user","content":"Say hi"}]}'
    reply = request(daemon.port, "POST", "/v1/messages?beta=true", body, {"accept": "application/json"})
    assert reply.status == 200
    assert reply.headers["content-type"] == "text/event-stream" and reply.headers["cache-control"] == "no-cache"
    assert reply.headers["request-id"].startswith("req_")
    events = check(reply.body)
    assert events[-2]["usage"]["output_tokens"] >= 1


def test_streamed_stop_sequence_follows_the_grammar(daemon):
    body = (
        b'{"model":"claude-opus-4-8","max_tokens":40,"temperature":0,"stream":true,"stop_sequences":["Paris"],'
        b'"messages":[{"role":"user","content":"What is the capital of France?"}]}'
    )
    events = check(request(daemon.port, "POST", "/v1/messages", body).body)
    assert events[-2]["delta"] == {"stop_reason": "stop_sequence", "stop_sequence": "Paris"}
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert "Paris" not in text
