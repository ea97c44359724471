"""Model families: one module each, with how the family is detected, the markers it
writes, how its calls are parsed and forced, and how its template renders history.

A module here that defines `FAMILY` (a `base.Family`) is a family; detection tries them
by `order` and the first whose `detect` gives a format wins (`generic` claims the rest).
Adding a family is adding a module.
"""

from __future__ import annotations

import functools
import importlib
import pkgutil
from typing import Any

from .base import Family, Format, Hints


@functools.cache
def all_families() -> tuple[Family, ...]:
    """Every family, in detection order."""
    found = []
    for info in pkgutil.iter_modules(__path__):
        family = getattr(importlib.import_module(f"{__name__}.{info.name}"), "FAMILY", None)
        if isinstance(family, Family):
            found.append(family)
    return tuple(sorted(found, key=lambda f: (f.order, f.name)))


def detect(tokenizer: Any) -> Format:
    """The format of the model behind an mlx-lm TokenizerWrapper."""
    hints = hints_for(tokenizer)
    for family in all_families():
        if (fmt := family.detect(hints)) is not None:
            return fmt
    raise LookupError("no family claims this tokenizer")  # generic always does


def of(fmt: Format) -> Family:
    """The family a format belongs to."""
    for family in all_families():
        if family.name == fmt.family:
            return family
    raise LookupError(f"no family {fmt.family!r}")


def hints_for(tokenizer: Any) -> Hints:
    """What mlx-lm's tokenizer inference found, and the chat template's text."""
    parser = getattr(tokenizer, "tool_parser", None)
    module = getattr(parser, "__module__", "") or ""
    start, end = getattr(tokenizer, "think_start", None), getattr(tokenizer, "think_end", None)
    return Hints(
        template=template_text(tokenizer),
        parser=module.rsplit(".", 1)[-1] if module.startswith("mlx_lm.tool_parsers.") else None,
        think_start=start if isinstance(start, str) and start else None,
        think_end=end if isinstance(end, str) and end else None,
        tool_call_start=_text(getattr(tokenizer, "tool_call_start", None)),
        tool_call_end=_text(getattr(tokenizer, "tool_call_end", None)),
        structural=tuple(getattr(tokenizer, "structural_markers", None) or ()),
    )


def template_text(tokenizer: Any) -> str:
    """The tokenizer's chat template source ("" if none; named templates joined)."""
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # named templates, e.g. "default" and "tool_use"
        template = "\n".join(t for t in template.values() if isinstance(t, str))
    return template if isinstance(template, str) else ""


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
