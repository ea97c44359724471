"""What a model family is: the markers it writes, and the hooks a family module fills in."""

from __future__ import annotations

from typing import Any

import msgspec
from msgspec import Struct


class Format(Struct, frozen=True):
    """The markers a model family writes, as the streaming parser (`toolcalls.Parser`)
    needs them.

    `family` names the module in `anyclaude.families` that owns the format; `name` is
    the call syntax (the module's own, or an mlx-lm parser's). With no `call_end`, a
    call ends where its JSON value does; `json_body` False: the body is not JSON (an XML-like
    call), and runs to `call_end` or the end of generation. `bare_json`: a text run that starts with "{"
    is a call (Llama 3). `drop`: markers removed from text and reasoning. `headers`:
    markers that open a message header running to `header_end`, which the family's
    `route` reads to tell whether reasoning, text or a call follows (harmony), and
    `header_rest` what a reply begins with when it goes on with the prompt's own.
    """

    name: str
    family: str = ""
    call_start: tuple[str, ...] = ()
    call_end: str = ""
    bare_json: bool = False
    json_body: bool = True
    think_start: str = "<think>"
    think_end: str = "</think>"
    drop: tuple[str, ...] = ()
    headers: tuple[str, ...] = ()
    header_end: str = ""
    # A reply that starts with this continues the header the generation prompt opened
    # (harmony's `<|start|>assistant` then ` to=functions.NAME...`).
    header_rest: str = ""


class Hints(Struct, frozen=True):
    """What detection reads from a tokenizer: its chat template's text, the tool parser
    mlx-lm inferred (the `mlx_lm.tool_parsers` module's short name, or None) and the
    markers mlx-lm found."""

    template: str
    parser: str | None
    think_start: str | None
    think_end: str | None
    tool_call_start: str | None
    tool_call_end: str | None
    structural: tuple[str, ...]


class Family:
    """A model family. Each module of `anyclaude.families` has one, as `FAMILY`, and
    overrides what its models do differently; detection tries families by `order`."""

    name = ""
    order = 100

    def detect(self, hints: Hints) -> Format | None:
        """The format of a model with these hints, or None if it is not of this family."""
        raise NotImplementedError

    def call_format(self, fmt: Format, template: str) -> Any:
        """The `grammar.CallFormat` its forced calls are written in, or None if they
        cannot be forced."""
        return None

    def parse(self, fmt: Format, marker: str, body: str, tools: list[dict]) -> list[Any]:
        """The calls (objects with a name and arguments) in one call's body, written in
        `fmt`; `marker` is what opened it. Raises ValueError if there are none."""
        raise ValueError(f"{self.name} writes no calls")

    def stream_start(self, marker: str, body: str) -> tuple[str, int] | None:
        """For calls whose arguments are JSON as written: once the call's name is known,
        the name and where in `body` the arguments' JSON value starts; None until then,
        and always for families whose arguments are not written as JSON."""
        return None

    def partial(self, body: str, done: bool) -> Any:
        """For calls whose arguments are not JSON as written (XML-like): the
        `partial.Partial` of a call's body written so far (`done`: all of it), or None
        while its name is not known, and always for the other families."""
        return None

    def value(self, name: str, key: str, raw: str, tools: list[dict]) -> Any:
        """The value the family's parser makes of the text `raw` of argument `key` of a
        call to `name` (for `partial`)."""
        raise NotImplementedError

    def route(self, header: str) -> tuple[str, str]:
        """For formats with `headers`: what a message header opens: ("text", ""),
        ("think", "") or ("call", the opening marker the parser keeps for `parse`)."""
        return "text", ""

    def inputs(self, messages: list[dict], tools: list[dict]) -> tuple[list[dict], list[dict] | None]:
        """The messages and tools its chat template is given (the tools None when they
        are written into the messages instead)."""
        return messages, tools or None

    def template_kwargs(self, effort: str | None) -> dict:
        """Extra variables for its chat template, from the request's effort."""
        return {}

    def rendered(self, text: str) -> str:
        """The prompt text as the model reads it, from its template's rendering."""
        return text


def with_markers(fmt: Format, hints: Hints) -> Format:
    """`fmt` with the reasoning and structural markers mlx-lm found for the tokenizer."""
    start, end = hints.think_start, hints.think_end
    if not (start and end):
        start, end = fmt.think_start, fmt.think_end
    return msgspec.structs.replace(fmt, think_start=start, think_end=end, drop=fmt.drop + hints.structural)
