"""Repairs of the tool calls a model writes: JSON text, call shape, arguments by schema.

Repairs, applied only to what does not already parse and validate:
1. JSON text: code fences around it, single-quoted strings, trailing commas,
   Python literals (True/False/None), bare-word keys, raw control characters in
   strings, missing closing brackets/braces/quotes, extra closing ones at the end.
2. Call shape: arguments under `arguments`, `parameters`, `input` or `args`, or
   OpenAI's `{"function": {...}}` wrapper; arguments given as a JSON string are
   decoded (with the same repair); missing or null arguments are `{}`.
3. Against the tool's JSON Schema (jsonschema, Draft 2020-12), recursively
   through `properties` and `items`: a string where the schema admits only
   non-strings is read as integer / number / boolean / null / JSON object or
   array, and a lone string where only an array is admitted becomes a list of
   it; a number or boolean where only a string is admitted becomes its JSON
   text, and an object or array becomes indented JSON text (models write a JSON
   file's `content` as an object); keys absent from `properties` are dropped
   where `additionalProperties` is false.
"""

from __future__ import annotations

import json
from typing import Any

# -- lenient JSON --

_LITERALS = {"true": "true", "false": "false", "null": "null", "True": "true", "False": "false", "None": "null"}
_DECODER = json.JSONDecoder(strict=False)


def loads(text: str) -> Any:
    """JSON from model output, repaired where a small repair suffices."""
    text = _unfence(text.strip())
    try:
        return _DECODER.decode(text)
    except ValueError as e:
        error = e
    fixed = _repair(text)
    try:
        value, end = _DECODER.raw_decode(fixed)
    except ValueError:
        raise error from None
    if fixed[end:].strip(" \t\r\n}]"):
        raise error
    return value


def _unfence(text: str) -> str:
    if text.startswith("```"):
        text = text.split("\n", 1)[1] if "\n" in text else ""
        text = text.rstrip().removesuffix("```").rstrip()
    return text


def _repair(text: str) -> str:
    out: list[str] = []
    closers: list[str] = []
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c in "\"'":
            string, i = _string(text, i)
            out.append(string)
            continue
        if c.isalpha() or c == "_":
            j = i
            while j < n and (text[j].isalnum() or text[j] == "_"):
                j += 1
            word = text[i:j]
            out.append(_LITERALS.get(word) or json.dumps(word))  # a bare key becomes a string
            i = j
            continue
        if c.isdigit() or c == "-":
            j = i + 1
            while j < n and (text[j].isdigit() or text[j] in ".eE+-"):
                j += 1
            out.append(text[i:j])
            i = j
            continue
        if c in "{[":
            closers.append("}" if c == "{" else "]")
        elif c in "}]":
            _drop_trailing_comma(out)
            if closers:
                c = closers.pop()
        out.append(c)
        i += 1
    _drop_trailing_comma(out)
    out.extend(reversed(closers))
    return "".join(out)


def _string(text: str, i: int) -> tuple[str, int]:
    """The string starting at text[i] as a double-quoted JSON string, closed if cut."""
    quote, j, parts = text[i], i + 1, ['"']
    while j < len(text):
        c = text[j]
        if c == "\\" and j + 1 < len(text):
            parts.append("'" if text[j + 1] == "'" else text[j : j + 2])
            j += 2
            continue
        if c == quote:
            j += 1
            break
        parts.append('\\"' if c == '"' else c)
        j += 1
    parts.append('"')
    return "".join(parts), j


def _drop_trailing_comma(out: list[str]) -> None:
    while out and out[-1].isspace():
        out.pop()
    if out and out[-1] == ",":
        out.pop()


