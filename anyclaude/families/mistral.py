"""Mistral: `[TOOL_CALLS]` then a JSON list `[{"name": .., "arguments": ..}]` (v3
templates: Mistral 7B v0.3, Nemo) or `NAME[ARGS]{..}` (also `NAME[CALL_ID]ID[ARGS]{..}`:
Mistral Small 3.2, Devstral, Magistral); the call ends where its JSON does."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .. import repair
from .base import Family, Format, Hints, with_markers
from .grammar import CallFormat, ConstraintError, JsonCall, alternatives, json_value, lark_string
from .hermes import parse_json

FORMAT = Format(name="mistral", family="mistral", call_start=("[TOOL_CALLS]",))


class MistralHeader(CallFormat):
    """`[TOOL_CALLS]NAME[ARGS]{...}`, the call syntax of Mistral's newer templates
    (Mistral Small 3.2, Devstral, Magistral)."""

    name = "mistral"
    OPEN, ARGS = "[TOOL_CALLS]", "[ARGS]"
    trigger = OPEN

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        lines = [
            f"start: {marker(self.OPEN)} call",
            alternatives(tools),
        ]
        for i, (name, schema) in enumerate(tools):
            # mlx-lm's parser reads the name as a run of word characters and dashes.
            if not re.fullmatch(r"[\w-]+", name):
                raise ConstraintError(f"tool name {name!r} cannot be written in a Mistral call")
            lines.append(f"tool{i}: {lark_string(name)} {marker(self.ARGS)} {json_value(schema)}")
        return "\n".join(lines)

    def render(self, name: str, arguments: dict) -> str:
        return f"{self.OPEN}{name}{self.ARGS}{json.dumps(arguments, ensure_ascii=False)}"

    def parse(self, text: str) -> tuple[str, dict]:
        head, sep, arguments = text.removeprefix(self.OPEN).partition(self.ARGS)
        if not (text.startswith(self.OPEN) and sep):
            raise ValueError("not a Mistral tool call")
        return head, json.loads(arguments)


# The v3 templates write a JSON list: after a space (Mistral 7B v0.3) or right after the
# marker (Nemo); the call must be the one the template renders back.
_LIST = JsonCall("mistral_list", "[TOOL_CALLS] [", "]", markers=("[TOOL_CALLS]",))
_LIST_UNSPACED = JsonCall("mistral_list_unspaced", "[TOOL_CALLS][", "]", markers=("[TOOL_CALLS]",))
_HEADER = MistralHeader()


class Mistral(Family):
    name = "mistral"
    order = 20

    def detect(self, hints: Hints) -> Format | None:
        return with_markers(FORMAT, hints) if hints.parser == "mistral" else None

    def call_format(self, fmt: Format, template: str) -> CallFormat:
        if "[ARGS]" in template:
            return _HEADER
        return _LIST_UNSPACED if "[TOOL_CALLS][" in template else _LIST

    def parse(self, fmt: Format, marker: str, body: str, tools: list[dict]) -> list[Any]:
        if body.lstrip().startswith("["):
            return parse_json(body)
        return [_header(body)]

    def stream_start(self, marker: str, body: str) -> tuple[str, int] | None:
        # NAME[ARGS]{...}; a JSON list can hold several calls, and is sent whole.
        head, sep, _ = body.partition("[ARGS]")
        return (head, len(head) + len(sep)) if sep and re.fullmatch(r"[\w-]+", head) else None


def _header(body: str) -> dict:
    """NAME[ARGS]{...} or NAME[CALL_ID]ID[ARGS]{...}."""
    head, sep, arguments = body.partition("[ARGS]")
    if not sep:
        raise ValueError("no [ARGS] after the tool name")
    name = head.split("[", 1)[0].strip()
    return {"name": name, "arguments": repair.loads(arguments)}


FAMILY = Mistral()
