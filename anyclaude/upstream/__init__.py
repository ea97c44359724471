"""Models that run on another server: one module per API (`anthropic`, `openai`), and
what they share (`base`). The messages use case hands a request for such a model to
`start`, and gets back a call whose events anyclaude's stream state machine turns into
the Anthropic answer."""

from __future__ import annotations

import json
import re

from .. import profiles, prompt
from ..api import wire
from ..api.errors import ANSWER_FLOOR, InvalidRequest, prompt_too_long
from . import anthropic, openai
from .base import Broke, Call, Down, Ended, Forced, Gate, Output, Refused, Upstream, Usage, clamp, forwarded

APIS = {"anthropic": anthropic, "openai": openai}

__all__ = ["Broke", "Call", "Down", "Ended", "Forced", "Gate", "Output", "Refused", "Upstream", "Usage", "make", "start"]


def make(key: str, model: profiles.Model) -> Upstream:
    return Upstream(key, model, APIS[model.api])


async def start(
    upstream: Upstream, gate: Gate, request: wire.MessagesRequest, body: bytes, headers: list, *, keep_billing_header: bool, wait: float
) -> tuple[Call, float]:
    """Send a request to its upstream: the call (its answer streaming in) and the seconds
    to the upstream's response headers. Down (529, or the fallback) when it cannot take it."""
    gate.check_open()
    api = upstream.api
    forced = _forced(request, api)
    sent = api.body(json.loads(body), request, upstream.model, clamp(request, upstream.model), keep_billing_header=keep_billing_header)
    try:
        response, latency = await upstream.open(sent, api.headers(forwarded(headers)), wait)
    except Refused as exc:
        overflow = context_overflow(exc)
        if overflow is None:
            raise
        prompt_tokens, context = overflow
        room, floor = context - prompt_tokens, min(ANSWER_FLOOR, request.max_tokens)
        if room >= sent["max_tokens"]:  # not what its numbers say: its words, as they were
            raise
        if room < floor:
            # The prompt itself is too long: said in the words Claude Code compacts on.
            raise prompt_too_long(prompt_tokens, context - floor) from None
        # Only the answer's room was: as for a local model, max_tokens is clamped, not refused.
        sent["max_tokens"] = room
        response, latency = await upstream.open(sent, api.headers(forwarded(headers)), wait)
    reader = api.Reader.for_request(request)
    if forced is not None:
        reader = Forced(reader, forced, f"{upstream.url} ({upstream.model.api} API)")
    return Call(gate, response, reader), latency


def _forced(request: wire.MessagesRequest, api) -> wire.ToolChoice | None:
    """A tool_choice that forces a call, checked as for a local model (a 400 before anything
    is sent), or None."""
    choice = request.tool_choice
    if choice is None or choice.type not in ("any", "tool"):
        return None
    # What the upstream is given: an OpenAI-API one only the functions chat_inputs makes.
    names = {f["function"]["name"] for f in prompt.chat_inputs(request)[1]} if api is openai else {t.name for t in request.tools or []}
    if not names:
        raise InvalidRequest(f"tool_choice: {choice.type} needs tools")
    if choice.type == "tool" and choice.name not in names:
        raise InvalidRequest(f"tool_choice.name: no tool named {choice.name!r} among the tools")
    return choice


# vLLM's: "This model's maximum context length is 32768 tokens. However, you requested
# 40000 tokens (30000 in the messages, 10000 in the completion)."; SGLang's and others'
# are alike: the context, then the prompt's tokens.
_CONTEXT = re.compile(r"maximum context length (?:is|of) (\d+)", re.I)
_PROMPT = re.compile(r"(\d+) (?:tokens )?(?:in|from) the (?:input )?(?:messages|prompt)", re.I)
_CLAUDE = re.compile(r"prompt is too long: (\d+) tokens > (\d+) maximum")


def context_overflow(exc: Refused) -> tuple[int, int] | None:
    """(prompt tokens, context) of an upstream's 400 for a request that does not fit, or None."""
    if exc.status != 400:
        return None
    if _CLAUDE.search(exc.message):  # already the words Claude Code knows
        return None
    context, prompt_tokens = _CONTEXT.search(exc.message), _PROMPT.search(exc.message)
    if context is None or prompt_tokens is None:
        return None
    return int(prompt_tokens[1]), int(context[1])


async def count_tokens(upstream: Upstream, request: wire.CountTokensRequest, body: bytes, headers: list, *, keep_billing_header: bool, wait: float) -> int:
    """count_tokens, asked of an Anthropic-API upstream; an OpenAI-API one cannot count (404:
    the client estimates)."""
    from ..api.errors import NotFound

    if upstream.api is not anthropic:
        raise NotFound(f"count_tokens: model {upstream.key!r} runs on an OpenAI-API upstream, which does not count tokens")
    sent = anthropic.count_body(json.loads(body), request, upstream.model, keep_billing_header=keep_billing_header)
    response, _ = await upstream.open(sent, anthropic.headers(forwarded(headers)), wait, path="/v1/messages/count_tokens")
    try:
        data = json.loads(await response.aread())
    except ValueError:
        data = {}
    finally:
        await response.aclose()
    if not isinstance(data, dict) or not isinstance(data.get("input_tokens"), int):
        raise Down(f"upstream {upstream.url} answered count_tokens without input_tokens")
    return data["input_tokens"]
