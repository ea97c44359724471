"""Generated text -> visible text, reasoning and tool calls, piece by piece.

The model's output arrives as the pieces an incremental detokenizer gives, and a
`Parser` cuts it into segments by the markers of the model family (`Format`):
`Text`, `Thinking`, a complete and validated `ToolCall`, or a `BadCall` that the
daemon shows as text and logs as `tool_parse_error`. With `stream_calls`, a call's
`CallStart` and its arguments' `CallDelta`s come before its `ToolCall` (an XML-like
call's arguments converted to JSON as they come, `families.partial`); a streamed call
that ends any other way (cut short, or made a `BadCall`) first gets the `CallDelta`
that closes what was sent into one JSON value.

Each family's markers are a `families.Format`, and its module in `anyclaude.families`
reads a call's body (`Family.parse`) and, for formats whose messages open with headers
(gpt-oss's harmony), what a header opens (`Family.route`).

Segment rules. Text and reasoning are emitted as soon as they cannot be the
start of a marker. Each run of text or reasoning (between the start, markers and
calls) is stripped at both ends, so no segment is empty or whitespace-only and
whitespace between calls is dropped; but the reply's own leading and trailing
whitespace is kept, as generated, for the next turn's prompt (the leading only
when text follows it, not a marker or a call). Whitespace inside a run is held
only until its next visible character. A stray end-of-thinking marker in text,
a repeated start marker in reasoning, and mlx-lm's structural markers are
dropped. A call start marker inside reasoning ends the reasoning, as in mlx-lm.
Llama's marker-less calls are recognised only when the request has tools. In
JSON bodies a marker inside a JSON string (a file's content mentioning
`</tool_call>`) does not end the call, and a new call's start marker ends a call
whose end marker was forgotten.

Arguments are validated against the tool's JSON Schema (jsonschema, Draft 2020-12),
after `repair` where they fail. `format` is an annotation under Draft 2020-12 and is
not asserted (Claude Code checks its own inputs and tells the model). A schema
jsonschema cannot use (invalid, or an unresolvable `$ref`) only requires an object.

What becomes a `BadCall` (raw = the exact generated text, markers included):
an unknown tool, a body that cannot be parsed, arguments that are not an object
or still fail validation after repair, and, from `finish()`, a call whose end
never came (`reason="truncated"`); for an mlx-lm parser that has no end marker
the call runs to the end of generation and `finish()` parses it. When one body
holds several calls (a Mistral list) and only some fail, the good ones are
`ToolCall`s and one `BadCall` carries the whole body.
"""

from __future__ import annotations

import functools
import json
from typing import Any

from jsonschema import Draft202012Validator
from jsonschema.exceptions import SchemaError, best_match
from msgspec import Struct
from referencing.exceptions import Unresolvable

from . import families, repair
from .families.base import Format
from .families.partial import ArgumentsJson


class Text(Struct):
    """A piece of visible text (never empty)."""

    text: str


class Thinking(Struct):
    """A piece of reasoning (never empty)."""

    text: str


class ToolCall(Struct):
    """One complete call; its arguments are valid for the tool's schema."""

    name: str
    arguments: dict[str, Any]


class CallStart(Struct):
    """A call whose arguments follow as `CallDelta`s (streamed calls only)."""

    name: str


class CallDelta(Struct):
    """The next piece of a streamed call's arguments, as JSON text."""

    json: str


class BadCall(Struct):
    """A call that could not be made valid: its generated text, and why (for the log)."""

    raw: str
    reason: str


Segment = Text | Thinking | ToolCall | BadCall | CallStart | CallDelta


_TEXT, _THINK, _CALL, _HEAD = "text", "think", "call", "head"


