"""GLM-4.5/4.6/4.7 (mlx-lm's `glm47` parser): `<tool_call>NAME` then, per argument,
`<arg_key>KEY</arg_key><arg_value>VALUE</arg_value>`, then `</tool_call>`; 4.5 and 4.6
put each on its own line. VALUE is the raw text of a string-typed argument and JSON
otherwise, as their templates render it back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from .base import Family, Format, Hints, with_markers
from .grammar import CallFormat, ConstraintError, alternatives, argument, as_json, lark_string, parameters
from .mlx_parsers import parse_mlx
from .partial import Argument, Partial, certain


class GlmCall(CallFormat):
    """A GLM call, laid out as the template renders it: `newline` between the parts
    (GLM-4.5/4.6) or not (GLM-4.7). Parameters come in the schema's order, required
    ones always, optional ones possibly."""

    OPEN, CLOSE, KEY, KEY_END, VALUE, VALUE_END = "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>"

    trigger = OPEN

    def __init__(self, name: str, newline: str):
        self.name, self.newline = name, newline
        self.lead = newline

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        nl = f"{lark_string(self.newline)} " if self.newline else ""
        lines = [f"start: {nl}{marker(self.OPEN)} call {nl}{marker(self.CLOSE)}", alternatives(tools)]
        for i, (name, schema) in enumerate(tools):
            _check_name(name, "tool")
            items = []
            for j, (key, sub, required) in enumerate(parameters(name, schema)):
                _check_name(key, f"parameter of tool {name!r}:")
                rule = f"t{i}p{j}"
                items.append(rule if required else f"{rule}?")
                head = f"{nl}{marker(self.KEY)} {lark_string(key)} {marker(self.KEY_END)} {nl}{marker(self.VALUE)}"
                value, terminal = argument(sub, rule.upper(), _RAW, _raw_ok)
                lines.append(f"{rule}: {head} {value} {marker(self.VALUE_END)}")
                if terminal is not None:
                    lines.append(terminal)
            lines.append(f"tool{i}: {lark_string(name)} {' '.join(items)}")
        return "\n".join(lines)

    def render(self, name: str, arguments: dict) -> str:
        nl = self.newline
        pairs = "".join(
            f"{nl}{self.KEY}{k}{self.KEY_END}{nl}{self.VALUE}{v if isinstance(v, str) else as_json(v)}{self.VALUE_END}"
            for k, v in arguments.items()
        )
        return f"{nl}{self.OPEN}{name}{pairs}{nl}{self.CLOSE}"

    def parse(self, text: str) -> tuple[str, dict]:
        body = text.strip()
        if not (body.startswith(self.OPEN) and body.endswith(self.CLOSE)):
            raise ValueError("not a GLM tool call")
        call = parse_mlx("glm47", body[len(self.OPEN) : -len(self.CLOSE)], [])[0]
        return call["name"], call["arguments"]


# A string argument as raw text the parser gives back unchanged: it strips the value,
# and its end is `</arg_value>` (nor may the call's end be in it).
_RAW = r"/(?s:.*)/ & ~/(?s:.*<\/arg_value>.*)/ & ~/(?s:.*<\/tool_call>.*)/ & ~/(?s:\s.*)/ & ~/(?s:.*\s)/"


def _raw_ok(text: str) -> bool:
    return "</arg_value>" not in text and "</tool_call>" not in text and text == text.strip()


def _check_name(name: str, what: str) -> None:
    # The parser reads the name as the text before the first `<arg_key>`, stripped.
    if not name or name != name.strip() or "<" in name:
        raise ConstraintError(f"{what} name {name!r} cannot be written in a GLM call")


_LINES, _FLAT = GlmCall("glm", "\n"), GlmCall("glm_flat", "")


class Glm(Family):
    name = "glm"
    order = 10

    def detect(self, hints: Hints) -> Format | None:
        if hints.parser != "glm47":
            return None
        fmt = Format(name="glm47", family=self.name, call_start=("<tool_call>",), call_end="</tool_call>", json_body=False)
        return with_markers(fmt, hints)

    def call_format(self, fmt: Format, template: str) -> CallFormat:
        return _FLAT if "</arg_key><arg_value>" in template else _LINES

    def parse(self, fmt: Format, marker: str, body: str, tools: list[dict]) -> list[Any]:
        return parse_mlx("glm47", body, tools)

    def partial(self, body: str, done: bool) -> Partial | None:
        # As mlx-lm's parser reads it: the name is all before the first key; keys and
        # values are stripped.
        K, KE, V, VE = GlmCall.KEY, GlmCall.KEY_END, GlmCall.VALUE, GlmCall.VALUE_END
        first = body.find(K)
        if first < 0:
            return None
        arguments, pos = [], first
        while (k := body.find(K, pos)) >= 0 and (ke := body.find(KE, k)) >= 0:
            key = body[k + len(K) : ke].strip()
            v = body.find(V, ke)
            if v < 0:
                arguments.append(Argument(key, "", False))
                return Partial(body[:first].strip(), arguments, False)
            start = v + len(V)
            end = body.find(VE, start)
            if end < 0:
                arguments.append(Argument(key, certain(body[start:], VE).strip(), False))
                return Partial(body[:first].strip(), arguments, False)
            arguments.append(Argument(key, body[start:end].strip(), True))
            pos = end + len(VE)
        return Partial(body[:first].strip(), arguments, done)

    def value(self, name: str, key: str, raw: str, tools: list[dict]) -> Any:
        call = f"{name}{GlmCall.KEY}{key}{GlmCall.KEY_END}{GlmCall.VALUE}{raw}{GlmCall.VALUE_END}"
        return parse_mlx("glm47", call, tools)[0]["arguments"].get(key)


FAMILY = Glm()
