"""Every other tool parser mlx-lm infers (Kimi, Gemma 4, FunctionGemma, MiniMax-M2,
LongCat, pythonic, ...): the call is the text between the parser's own
`tool_call_start`/`tool_call_end` markers, handed to its `parse_tool_call`, which
converts values by schema. Their calls cannot be forced."""

from __future__ import annotations

import importlib
from typing import Any

from .base import Family, Format, Hints, with_markers


class MlxParsers(Family):
    name = "mlx"
    order = 900

    def detect(self, hints: Hints) -> Format | None:
        if hints.parser is None or not hints.tool_call_start:
            return None
        fmt = Format(
            name=hints.parser, family=self.name, call_start=(hints.tool_call_start,), call_end=hints.tool_call_end or "", json_body=False
        )
        return with_markers(fmt, hints)

    def parse(self, fmt: Format, marker: str, body: str, tools: list[dict]) -> list[Any]:
        return parse_mlx(fmt.name, body, tools)  # the format is named for its parser


def parse_mlx(parser: str, body: str, tools: list[dict]) -> list[Any]:
    """The calls in a body, as the mlx-lm parser module `parser` reads them."""
    module = importlib.import_module(f"mlx_lm.tool_parsers.{parser}")
    try:
        parsed = module.parse_tool_call(body.strip(), tools)
    except Exception:
        # Its schema-typed conversion can refuse a value; read every value
        # as given and let the schema repair decide.
        try:
            parsed = module.parse_tool_call(body.strip(), None)
        except Exception as e:
            raise ValueError(f"{type(e).__name__}: {e}") from None
    return parsed if isinstance(parsed, list) else [parsed]


FAMILY = MlxParsers()
