"""The upstream APIs' streams read into events, and requests written for them: the shapes
real servers send that the scripted upstream of test_upstream.py does not."""

from __future__ import annotations

import asyncio
import json

import msgspec

from anyclaude.api import wire
from anyclaude.profiles import Model
from anyclaude.toolcalls import BadCall, CallDelta, CallStart, Text, Thinking, ToolCall
from anyclaude.upstream import anthropic, openai
from anyclaude.upstream.base import Broke, Ended, Output, Usage, sse

TOOLS = [{"type": "function", "function": {"name": "Read", "parameters": {"type": "object", "properties": {"n": {"type": "integer"}}}}}]


def read(reader, chunks: list[dict | str], close: bool = False) -> list:
    events = []
    for c in chunks:
        events += reader.feed("message", c if isinstance(c, str) else json.dumps(c))
    if close:
        events += reader.close()
    return events


def segments(events: list) -> list:
    return [s for e in events if isinstance(e, Output) for s in e.segments]


def delta(**d) -> dict:
    return {"choices": [{"index": 0, "delta": d, "finish_reason": None}]}


def test_openai_calls_without_an_index_and_with_their_name_repeated():
    reader = openai.Reader(TOOLS)
    events = read(reader, [
        delta(tool_calls=[{"id": "a", "function": {"name": "Read", "arguments": '{"n": '}}]),
        delta(tool_calls=[{"function": {"name": "Read", "arguments": '"2"}'}}]),
        delta(tool_calls=[{"id": "b", "function": {"name": "Read", "arguments": {"n": 3}}}]),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]},
        "[DONE]",
    ])
    assert segments(events) == [ToolCall("Read", {"n": 2}), ToolCall("Read", {"n": 3})]
    assert events[-1] == Ended("tool_use") and reader.done


def test_openai_text_after_a_call_ends_the_call_first_and_unknown_tools_are_text():
    events = read(openai.Reader(TOOLS), [
        delta(reasoning="hmm"),
        delta(tool_calls=[{"index": 0, "id": "a", "function": {"name": "Write", "arguments": "{}"}}]),
        delta(content="done"),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
    ], close=True)  # no [DONE]: a finish_reason came, so it is the end
    got = segments(events)
    assert got[0] == Thinking("hmm") and isinstance(got[1], BadCall) and "unknown tool" in got[1].reason and got[2] == Text("done")
    assert events[-1] == Ended("end_turn")


def test_openai_endings_stop_strings_usage_errors_and_hang_ups():
    reader = openai.Reader(None, ["END"])
    events = read(reader, [
        {"choices": [{"index": 0, "delta": {"content": "x"}, "finish_reason": "stop", "stop_reason": "END"}]},
        {"choices": [], "usage": {"prompt_tokens": 10, "completion_tokens": 2, "prompt_tokens_details": {"cached_tokens": 4}}},
        "[DONE]",
    ])
    assert Usage(input_tokens=6, output_tokens=2, cache_read=4) in events and events[-1] == Ended("stop_sequence", "END")
    assert read(openai.Reader(), [delta(content="x")], close=True)[-1] == Broke("the upstream ended the stream before the answer's end; retry")
    assert isinstance(read(openai.Reader(), [{"error": {"message": "boom"}}])[-1], Broke)
    assert read(openai.Reader(), [{"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}, "[DONE]"])[-1] == Ended("max_tokens")


def test_anthropic_endings_and_a_block_begun_with_its_content():
    reader = anthropic.Reader()
    events = read(reader, [
        {"type": "content_block_start", "index": 0, "content_block": {"type": "tool_use", "id": "x", "name": "Read", "input": {"n": 1}}},
        {"type": "content_block_stop", "index": 0},
        {"type": "message_stop"},
    ])
    assert segments(events) == [CallStart("Read"), CallDelta('{"n": 1}'), ToolCall("Read", {})]
    assert events[-1] == Ended("end_turn")
    assert read(anthropic.Reader(), [{"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}])[-1] == Broke("upstream: no", overloaded=False)


def test_sse_framing_multi_line_data_and_comments():
    async def lines():
        for line in [": comment", "event: a", "data: 1", "data: 2", "", "data: 3", ""]:
            yield line

    async def collect():
        return [e async for e in sse(lines())]

    assert asyncio.run(collect()) == [("a", "1\n2"), ("message", "3")]


def test_openai_request_tool_choices_and_thinking():
    model = Model(upstream="http://h:1", api="openai", upstream_model="m")

    def body(**extra) -> dict:
        raw = {"model": "claude", "max_tokens": 10, "messages": [{"role": "user", "content": "hi"}], **extra}
        request = wire.decode_request(msgspec.json.encode(raw))
        return openai.body(raw, request, model, 10, keep_billing_header=False)

    tool = {"name": "Read", "input_schema": {"type": "object"}}
    assert "tools" not in body(tools=[tool], tool_choice={"type": "none"})
    assert body(tools=[tool], tool_choice={"type": "tool", "name": "Read"})["tool_choice"] == {"type": "function", "function": {"name": "Read"}}
    assert "tool_choice" not in body(tools=[tool])
    assert body(thinking={"type": "enabled", "budget_tokens": 100})["chat_template_kwargs"] == {"enable_thinking": True}
    assert "chat_template_kwargs" not in body() and "temperature" not in body()


def test_health_asks_an_upstream_again_once_what_it_knows_is_stale(monkeypatch):
    from anyclaude.upstream import base, make
    from fault_upstream import FaultUpstream

    server = FaultUpstream()
    upstream = make("m", Model(upstream=server.url, upstream_model="big-model", timeout_connect=2))
    upstream.start()
    assert upstream.wait_ready(10) and upstream.reachable is True and upstream.loaded.context_length == 32768
    gate = base.Gate(upstream)
    assert upstream.health(gate)["reachable"] is True  # fresh: not asked again
    assert upstream._probing is None or not upstream._probing.is_alive()
    server.close()  # it goes down
    monkeypatch.setattr(base, "STALE_SECONDS", 0.0)
    upstream.health(gate)
    upstream.refresh().join(10)
    assert upstream.health(gate)["reachable"] is False and "ConnectError" in upstream.health(gate)["error"]