class Parser:
    """Cuts one response's generated text into segments, incrementally."""

    def __init__(self, fmt: Format, tools: list[dict] | None, *, thinking: bool = False, stream_calls: bool = False):
        self.fmt = fmt
        self._family = families.of(fmt)
        # Send a call's arguments as they come: only where they are certain to end up
        # valid (a grammar holds the call), since what was sent cannot be taken back.
        self._stream_calls = stream_calls
        self._args: _Scan | None = None  # the streamed call's arguments, read so far
        self._sent = 0  # how much of the body has gone out as CallDelta
        self._from = 0  # where in the body the streamed arguments start
        self._xml: ArgumentsJson | None = None  # a streamed XML-like call's arguments
        self._sent_json = ""  # what of them has gone out
        self._tool_list = list(tools or [])
        self._tools = {f["name"]: f for f in map(_function, self._tool_list) if f}
        # Without tools a reply that is JSON is an answer, not a Llama call.
        self._bare = fmt.bare_json and bool(self._tools)
        # The markers that end a text or reasoning run, and the state after each;
        # a marker that keeps the state is dropped from the run.
        calls = [(m, _CALL) for m in fmt.call_start] + [(m, _HEAD) for m in fmt.headers]
        text_drops = [(m, _TEXT) for m in fmt.drop]
        think_drops = [(m, _THINK) for m in fmt.drop]
        self._moves = {
            _TEXT: _markers((fmt.think_start, _THINK), (fmt.think_end, _TEXT), *text_drops, *calls),
            _THINK: _markers((fmt.think_end, _TEXT), (fmt.think_start, _THINK), *think_drops, *calls),
        }
        self._state = _THINK if thinking else _TEXT
        self._header_rest = fmt.header_rest  # until the reply shows it is not that
        self._buf = ""
        self._started = False  # the current run has shown a visible character
        self._ws = ""  # whitespace held at the end of the current run
        # The first run of a reply that starts as text: its leading whitespace is the
        # reply's own, not the template's around a marker, so it is held, not dropped.
        self._lead = not thinking
        self._after_call = False
        self._marker = ""
        self._body = ""
        self._searched = 0
        self._scan: _Scan | None = None

    @property
    def in_call(self) -> bool:
        """Inside a call whose end has not been generated yet."""
        return self._state == _CALL

    def feed(self, text: str) -> list[Segment]:
        """The segments that are certain once `text` is added."""
        self._buf += text
        out: list[Segment] = []
        while self._step(out, final=False):
            pass
        return out

    def finish(self) -> list[Segment]:
        """Generation ended: the rest, with an unterminated call as BadCall("truncated")."""
        out: list[Segment] = []
        while self._step(out, final=True):
            pass
        if self._state == _TEXT and self._started and self._ws:
            # The reply's own trailing whitespace stays: it is part of what the model
            # generated, and the next turn's prompt must render it back (prefix cache).
            out.append(Text(self._ws))
            self._ws = ""
        if self._state == _CALL:
            raw = self._marker + self._body
            if not self.fmt.call_end and not self.fmt.json_body:
                out.extend(self._calls(raw, self._body))
            else:
                if self.streaming:
                    # Its start went out: its input must still be one JSON value.
                    out.append(CallDelta(repair.closing(self._streamed())))
                out.append(BadCall(raw=raw, reason="truncated"))
            self._state, self._body = _TEXT, ""
        return out

    @property
    def streaming(self) -> bool:
        """Inside a call whose start has gone out as a CallStart."""
        return self._state == _CALL and (self._args is not None or self._xml is not None)

    # -- text and reasoning --

    def _step(self, out: list[Segment], final: bool) -> bool:
        if self._state == _CALL:
            return self._call_step(out)
        if self._state == _HEAD:
            return self._head_step(final)
        if self._header_rest and self._state == _TEXT:
            rest, buf = self._header_rest, self._buf
            if buf.startswith(rest):
                self._header_rest, self._state, self._marker = "", _HEAD, self.fmt.headers[0]
                return True
            if rest.startswith(buf) and not final:
                return False  # may be it: wait
            self._header_rest = ""
        if self._state == _TEXT and not self._started and self._run_starts_call():
            return True
        kind = Text if self._state == _TEXT else Thinking
        buf = self._buf
        found = None
        for marker, state in self._moves[self._state]:
            i = buf.find(marker)
            if i >= 0 and (found is None or i < found[0] or (i == found[0] and len(marker) > len(found[1]))):
                found = (i, marker, state)
        if found is None:
            keep = 0 if final else _partial(buf, [m for m, _ in self._moves[self._state]])
            self._show(kind, buf[: len(buf) - keep], out)
            self._buf = buf[len(buf) - keep :]
            return False
        i, marker, state = found
        self._show(kind, buf[:i], out)
        self._buf = buf[i + len(marker) :]
        if state != self._state:  # a dropped marker leaves the run going
            self._new_run(after_call=False)
        if state == _CALL:
            self._open(marker)
        elif state == _HEAD:
            self._marker = marker
        self._state = state
        return True

    def _head_step(self, final: bool) -> bool:
        """A message header (harmony): read to its end, then go where it says."""
        i = self._buf.find(self.fmt.header_end)
        if i < 0:
            if final:  # a header cut off by the end of generation says nothing
                self._buf, self._state = "", _TEXT
            return False
        header = self._marker + self._buf[:i]
        self._buf = self._buf[i + len(self.fmt.header_end) :]
        route, opening = self._family.route(header)
        if route == "call":
            self._open(opening + self.fmt.header_end)
        else:
            self._state = _THINK if route == "think" else _TEXT
        return True

    def _run_starts_call(self) -> bool:
        """For Llama, "{" at the start of a run (after whitespace) opens a call."""
        if not self._bare:
            return False
        buf = self._buf.lstrip()
        if self._after_call:
            self._buf = buf = buf.lstrip(";").lstrip()  # the separator between Llama calls
        if not buf.startswith("{"):
            return False
        self._buf = buf
        self._new_run(after_call=False)  # whitespace before a call is not the reply's
        self._open("")
        return True

    def _show(self, kind: type, text: str, out: list[Segment]) -> None:
        if not self._started:
            body = text.lstrip()
            if self._lead:
                self._ws += text[: len(text) - len(body)]
            text = body
            if not text:
                return
            self._started = True
        body = text.rstrip()
        if body:
            out.append(kind(self._ws + body))
            self._ws = text[len(body) :]
        else:
            self._ws += text

    def _new_run(self, *, after_call: bool) -> None:
        self._started, self._ws, self._after_call, self._lead = False, "", after_call, False

    # -- calls --

    def _open(self, marker: str) -> None:
        self._state, self._marker, self._body, self._searched = _CALL, marker, "", 0
        self._args, self._xml, self._sent_json = None, None, ""
        self._scan = _Scan() if self.fmt.json_body else None

    def _call_step(self, out: list[Segment]) -> bool:
        self._body += self._buf
        self._buf = ""
        if self._stream_calls and self.fmt.json_body:
            out.extend(self._stream())
        end = self._find_end()
        if self._stream_calls and not self.fmt.json_body:
            out.extend(self._stream_xml(self._body if end is None else self._body[: end[0]], done=end is not None))
        if end is None:
            return False
        stop, resume = end
        calls = self._calls(self._marker + self._body[:resume], self._body[:stop])
        if self.streaming and not (len(calls) == 1 and isinstance(calls[0], ToolCall)) and (rest := repair.closing(self._streamed())):
            out.append(CallDelta(rest))  # what went out must still be one JSON value
        out.extend(calls)
        self._buf = self._body[resume:]
        self._state, self._body = _TEXT, ""
        self._new_run(after_call=True)
        return True

    def _stream(self) -> list[Segment]:
        """The start and the new part of a call's arguments, once its name is known."""
        out: list[Segment] = []
        if self._args is None:
            if (found := self._family.stream_start(self._marker, self._body)) is None:
                return out
            name, start = found
            self._args, self._sent, self._from = _Scan(), start, start
            self._args.pos = start
            out.append(CallStart(name))
        args = self._args
        if not args.done:
            if not args.begun:
                args.begun = self._body[args.pos : args.pos + 1] in ("{", "[")
            if args.begun and args.value(self._body) is not None:
                args.done = True
        if args.pos > self._sent:
            out.append(CallDelta(self._body[self._sent : args.pos]))
            self._sent = args.pos
        return out

    def _stream_xml(self, body: str, done: bool) -> list[Segment]:
        """The start and the new part of an XML-like call's arguments, as JSON."""
        partial = self._family.partial(body, done)
        if partial is None:
            return []
        out: list[Segment] = []
        if self._xml is None:
            if partial.name not in self._tools:
                return []  # not a call the grammar holds: it comes whole
            self._xml = ArgumentsJson(self._family, partial.name, self._tool_list)
            out.append(CallStart(partial.name))
        text = self._xml.text(partial)
        if text.startswith(self._sent_json) and len(text) > len(self._sent_json):
            out.append(CallDelta(text[len(self._sent_json) :]))
            self._sent_json = text
        return out

    def _streamed(self) -> str:
        """What of the open call's arguments has gone out."""
        return self._sent_json if self._xml is not None else self._body[self._from : self._sent]

    def _find_end(self) -> tuple[int, int] | None:
        """Where the call's body stops and the text after it resumes."""
        body, end = self._body, self.fmt.call_end
        if self._scan is None:
            # An mlx-lm body: up to its end marker, or to the end of generation.
            i = body.find(end, self._searched) if end else -1
            if i < 0:
                self._searched = max(0, len(body) - len(end) + 1)
                return None
            return i, i + len(end)
        if end:
            # A new call's start marker also ends a call whose end was forgotten.
            found = self._scan.marker(body, [end, *self.fmt.call_start])
            if found is None:
                return None
            i, marker = found
            return (i, i + len(end)) if marker == end else (i, i)
        if not self._scan.begun and not self._scan.begin(body):
            return None
        i = self._scan.value(body)
        return None if i is None else (i, i)

    def _calls(self, raw: str, body: str) -> list[Segment]:
        try:
            calls = [repair.call_shape(c) for c in self._parse(body)]
        except ValueError as e:
            return [BadCall(raw=raw, reason=_short(f"unparseable call: {e}"))]
        out: list[Segment] = []
        reasons = []
        for name, arguments in calls:
            checked = self._check(name, arguments)
            if isinstance(checked, ToolCall):
                out.append(checked)
            else:
                reasons.append(checked)
        if reasons:
            out.append(BadCall(raw=raw, reason=_short("; ".join(reasons))))
        return out

    def _parse(self, body: str) -> list[Any]:
        return self._family.parse(self.fmt, self._marker, body, self._tool_list)

    def _check(self, name: str, arguments: Any) -> ToolCall | str:
        return check_call(self._tools, name, arguments)


