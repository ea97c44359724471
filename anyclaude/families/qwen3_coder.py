"""Qwen3-Coder and Qwen3.5/3.6: XML calls, read by mlx-lm's `qwen3_coder` parser."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from .base import Family, Format, Hints, with_markers
from .grammar import CallFormat, ConstraintError, alternatives, argument, lark_string, parameters
from .mlx_parsers import parse_mlx
from .partial import Argument, Partial, certain


class Qwen3CoderCall(CallFormat):
    """Qwen3-Coder's XML call, as its chat template renders one back::

        <tool_call>
        <function=NAME>
        <parameter=KEY>
        VALUE
        </parameter>
        </function>
        </tool_call>

    Parameters come in the schema's `properties` order, required ones always, optional
    ones possibly. VALUE is the raw text for string-typed properties and `json.dumps`
    JSON (per the property's schema) otherwise, which is what mlx-lm's qwen3_coder
    parser converts back by the property's declared type.
    """

    name = "qwen3_coder"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    trigger = OPEN
    _END = "\n</parameter>\n"

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        opening, closing, newline = marker(self.OPEN), marker(self.CLOSE), lark_string("\n")
        lines = [f"start: {opening} {newline} call {closing}", alternatives(tools)]
        for i, (name, schema) in enumerate(tools):
            _check_xml_name(name, "tool")
            items = []
            for j, (key, sub, required) in enumerate(parameters(name, schema)):
                _check_xml_name(key, f"parameter of tool {name!r}:")
                rule = f"t{i}p{j}"
                items.append(rule if required else f"{rule}?")
                value, terminal = argument(sub, rule.upper(), _RAW, _raw_ok, self._END)
                opener = lark_string(f"<parameter={key}>\n")
                lines.append(f"{rule}: {opener} {value}")
                if terminal is not None:
                    lines.append(terminal)
            head, tail = lark_string(f"<function={name}>\n"), lark_string("</function>\n")
            lines.append(f"tool{i}: {head} {' '.join(items)} {tail}")
        return "\n".join(lines)

    def render(self, name: str, arguments: dict) -> str:
        params = "".join(
            f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}\n</parameter>\n"
            for k, v in arguments.items()
        )
        return f"{self.OPEN}\n<function={name}>\n{params}</function>\n{self.CLOSE}"

    def parse(self, text: str, tools: list[dict] | None = None) -> tuple[str, dict]:
        """The call as mlx-lm's qwen3_coder parser reads it; `tools` (OpenAI-style) give
        the property types it converts values by (without them every value is text)."""
        from mlx_lm.tool_parsers import qwen3_coder

        body = text.strip()
        if not (body.startswith(self.OPEN) and body.endswith(self.CLOSE)):
            raise ValueError("not a Qwen3-Coder tool call")
        call = qwen3_coder.parse_tool_call(body[len(self.OPEN) : -len(self.CLOSE)].strip(), tools)
        return call["name"], call["arguments"]


def _check_xml_name(name: str, what: str) -> None:
    # The parser reads a name as the run of characters up to whitespace, `<` or `>`.
    if not name or any(c.isspace() or c in "<>" for c in name):
        raise ConstraintError(f"{what} name {name!r} cannot be written in a Qwen3-Coder call")


# A string argument as raw text the parser gives back unchanged: no `</parameter>` (its
# end), no `</tool_call>` (the call's end), and not "null" in any case (read as None).
_RAW = r"/(?s:.*)/ & ~/(?s:.*<\/parameter>.*)/ & ~/(?s:.*<\/tool_call>.*)/ & ~/(?i:null)/"


def _raw_ok(text: str) -> bool:
    return "</parameter>" not in text and "</tool_call>" not in text and text.lower() != "null"


CALLS = Qwen3CoderCall()


class Qwen3Coder(Family):
    name = "qwen3_coder"
    order = 10

    def detect(self, hints: Hints) -> Format | None:
        if hints.parser != "qwen3_coder":
            return None
        fmt = Format(name="qwen3_coder", family="qwen3_coder", call_start=(hints.tool_call_start or "<tool_call>",), call_end=hints.tool_call_end or "</tool_call>", json_body=False)
        return with_markers(fmt, hints)

    def call_format(self, fmt: Format, template: str) -> CallFormat:
        return CALLS

    def parse(self, fmt: Format, marker: str, body: str, tools: list[dict]) -> list[Any]:
        return parse_mlx("qwen3_coder", body, tools)

    def partial(self, body: str, done: bool) -> Partial | None:
        # As mlx-lm's parser reads it: a name up to whitespace, `<` or `>`; a value
        # between `<parameter=KEY>` and `</parameter>`, less one newline at either end.
        found = _FUNCTION.match(body)
        if found is None:
            return None
        arguments, pos = [], found.end()
        while (key := _PARAMETER.search(body, pos)) is not None:
            start = key.end() + body.startswith("\n", key.end())
            end = body.find(_VALUE_END, start)
            if end < 0:
                arguments.append(Argument(key.group(1), certain(body[start:], "\n" + _VALUE_END), False))
                return Partial(found.group(1), arguments, False)
            raw = body[start:end]
            arguments.append(Argument(key.group(1), raw[:-1] if raw.endswith("\n") else raw, True))
            pos = end + len(_VALUE_END)
        return Partial(found.group(1), arguments, done or "</function>" in body[pos:])

    def value(self, name: str, key: str, raw: str, tools: list[dict]) -> Any:
        call = f"<function={name}>\n<parameter={key}>\n{raw}\n{_VALUE_END}\n</function>"
        return parse_mlx("qwen3_coder", call, tools)[0]["arguments"].get(key)

    def inputs(self, messages: list[dict], tools: list[dict]) -> tuple[list[dict], list[dict] | None]:
        return json_values(messages), tools or None


_FUNCTION = re.compile(r"\s*<function=([^\s<>]+)>")
_PARAMETER = re.compile(r"<parameter=([^\s<>]+)>")
_VALUE_END = "</parameter>"


def json_values(messages: list[dict]) -> list[dict]:
    """Qwen3-Coder's (and Qwen3.5's) template prints a non-container argument with
    `| string`, so a boolean comes out as Python's `True` and null as `None`, where the
    model (and the forced-call grammar) wrote `true` and `null`: the history would part
    from the generated tokens at the first such argument. Every non-string value goes to
    the template already written as JSON, the way the model writes it (containers too:
    the template's `tojson` gives the same text, and then no template variant can differ)."""
    out = []
    for m in messages:
        if calls := m.get("tool_calls"):
            m = m | {"tool_calls": [_json_call(c) for c in calls]}
        out.append(m)
    return out


def _json_call(call: dict) -> dict:
    function = call["function"]
    arguments = function["arguments"]
    if not isinstance(arguments, dict):
        return call
    written = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in arguments.items()}
    return call | {"function": function | {"arguments": written}}


FAMILY = Qwen3Coder()
