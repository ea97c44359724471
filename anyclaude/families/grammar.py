"""The parts forced-call grammars are made of, shared by the family modules.

A family's calls are a `CallFormat`: a Lark grammar (llguidance's dialect, each tool's
JSON Schema inlined with `%json`) for exactly one call, and the canonical text of a call,
which is what that grammar produces and what the family's template renders back next turn.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any


class ConstraintError(Exception):
    """Tools that cannot be forced (unknown name, a schema no grammar can express), or a
    generation that left the grammar."""


class CallFormat:
    """How a model writes one tool call: as a Lark grammar, and as text.

    `trigger` is the marker the model opens a call with, which the grammar starts with
    (after the fixed text `lead`): seeing it in an unforced answer, the daemon holds the
    rest of the call to the grammar (`constrain.lazy_calls`). None: calls that open
    with no marker of their own (or several possible ones) are not constrained unforced."""

    name = ""
    trigger: str | None = None
    lead = ""

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        """A Lark grammar (llguidance dialect) for exactly one call to one of `tools`.

        `tools` are (name, prepared JSON Schema) pairs; `marker(text)` gives the grammar
        item for a fixed marker such as `<tool_call>` (a token reference when the model
        has it as a special token, else a string literal)."""
        raise NotImplementedError

    def render(self, name: str, arguments: dict) -> str:
        """The canonical text of a call: what the grammar produces for these arguments."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, dict]:
        """The (name, arguments) of one call written in this format."""
        raise NotImplementedError


class JsonCall(CallFormat):
    """A call as one JSON object, `{"name": NAME, KEY: {...}}`, between fixed texts.

    `opening` and `closing` may hold markers (`markers`), which the grammar writes as
    the model's special token where it has one."""

    def __init__(self, name: str, opening: str, closing: str, *, key: str = "arguments", markers: tuple[str, ...] = (), trigger: str | None = None):
        self.name, self.opening, self.closing, self.key, self.markers = name, opening, closing, key, markers
        self.trigger = trigger

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        opening = pieces(self.opening + "{", self.markers, marker)
        closing = pieces("}" + self.closing, self.markers, marker)
        lines = [f"start: {opening} call {closing}", alternatives(tools)]
        for i, (name, schema) in enumerate(tools):
            head = f'"name": {json.dumps(name, ensure_ascii=False)}, "{self.key}": '
            lines.append(f"tool{i}: {lark_string(head)} {json_value(schema)}")
        return "\n".join(lines)

    def render(self, name: str, arguments: dict) -> str:
        call = json.dumps({"name": name, self.key: arguments}, ensure_ascii=False)
        return f"{self.opening}{call}{self.closing}"

    def parse(self, text: str) -> tuple[str, dict]:
        if not (text.startswith(self.opening) and text.endswith(self.closing)):
            raise ValueError(f"not a {self.name} tool call")
        call = json.loads(text[len(self.opening) : len(text) - len(self.closing)])
        return call["name"], call[self.key]


def alternatives(tools: list[tuple[str, dict]]) -> str:
    """The rule `call`: one of the rules tool0, tool1, ..."""
    return "call: " + " | ".join(f"tool{i}" for i in range(len(tools)))


def json_value(schema: dict) -> str:
    return f"%json {json.dumps(schema, ensure_ascii=False)}"


def pieces(text: str, markers: tuple[str, ...], marker: Callable[[str], str]) -> str:
    """`text` as grammar items: each marker through `marker`, the rest as literals."""
    if not markers:
        return lark_string(text)
    parts = re.split("(" + "|".join(re.escape(m) for m in markers) + ")", text)
    return " ".join(marker(p) if p in markers else lark_string(p) for p in parts if p)


def lark_string(text: str) -> str:
    # A JSON string literal is a valid llguidance Lark string literal.
    return json.dumps(text, ensure_ascii=False)


def as_json(value: Any) -> str:
    """A value as the templates' `tojson` and the grammars write it."""
    return json.dumps(value, ensure_ascii=False)


def parameters(name: str, schema: dict) -> list[tuple[str, dict, bool]]:
    """(key, schema, required) for each parameter of an object schema, in order, for
    the families that write each argument on its own (XML-like calls).

    Each sub-schema carries the tool's `$defs`/`definitions` (so `$ref`s resolve) and
    its `x-guidance` layout. Keys only in `required` come after, with any value."""
    if schema.get("type") not in ("object", None) or any(k in schema for k in ("anyOf", "oneOf", "allOf", "$ref")):
        raise ConstraintError(f"the input_schema of tool {name!r} is not a plain object schema")
    shared = {k: schema[k] for k in ("$defs", "definitions", "x-guidance") if k in schema}
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = [k for k in schema.get("required") or [] if isinstance(k, str)]
    out = []
    for key in [*properties, *(k for k in required if k not in properties)]:
        sub = properties.get(key, {})
        sub = {"not": {}} if sub is False else {} if sub is True else sub
        out.append((key, shared | sub, key in required))
    return out


def is_string(schema: dict) -> bool:
    return schema.get("type") == "string"


def string_literals(schema: Any) -> list[str] | None:
    """The strings a schema allows if it is a finite set of strings (const, enum, or
    anyOf/oneOf of those), else None."""
    if not isinstance(schema, dict) or schema.get("type", "string") != "string":
        return None
    if "const" in schema:
        return [schema["const"]] if isinstance(schema["const"], str) else None
    if isinstance(schema.get("enum"), list):
        return schema["enum"] if all(isinstance(v, str) for v in schema["enum"]) else None
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            parts = [string_literals(branch) for branch in schema[key]]
            if any(p is None for p in parts):
                return None
            return list(dict.fromkeys(s for p in parts for s in p))
    return None


def argument(schema: dict, rule: str, raw: str, raw_ok: Callable[[str], bool], end: str = "") -> tuple[str, str | None]:
    """One argument of an XML-like call (each argument on its own, as Qwen3-Coder and GLM
    write them): the grammar item for its value, and the terminal it needs, if any.

    A string-typed value is raw text, the terminal `rule`: what `raw` (a Lark regex
    expression) allows, at least `minLength` long; a finite set of strings is those that
    `raw_ok` accepts; anything else is JSON. `end` follows the value, whichever it is."""
    tail = f" {lark_string(end)}" if end else ""
    literals = string_literals(schema)
    if literals is not None:
        allowed = [s for s in literals if raw_ok(s)]
        if not allowed:
            return '%json {"not": {}}', None  # nothing can be written
        return "(" + " | ".join(lark_string(s + end) for s in allowed) + ")", None
    if is_string(schema):
        return rule, f"{rule}: ({raw}{_min_length(schema)}){tail}"
    return json_value(schema) + tail, None


def _min_length(schema: dict) -> str:
    """A Lark regex intersection for a string's `minLength` ("" if none that matters)."""
    least = schema.get("minLength")
    return f" & /(?s:.{{{least},}})/" if isinstance(least, int) and 0 < least <= 64 else ""