def functions(tools: list[dict] | None) -> dict[str, dict]:
    """OpenAI-style tools by name, as `check_call` takes them."""
    return {f["name"]: f for f in map(_function, list(tools or [])) if f}


def check_call(tools: dict[str, dict], name: str, arguments: Any) -> ToolCall | str:
    """A call made valid for its tool's schema (repaired where that suffices), or why it cannot be."""
    function = tools.get(name)
    if function is None:
        return f"unknown tool {name!r}"
    if not isinstance(arguments, dict):
        return f"{name}: arguments are not a JSON object"
    schema = function.get("parameters") or {}
    validator = _validator(json.dumps(schema, sort_keys=True))
    try:
        if validator.is_valid(arguments):
            return ToolCall(name=name, arguments=arguments)
        fixed = repair.coerce(arguments, schema)
        if validator.is_valid(fixed):
            return ToolCall(name=name, arguments=fixed)
        error = best_match(validator.iter_errors(fixed))
    except Unresolvable:
        # A $ref that leads nowhere (remote ones are never fetched): an
        # object is all that can be asked.
        return ToolCall(name=name, arguments=arguments)
    where = "/".join(str(p) for p in error.absolute_path) or "arguments"
    return f"{name}: invalid {where}: {error.message}"


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str) -> Draft202012Validator:
    # Checking a schema costs milliseconds, and the same tools come with every
    # request of a session, so validators are kept by schema text.
    schema = json.loads(schema_json)
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError:
        schema = {"type": "object"}
    return Draft202012Validator(schema)


