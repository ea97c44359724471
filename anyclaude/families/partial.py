"""XML-like calls read while they are written: their arguments as JSON, as far as it is
certain, so that they stream as `input_json_delta` pieces (Qwen3-Coder, GLM).

A family reads the body of a call being written into a `Partial` (`Family.partial`):
the tool's name, the arguments begun so far, each with its whole value or, while it is
being written, the part of it that is certain (never what may yet turn out to be the
value's end marker, or whitespace its parser strips). `ArgumentsJson` turns that into
JSON text that only ever grows: each value that is not a string is written once it is
whole, converted exactly as the family's parser converts it (`Family.value`).
"""

from __future__ import annotations

import json
from typing import Any, NamedTuple


class Argument(NamedTuple):
    key: str
    raw: str  # the value's text: all of it once `done`, else its certain part
    done: bool


class Partial(NamedTuple):
    name: str
    arguments: list[Argument]
    closed: bool  # no further argument can come


class ArgumentsJson:
    """The JSON of one call's arguments, as far as its `Partial` makes it certain."""

    def __init__(self, family: Any, name: str, tools: list[dict]):
        self._family, self._name, self._tools = family, name, tools
        self._strings: dict[str, bool] = {}
        self._whole: list[str] = []  # the JSON of each argument whole so far, converted once

    def text(self, partial: Partial) -> str:
        out = ["{"]
        for i, arg in enumerate(partial.arguments):
            out.append(f"{', ' if i else ''}{_dumps(arg.key)}: ")
            if arg.done:
                if i == len(self._whole):
                    self._whole.append(_dumps(self._family.value(self._name, arg.key, arg.raw, self._tools)))
                out.append(self._whole[i])
                continue
            # A string streams as it comes, from its first character that cannot be the
            # start of "null" (which a parser may read as no value at all).
            if self._is_string(arg.key) and not "null".startswith(arg.raw.lower()):
                out.append('"' + _dumps(arg.raw)[1:-1])
            return "".join(out)
        if partial.closed:
            out.append("}")
        return "".join(out)

    def _is_string(self, key: str) -> bool:
        # Whatever the parser's rules, a value it gives back as the very text written is
        # a string argument.
        if key not in self._strings:
            probe = self._family.value(self._name, key, "0", self._tools)
            self._strings[key] = probe == "0"
        return self._strings[key]


def certain(raw: str, end: str) -> str:
    """`raw`, the value written so far, without its longest ending that may be the start
    of its end marker `end`."""
    for n in range(min(len(raw), len(end)), 0, -1):
        if raw.endswith(end[:n]):
            return raw[: len(raw) - n]
    return raw


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)