def closing(prefix: str) -> str:
    """What makes `prefix`, the start of a JSON value as a grammar lets a model write
    it, one whole value: a call cut short whose start has gone out must still be
    valid JSON. Open strings and containers are closed, a key left without a value
    gets null, and a number or literal cut short is completed."""
    stack: list[str] = []  # per open container: "{" or "["
    expect = "value"  # value, key, colon, comma (after a value), or key_or_end / value_or_end
    word, quote, escape, unicode, is_key = "", False, False, -1, False
    for c in prefix:
        if quote:
            if unicode >= 0:
                unicode = unicode + 1 if unicode < 3 else -1
            elif escape:
                escape, unicode = False, 0 if c == "u" else -1
            elif c == "\\":
                escape = True
            elif c == '"':
                quote = False
                expect = "colon" if is_key else "comma"
            continue
        if c.isspace():
            if word:
                word, expect = "", "comma"
            continue
        if c == '"':
            quote, is_key = True, expect in ("key", "key_or_end")
        elif c in "{[":
            stack.append(c)
            expect = "key_or_end" if c == "{" else "value_or_end"
        elif c in "}]":
            stack.pop()
            word, expect = "", "comma"
        elif c == ",":
            word = ""
            expect = "key" if stack and stack[-1] == "{" else "value"
        elif c == ":":
            expect = "value"
        else:
            word += c
    out = []
    if quote:
        out.append(("\\" if escape else "") + "0" * (4 - unicode if unicode >= 0 else 0) + '"')
        expect = "colon" if is_key else "comma"
    elif word:
        out.append(next((w[len(word) :] for w in ("true", "false", "null") if w.startswith(word)), "0" if word[-1] in "-+.eE" else ""))
        expect = "comma"
    if expect == "key":
        out.append('"": null')
    elif expect == "colon":
        out.append(": null")
    elif expect == "value" and (stack or not prefix.strip()):
        out.append("null")
    out.extend("}" if c == "{" else "]" for c in reversed(stack))
    return "".join(out)


# -- call shapes --


def call_shape(call: Any) -> tuple[str, Any]:
    """(name, arguments) of one parsed call, whatever key holds the arguments."""
    if not isinstance(call, dict):
        raise ValueError("a call is not a JSON object")
    if isinstance(call.get("function"), dict):
        call = call["function"]
    name = call.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("a call without a tool name")
    arguments: Any = {}
    for key in ("arguments", "parameters", "input", "args"):
        if key in call:
            arguments = call[key]
            break
    if arguments is None:
        arguments = {}
    if isinstance(arguments, str):
        arguments = loads(arguments) if arguments.strip() else {}
    return name, arguments


# -- schema-driven repair --


def coerce(value: Any, schema: Any) -> Any:
    """`value` with the mistakes listed in the module docstring fixed, by `schema`."""
    if not isinstance(schema, dict):
        return value
    types = _types(schema)
    if types and "string" not in types and isinstance(value, str):
        value = _from_string(value, types)
        if types == {"array"} and isinstance(value, str):
            value = [value]  # a lone item where a list is asked; the items schema decides
    elif types == {"string"} and not isinstance(value, str) and value is not None:
        value = _to_string(value)
    if isinstance(value, dict):
        return _coerce_object(value, schema)
    if isinstance(value, list) and isinstance(schema.get("items"), dict):
        return [coerce(v, schema["items"]) for v in value]
    return value


def _coerce_object(value: dict, schema: dict) -> dict:
    properties = schema.get("properties")
    properties = properties if isinstance(properties, dict) else {}
    closed = schema.get("additionalProperties") is False and not schema.get("patternProperties")
    return {
        key: coerce(item, properties.get(key))
        for key, item in value.items()
        if key in properties or not closed
    }


def _types(schema: dict) -> set[str]:
    """The JSON types a schema admits; empty when it admits any."""
    declared = schema.get("type")
    types = {declared} if isinstance(declared, str) else set(declared) if isinstance(declared, list) else set()
    for key in ("anyOf", "oneOf"):
        branches = schema.get(key)
        if not isinstance(branches, list):
            continue
        for branch in branches:
            branch_types = _types(branch) if isinstance(branch, dict) else set()
            if not branch_types:
                return set()  # an untyped branch admits anything
            types |= branch_types
    if "const" in schema:
        types.add(_json_type(schema["const"]))
    if isinstance(schema.get("enum"), list):
        types |= {_json_type(v) for v in schema["enum"]}
    return types


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    return "array" if isinstance(value, list) else "object"


def _from_string(text: str, types: set[str]) -> Any:
    s = text.strip()
    if "null" in types and s in ("null", "None"):
        return None
    if "boolean" in types and s.lower() in ("true", "false"):
        return s.lower() == "true"
    if types & {"integer", "number"} and (number := _number(s, integer="integer" in types)) is not None:
        return number
    if types & {"object", "array"} and s[:1] in ("{", "["):
        try:
            parsed = loads(s)
        except ValueError:
            return text
        if _json_type(parsed) in types:
            return parsed
    return text


def _number(s: str, *, integer: bool) -> int | float | None:
    try:
        return int(s)  # exactly, even past 2**53
    except ValueError:
        pass
    try:
        number = float(s)
    except ValueError:
        return None
    if number != number or abs(number) == float("inf"):
        return None
    return int(number) if integer and number.is_integer() else number


def _to_string(value: Any) -> str:
    if isinstance(value, (dict, list)):
        return json.dumps(value, ensure_ascii=False, indent=2)
    return json.dumps(value, ensure_ascii=False)
