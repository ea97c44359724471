"""Llama 3.1-3.3: a custom tool's call is bare JSON, `{"name": .., "parameters": {..}}`,
at the start of the reply (or of the text after reasoning or a call), or after
`<|python_tag|>`; several calls may be separated by `;`. mlx-lm infers no parser for
these templates, so they are recognised here."""

from __future__ import annotations

from typing import Any

from .base import Family, Format, Hints, with_markers
from .grammar import JsonCall
from .hermes import json_start, parse_json

FORMAT = Format(name="llama3", family="llama3", call_start=("<|python_tag|>",), bare_json=True)
# Their templates render a custom tool's call back as bare JSON too (with no
# `<|python_tag|>`, which is for built-in tools).
CALLS = JsonCall("llama3", "", "", key="parameters")


class Llama3(Family):
    name = "llama3"
    order = 50

    def detect(self, hints: Hints) -> Format | None:
        if hints.parser is not None or not _is_llama3(hints.template):
            return None
        return with_markers(FORMAT, hints)

    def call_format(self, fmt: Format, template: str) -> JsonCall:
        return CALLS

    def parse(self, fmt: Format, marker: str, body: str, tools: list[dict]) -> list[Any]:
        return parse_json(body)

    def stream_start(self, marker: str, body: str) -> tuple[str, int] | None:
        return json_start(body, "parameters")


def _is_llama3(template: str) -> bool:
    if "<|python_tag|>" in template:
        return True
    return "<|start_header_id|>" in template and "tools" in template and '"parameters"' in template


FAMILY = Llama3()
