"""gpt-oss: OpenAI's harmony format. Each message opens with a header, `<|start|>ROLE`
and/or `<|channel|>CHANNEL`, up to `<|message|>`; the `analysis` channel is reasoning,
`final` (and `commentary` without a recipient) is text, and a header with a recipient,
`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{..}`, is a call
(the recipient may also sit in the role part: `<|start|>assistant to=functions.NAME`).
`<|call|>` and `<|return|>` end the turn.

openai-harmony would parse and render this, but only from token ids of its o200k
vocabulary, which it downloads (hash-checked) on first use: a daemon that must work
offline cannot depend on that, so the format is read here from the text, and the
model's own chat template renders the conversation, with one fix below."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .. import repair
from .base import Family, Format, Hints, with_markers
from .grammar import CallFormat, ConstraintError, alternatives, json_value, lark_string

FORMAT = Format(
    name="harmony",
    family="gpt_oss",
    think_start="",  # reasoning is a channel, opened by a header
    think_end="<|end|>",
    drop=("<|return|>", "<|call|>", "<|end|>"),
    headers=("<|start|>", "<|channel|>"),
    header_end="<|message|>",
    header_rest=" to=",
)

_RECIPIENT = re.compile(r"\bto=([^\s<]+)")
_CHANNEL = re.compile(r"<\|channel\|>\s*(\w+)")


class HarmonyCall(CallFormat):
    """`<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>{..}`, the
    call as gpt-oss writes it after `<|start|>assistant`."""

    name = "harmony"
    CHANNEL, CONSTRAIN, MESSAGE = "<|channel|>", "<|constrain|>", "<|message|>"
    # The recipient opens a call wherever the header has it (in the channel part, or
    # the role part as the template writes it): from there on the grammar writes the
    # rest of the header as the model usually does, then the arguments.
    trigger, lead = "to=functions.", "<|channel|>commentary "

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        lines = [f"start: {marker(self.CHANNEL)} {lark_string('commentary to=functions.')} call", alternatives(tools)]
        for i, (name, schema) in enumerate(tools):
            if not re.fullmatch(r"[^\s<]+", name):
                raise ConstraintError(f"tool name {name!r} cannot be written in a harmony call")
            head = f"{lark_string(name + ' ')} {marker(self.CONSTRAIN)} {lark_string('json')} {marker(self.MESSAGE)}"
            lines.append(f"tool{i}: {head} {json_value(schema)}")
        return "\n".join(lines)

    def render(self, name: str, arguments: dict) -> str:
        return f"{self.CHANNEL}commentary to=functions.{name} {self.CONSTRAIN}json{self.MESSAGE}{json.dumps(arguments, ensure_ascii=False)}"

    def parse(self, text: str) -> tuple[str, dict]:
        header, sep, body = text.partition(self.MESSAGE)
        found = _RECIPIENT.search(header)
        if not (sep and found):
            raise ValueError("not a harmony tool call")
        return found.group(1).removeprefix("functions."), json.loads(body)


CALLS = HarmonyCall()

# How the template renders a call in history (recipient in the role part, no
# `<|constrain|>`), and how the model wrote it: the history must be what it generated.
_TEMPLATE_CALL = re.compile(r"<\|start\|>assistant to=([^\s<]+)<\|channel\|>commentary ([^\s<]+)<\|message\|>")


class GptOss(Family):
    name = "gpt_oss"
    order = 5

    def detect(self, hints: Hints) -> Format | None:
        if hints.parser is not None or not ("<|channel|>" in hints.template and "<|start|>" in hints.template):
            return None
        return with_markers(FORMAT, hints)

    def call_format(self, fmt: Format, template: str) -> CallFormat:
        return CALLS

    def route(self, header: str) -> tuple[str, str]:
        if recipient := _RECIPIENT.search(header):
            if recipient.group(1) != "assistant":
                return "call", header
        channel = _CHANNEL.search(header)
        return ("think", "") if channel and channel.group(1) == "analysis" else ("text", "")

    def parse(self, fmt: Format, marker: str, body: str, tools: list[dict]) -> list[Any]:
        recipient = _RECIPIENT.search(marker)
        if recipient is None:
            raise ValueError("a call with no recipient")
        return [{"name": recipient.group(1).removeprefix("functions."), "arguments": repair.loads(body)}]

    def stream_start(self, marker: str, body: str) -> tuple[str, int] | None:
        recipient = _RECIPIENT.search(marker)  # the body is the arguments
        return (recipient.group(1).removeprefix("functions."), 0) if recipient else None

    def inputs(self, messages: list[dict], tools: list[dict]) -> tuple[list[dict], list[dict] | None]:
        return _one_call_each(messages), tools or None

    def template_kwargs(self, effort: str | None) -> dict:
        levels = {"low": "low", "medium": "medium", "high": "high", "max": "high"}
        return {"reasoning_effort": levels[effort]} if effort in levels else {}

    def rendered(self, text: str) -> str:
        return _TEMPLATE_CALL.sub(r"<|start|>assistant<|channel|>commentary to=\1 <|constrain|>\2<|message|>", text)


def _one_call_each(messages: list[dict]) -> list[dict]:
    """The conversation as the template can render it: reasoning as `thinking`, and one
    call per assistant message, each followed by its result (harmony's order; the
    template renders only a message's first call and names every result after it)."""
    out: list[dict] = []
    i = 0
    while i < len(messages):
        m = dict(messages[i])
        i += 1
        if m["role"] != "assistant":
            out.append(m)
            continue
        thinking = m.pop("reasoning_content", "")
        calls = m.pop("tool_calls", None)
        if thinking and not (calls and m["content"]):  # the template takes one or the other
            m["thinking"] = thinking
        if not calls:
            out.append(m)
            continue
        results = []
        while i < len(messages) and messages[i]["role"] == "tool":
            results.append(messages[i])
            i += 1
        by_id = {r.get("tool_call_id"): r for r in results}
        for n, call in enumerate(calls):
            out.append((m if n == 0 else {"role": "assistant", "content": ""}) | {"tool_calls": [call]})
            if (result := by_id.pop(call.get("id"), None)) is not None:
                out.append(result)
        out.extend(r for r in results if r.get("tool_call_id") in by_id)
    return out


FAMILY = GptOss()
