"""Tool use through the real daemon and the tiny model: forced calls are schema-valid."""

from __future__ import annotations

import json

import jsonschema
import pytest

import anthropic
from claude_code import READ_SCHEMA, tools

MODEL = "claude-opus-4-8"
GREEDY = {"extra_body": {"temperature": 0}}
READ = {"name": "Read", "description": "Read a file from the local filesystem.", "input_schema": READ_SCHEMA}
ASK = [{"role": "user", "content": "What is in my notes file?"}]


def valid(block, schema) -> None:
    jsonschema.Draft202012Validator(schema).validate(block.input)


def test_tool_choice_tool_returns_a_schema_valid_call_streamed_or_not(client):
    kwargs = dict(model=MODEL, max_tokens=200, tools=[READ], tool_choice={"type": "tool", "name": "Read"}, messages=ASK, **GREEDY)
    message = client.messages.create(**kwargs)
    assert message.stop_reason == "tool_use"
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "Read" and call.id.startswith("toolu_")
    valid(call, READ_SCHEMA)
    with client.messages.stream(**kwargs) as stream:
        streamed = stream.get_final_message()
    assert streamed.model_dump(exclude={"id", "usage"}, mode="json") | {"content": None} == message.model_dump(exclude={"id", "usage"}, mode="json") | {"content": None}
    assert [(b.type, b.name, b.input) for b in streamed.content] == [(b.type, b.name, b.input) for b in message.content]


def test_tool_choice_any_calls_one_of_the_tools_validly(client):
    offered = tools()[:8] + [READ]
    message = client.messages.create(model=MODEL, max_tokens=300, tools=offered, tool_choice={"type": "any"}, messages=ASK, **GREEDY)
    assert message.stop_reason == "tool_use"
    (call,) = [b for b in message.content if b.type == "tool_use"]
    schema = {t["name"]: t["input_schema"] for t in offered}[call.name]
    valid(call, schema)


def test_tool_choice_naming_an_unknown_tool_is_a_400(client):
    with pytest.raises(anthropic.BadRequestError, match="no tool named 'Write'"):
        client.messages.create(model=MODEL, max_tokens=20, tools=[READ], tool_choice={"type": "tool", "name": "Write"}, messages=ASK)


def test_a_claude_code_shaped_second_turn_is_served(client):
    history = ASK + [
        {
            "role": "assistant",
            "content": [
                {"type": "text", "text": "Let me read it."},
                {"type": "tool_use", "id": "toolu_01abc", "name": "Read", "input": {"file_path": "/home/me/notes.txt"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_01abc", "content": [{"type": "text", "text": "1\tbuy milk\n2\tcall mum"}]},
                {"type": "text", "text": "<system-reminder>\nThe file was read in full.\n</system-reminder>"},
            ],
        },
    ]
    message = client.messages.create(model=MODEL, max_tokens=30, tools=[READ], messages=history, **GREEDY)
    assert message.stop_reason in ("end_turn", "max_tokens", "tool_use")
    assert message.usage.input_tokens + message.usage.cache_read_input_tokens > 100
    for block in message.content:
        assert block.type != "text" or block.text.strip()


def test_a_forced_call_streams_its_arguments_as_they_are_written(client):
    """The tool_use block starts once the call's name is written, and its input follows in
    pieces as generated (the grammar keeps every prefix valid): Claude Code shows a long
    Write while it is written."""
    write = {"name": "Write", "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}}, "required": ["file_path", "content"]}}
    ask = [{"role": "user", "content": "Write the word hello to /tmp/hello.txt."}]
    with client.messages.stream(model=MODEL, max_tokens=250, tools=[write], tool_choice={"type": "tool", "name": "Write"}, messages=ask, **GREEDY) as stream:
        events = list(stream)
        final = stream.get_final_message()
    kinds = [e.type for e in events]
    start = kinds.index("content_block_start")
    assert events[start].content_block.type == "tool_use" and events[start].content_block.name == "Write"
    pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
    assert len(pieces) >= 8  # about one a token, not one at the end
    assert final.stop_reason == "tool_use"
    (call,) = [b for b in final.content if b.type == "tool_use"]
    assert json.loads("".join(pieces)) == call.input and set(call.input) == {"file_path", "content"}
