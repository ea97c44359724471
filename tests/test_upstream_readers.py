"""The upstream APIs' streams read into events, and requests written for them: the shapes
real servers send that the scripted upstream of test_upstream.py does not."""

from __future__ import annotations

import asyncio
import json

import msgspec

from anyclaude.api import wire
from anyclaude.profiles import Model
from anyclaude.toolcalls import BadCall, Text, Thinking, ToolCall
from anyclaude.upstream import anthropic, openai
from anyclaude.upstream.base import Broke, Ended, Forced, Output, Usage, sse

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


def anthropic_tools(*tools: dict) -> list[wire.Tool]:
    return msgspec.convert(list(tools), list[wire.Tool])


READ = {"name": "Read", "input_schema": {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}}


def call(index: int, name: str, *pieces: str, given: dict | None = None) -> list[dict]:
    return [
        {"type": "content_block_start", "index": index, "content_block": {"type": "tool_use", "id": "x", "name": name, "input": given or {}}},
        *({"type": "content_block_delta", "index": index, "delta": {"type": "input_json_delta", "partial_json": p}} for p in pieces),
        {"type": "content_block_stop", "index": index},
    ]


def stop_with(reason: str) -> list[dict]:
    return [{"type": "message_delta", "delta": {"stop_reason": reason}, "usage": {"output_tokens": 3}}, {"type": "message_stop"}]


def test_anthropic_endings_and_a_block_begun_with_its_content():
    reader = anthropic.Reader(anthropic_tools(READ))
    events = read(reader, [*call(0, "Read", given={"n": 1}), {"type": "message_stop"}])
    assert segments(events) == [ToolCall("Read", {"n": 1})]
    assert events[-1] == Ended("end_turn")
    assert read(anthropic.Reader(), [{"type": "error", "error": {"type": "invalid_request_error", "message": "no"}}])[-1] == Broke("upstream: no", overloaded=False)


def test_anthropic_calls_are_repaired_checked_against_the_schema_or_shown_as_text():
    bash = {"type": "bash_20250124", "name": "bash"}
    reader = anthropic.Reader(anthropic_tools(READ, bash))
    events = read(reader, [
        *call(0, "Read", '{"n": ', '"2",}'),  # a string for an integer, a trailing comma: repaired
        *call(1, "Read", '{"m": 1}'),  # `n` is required
        *call(2, "Read", "{'n' 1"),  # no repair makes this JSON
        *call(3, "Write", "{}"),  # not among the tools
        *call(4, "bash", '{"command": "ls"}'),  # an Anthropic-defined tool: no schema to hold it to
        *stop_with("tool_use"),
    ])
    got = [s for s in segments(events)]
    assert got[0] == ToolCall("Read", {"n": 2}) and got[4] == ToolCall("bash", {"command": "ls"})
    assert [type(s) for s in got[1:4]] == [BadCall] * 3
    assert "required" in got[1].reason and "unparseable" in got[2].reason and "unknown tool" in got[3].reason
    assert json.loads(got[1].raw) == {"type": "tool_use", "name": "Read", "input": {"m": 1}}  # as written


def test_anthropic_and_openai_calls_cut_by_max_tokens_are_not_repaired_into_calls():
    # The API closes a cut tool_use block before its message_delta says max_tokens.
    cut = read(anthropic.Reader(anthropic_tools(READ)), [*call(0, "Read", '{"n": 2'), *stop_with("max_tokens")])
    assert segments(cut) == [BadCall(raw='{"type": "tool_use", "name": "Read", "input": {"n": 2}', reason="truncated")]
    assert cut[-1] == Ended("max_tokens")
    # The same call, not cut: the event after it says so, and repair closes it.
    assert segments(read(anthropic.Reader(anthropic_tools(READ)), [*call(0, "Read", '{"n": 2'), {"type": "ping"}, *stop_with("end_turn")])) == [ToolCall("Read", {"n": 2})]
    # A block that never closed before message_stop.
    unclosed = read(anthropic.Reader(anthropic_tools(READ)), [*call(0, "Read", '{"n": 2')[:2], {"type": "message_stop"}])
    assert segments(unclosed)[0].reason == "truncated"
    events = read(openai.Reader(TOOLS), [
        delta(tool_calls=[{"index": 0, "id": "a", "function": {"name": "Read", "arguments": '{"n": 1}'}}]),
        delta(tool_calls=[{"index": 1, "id": "b", "function": {"name": "Read", "arguments": '{"n": 2'}}]),
        {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]},
        "[DONE]",
    ])
    got = segments(events)
    assert got[0] == ToolCall("Read", {"n": 1}) and isinstance(got[1], BadCall) and got[1].reason == "truncated"
    assert events[-1] == Ended("max_tokens")


def forced(reader, choice: dict) -> Forced:
    return Forced(reader, msgspec.convert(choice, wire.ToolChoice), "http://h:1 (openai API)")


def test_a_forced_call_holds_back_what_comes_before_it():
    reader = forced(openai.Reader(TOOLS), {"type": "any"})
    before = read(reader, [delta(content="Let me see."), delta(tool_calls=[{"index": 0, "id": "a", "function": {"name": "Read", "arguments": '{"n": 1}'}}])])
    assert segments(before) == [] and len([e for e in before if isinstance(e, Output)]) == 2  # the watchdog hears them
    events = read(reader, [{"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]}, "[DONE]"])
    assert segments(events) == [Text("Let me see."), ToolCall("Read", {"n": 1})] and events[-1] == Ended("tool_use")


def test_an_answer_without_the_forced_call_is_refused_never_passed_off_as_text():
    answered = [delta(content="I would rather talk."), {"choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}, "[DONE]"]
    (*held, refusal) = read(forced(openai.Reader(TOOLS), {"type": "any"}), answered)
    assert segments(held) == [] and refusal.invalid and not refusal.overloaded
    assert "tool_choice any" in refusal.message and "without a tool call" in refusal.message and "http://h:1" in refusal.message
    # Another tool than the one named, or a call that cannot be made valid, is not the call.
    other = read(forced(anthropic.Reader(anthropic_tools(READ, {"name": "Write", "input_schema": {"type": "object"}})), {"type": "tool", "name": "Read"}), [*call(0, "Write", "{}"), *stop_with("tool_use")])
    assert segments(other) == [] and "a call to 'Read' (it called 'Write')" in other[-1].message
    bad = read(forced(anthropic.Reader(anthropic_tools(READ)), {"type": "tool", "name": "Read"}), [*call(0, "Read", '{"m": 1}'), *stop_with("tool_use")])
    assert isinstance(bad[-1], Broke) and "required" in bad[-1].message
    # A forced call the cap cut short ends as max_tokens, as a local one does.
    cut = read(forced(anthropic.Reader(anthropic_tools(READ)), {"type": "any"}), [*call(0, "Read", '{"n": 2'), *stop_with("max_tokens")])
    assert segments(cut) == [] and cut[-1] == Ended("max_tokens")
    # ... but text or another tool until the cap is still not the call.
    talked = read(forced(openai.Reader(TOOLS), {"type": "any"}), [delta(content="Well,"), {"choices": [{"index": 0, "delta": {}, "finish_reason": "length"}]}, "[DONE]"])
    assert talked[-1].invalid and "stop_reason max_tokens" in talked[-1].message


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
