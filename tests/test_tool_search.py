"""Tool search: deferred tools stay out of the prompt until a tool_reference names them;
from there on they are defined (where the reference is) and callable."""

from __future__ import annotations

import json

import pytest
from test_templates import family_tokenizer, grammar_writes, QWEN_THINK

from anyclaude import constrain, prompt, toolcalls
from anyclaude.api import wire
from anyclaude.output import Output


def mcp_tools(n: int, *, deferred: bool) -> list[dict]:
    """MCP-style tools, as Claude Code sends them with ENABLE_TOOL_SEARCH."""
    return [
        {
            "name": f"mcp__tracker__tool_{i}",
            "description": f"Tool number {i} of the issue tracker: finds, lists, updates or comments on issues and their fields.",
            "input_schema": {
                "type": "object",
                "properties": {"issue": {"type": "string", "description": "The issue's key, e.g. ABC-123"}, "limit": {"type": "integer"}},
                "required": ["issue"],
            },
        }
        | ({"defer_loading": True} if deferred else {})
        for i in range(n)
    ]


SEARCH = {"name": "ToolSearch", "description": "Find tools.", "input_schema": {"type": "object", "properties": {"query": {"type": "string"}}}}
ASK = {"role": "user", "content": "Find the tracker tool and look at ABC-1."}
SEARCHED = {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "ToolSearch", "input": {"query": "tracker"}}]}
FOUND = {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "tool_reference", "tool_name": "mcp__tracker__tool_7"}]}]}


def req(messages: list[dict], tools: list[dict], **fields) -> wire.MessagesRequest:
    body = {"model": "m", "max_tokens": 64, "system": "You help.", "tools": tools, "messages": messages} | fields
    return wire.decode_request(json.dumps(body).encode())


def test_deferred_tools_cost_nothing_until_found(tokenizer):
    deferred = prompt.render(req([ASK], [SEARCH, *mcp_tools(40, deferred=True)]), tokenizer)
    loaded = prompt.render(req([ASK], [SEARCH, *mcp_tools(40, deferred=False)]), tokenizer)
    alone = prompt.render(req([ASK], [SEARCH]), tokenizer)
    assert deferred.ids == alone.ids and len(loaded.ids) > len(alone.ids) + 40 * 30
    assert [t["function"]["name"] for t in deferred.tools] == ["ToolSearch"]


@pytest.fixture(params=["generic", "qwen3-coder"])
def tok(request, tokenizer, tiny_model):
    return tokenizer if request.param == "generic" else family_tokenizer(tiny_model, "Qwen3-Coder.jinja", QWEN_THINK)


def test_a_found_tool_is_defined_where_it_was_found_and_can_be_called(tok):
    tools = [SEARCH, *mcp_tools(40, deferred=True)]
    before = prompt.render(req([ASK], tools), tok)
    after = prompt.render(req([ASK, SEARCHED, FOUND], tools), tok)
    # Defined in the tool result, so everything before it (the cached prefix) is as it was.
    assert after.ids[: before.checkpoint] == before.ids[: before.checkpoint]
    assert after.text.index("mcp__tracker__tool_7") > after.text.index("Find the tracker tool")
    assert "mcp__tracker__tool_8" not in after.text
    assert {t["function"]["name"] for t in after.tools} == {"ToolSearch", "mcp__tracker__tool_7"}
    # Parsed and validated as a call to a known tool; forced with tool_choice.
    calls = constrain.format_for(tok, after.format)
    text = calls.render("mcp__tracker__tool_7", {"issue": "ABC-1"})
    output = Output(tok, toolcalls.Parser(after.format, after.tools))
    segments = [s for t in tok.encode(text, add_special_tokens=False) for s in output.add(t)] + output.finish()
    assert segments == [toolcalls.ToolCall("mcp__tracker__tool_7", {"issue": "ABC-1"})]
    forced = prompt.render(req([ASK, SEARCHED, FOUND], tools, tool_choice={"type": "tool", "name": "mcp__tracker__tool_7"}), tok)
    assert grammar_writes(tok, forced, text, name="mcp__tracker__tool_7")


def test_a_tool_not_found_is_not_callable(tokenizer):
    missing = FOUND | {"content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "tool_reference", "tool_name": "nope"}]}]}
    after = prompt.render(req([ASK, SEARCHED, missing], [SEARCH, *mcp_tools(3, deferred=True)]), tokenizer)
    assert "No tool is named nope." in after.text and [t["function"]["name"] for t in after.tools] == ["ToolSearch"]