def _function(tool: Any) -> dict | None:
    """The function of an OpenAI-style tool (a bare function is accepted too)."""
    if not isinstance(tool, dict):
        return None
    function = tool.get("function", tool)
    return function if isinstance(function, dict) and isinstance(function.get("name"), str) else None


def _markers(*moves: tuple[str, str]) -> list[tuple[str, str]]:
    return [(marker, state) for marker, state in moves if marker]


def _partial(text: str, markers: list[str]) -> int:
    """Length of the longest end of `text` that is a proper start of a marker."""
    return max((overlap(text, m) for m in markers), default=0)


def overlap(text: str, marker: str) -> int:
    """Length of the longest end of `text` that is a proper start of `marker`."""
    for n in range(min(len(text), len(marker) - 1), 0, -1):
        if text.endswith(marker[:n]):
            return n
    return 0


def _short(reason: str, limit: int = 300) -> str:
    return reason if len(reason) <= limit else reason[: limit - 3] + "..."


class _Scan:
    """Reads a JSON call body incrementally, skipping strings, so that brackets
    and markers inside string values do not end the call."""

    def __init__(self) -> None:
        self.pos = 0
        self.begun = False
        self.done = False  # a value read by `value` is complete
        self.depth = 0
        self.quote = ""
        self.escape = False
        self.last = ""  # the last non-space character outside strings

    def begin(self, body: str) -> bool:
        """Find where the JSON value of an end-marker-less body starts."""
        stripped = body.lstrip()
        if stripped[:1] in ("{", "["):
            self.pos = len(body) - len(stripped)
        elif (i := body.find("[ARGS]")) >= 0:  # Mistral's NAME[ARGS]{...}
            self.pos = i + len("[ARGS]")
        else:
            return False
        self.begun = True
        return True

    def marker(self, body: str, markers: list[str]) -> tuple[int, str] | None:
        """The first of `markers` outside strings, and where; None while not seen."""
        while self.pos < len(body):
            i = self.pos
            if not self.quote:
                for marker in markers:
                    if marker and body.startswith(marker, i):
                        return i, marker
                tail = body[i : i + max(map(len, markers))]
                if any(len(tail) < len(m) and m.startswith(tail) for m in markers):
                    return None  # may be a marker: wait for more
            self._char(body[i])
            self.pos += 1
        return None

    def value(self, body: str) -> int | None:
        """Position just after the first complete value, or None while open."""
        while self.pos < len(body):
            self._char(body[self.pos])
            self.pos += 1
            if self.depth <= 0 and self.last in ("}", "]"):
                return self.pos
        return None

    def _char(self, c: str) -> None:
        if self.quote:
            if self.escape:
                self.escape = False
            elif c == "\\":
                self.escape = True
            elif c == self.quote:
                self.quote, self.last = "", c
            return
        # A quote opens a string only where JSON allows one, so that an
        # apostrophe in a non-JSON body does not swallow the end marker.
        if c in "\"'" and self.last in ("", "{", "[", ",", ":"):
            self.quote = c
        elif c in "{[":
            self.depth += 1
        elif c in "}]":
            self.depth -= 1
        if not c.isspace():
            self.last = c
