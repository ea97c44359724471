"""The fallback for chat templates with no tool syntax anyclaude can parse (Gemma 3,
SmolLM2, ...): the tools go into the system prompt in the Hermes format, calls come
back as `<tool_call>{..}</tool_call>`, and the history is written the same way."""

from __future__ import annotations

import json
from typing import Any

from .base import Family, Format, Hints, with_markers
from .hermes import CALLS, json_start, parse_json

FORMAT = Format(name="generic", family="generic", call_start=("<tool_call>",), call_end="</tool_call>")

HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


class Generic(Family):
    name = "generic"
    order = 1000  # whatever no other family claims

    def detect(self, hints: Hints) -> Format:
        return with_markers(FORMAT, hints)

    def call_format(self, fmt: Format, template: str):
        return CALLS

    def parse(self, fmt: Format, marker: str, body: str, tools: list[dict]) -> list[Any]:
        return parse_json(body)

    def stream_start(self, marker: str, body: str) -> tuple[str, int] | None:
        return json_start(body)

    def inputs(self, messages: list[dict], tools: list[dict]) -> tuple[list[dict], None]:
        return (with_tools(messages, tools) if tools else messages), None


def with_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    """The conversation with the tools in its system prompt and calls and results as text."""
    from ..prompt import merge

    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    section = HEADER + listing + FOOTER
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{section}"
    else:
        out.insert(0, {"role": "system", "content": section})
    for m in out:
        if calls := m.pop("tool_calls", None):
            rendered = "\n".join(
                "<tool_call>\n"
                + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                + "\n</tool_call>"
                for c in calls
            )
            m["content"] = f"{m['content']}\n{rendered}" if m["content"] else rendered
        if m["role"] == "tool":
            m["role"] = "user"
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
            m.pop("tool_call_id", None)
    merged: list[dict] = []
    for m in out:
        merge(merged, m)
    return merged


FAMILY = Generic()
