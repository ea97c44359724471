"""Hermes-style calls (Qwen2.5, Qwen3, Hermes, and mlx-lm's `json_tools` parser):
`<tool_call>{"name": .., "arguments": {..}}</tool_call>`."""

from __future__ import annotations

import json
import re
from typing import Any

from .. import repair
from .base import Family, Format, Hints, with_markers
from .grammar import JsonCall

FORMAT = Format(name="hermes", family="hermes", call_start=("<tool_call>",), call_end="</tool_call>")
CALLS = JsonCall("hermes", "<tool_call>\n", "\n</tool_call>", markers=("<tool_call>", "</tool_call>"), trigger="<tool_call>")


def json_start(body: str, key: str = "arguments") -> tuple[str, int] | None:
    """Where the arguments start in a body laid out as the forced-call grammar writes it:
    `{"name": NAME, KEY: ` then the arguments."""
    found = re.match(r'\s*\{"name": ("(?:[^"\\]|\\.)*"), "' + key + '": ', body)
    return (json.loads(found.group(1)), found.end()) if found else None


def parse_json(body: str) -> list[Any]:
    """The calls in a JSON body: one object or a list of them."""
    parsed = repair.loads(body)
    if not parsed:
        raise ValueError("no call in the body")
    return parsed if isinstance(parsed, list) else [parsed]


class Hermes(Family):
    name = "hermes"
    order = 20

    def detect(self, hints: Hints) -> Format | None:
        return with_markers(FORMAT, hints) if hints.parser == "json_tools" else None

    def call_format(self, fmt: Format, template: str) -> JsonCall:
        return CALLS

    def parse(self, fmt: Format, marker: str, body: str, tools: list[dict]) -> list[Any]:
        return parse_json(body)

    def stream_start(self, marker: str, body: str) -> tuple[str, int] | None:
        return json_start(body)


FAMILY = Hermes()
