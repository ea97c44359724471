"""Models that run on another server: one module per API (`anthropic`, `openai`), and
what they share (`base`). The messages use case hands a request for such a model to
`start`, and gets back a call whose events anyclaude's stream state machine turns into
the Anthropic answer."""

from __future__ import annotations

import json

from .. import profiles, wire
from . import anthropic, openai
from .base import Broke, Call, Down, Ended, Gate, Output, Refused, Upstream, Usage, clamp, forwarded

APIS = {"anthropic": anthropic, "openai": openai}

__all__ = ["Broke", "Call", "Down", "Ended", "Gate", "Output", "Refused", "Upstream", "Usage", "make", "start"]


def make(key: str, model: profiles.Model) -> Upstream:
    return Upstream(key, model, APIS[model.api])


async def start(
    upstream: Upstream, gate: Gate, request: wire.MessagesRequest, body: bytes, headers: list, *, keep_billing_header: bool, wait: float
) -> tuple[Call, float]:
    """Send a request to its upstream: the call (its answer streaming in) and the seconds
    to the upstream's response headers. Down (529, or the fallback) when it cannot take it."""
    gate.check_open()
    api = upstream.api
    sent = api.body(json.loads(body), request, upstream.model, clamp(request, upstream.model), keep_billing_header=keep_billing_header)
    response, latency = await upstream.open(sent, api.headers(forwarded(headers)), wait)
    reader = api.Reader.for_request(request) if api is openai else api.Reader()
    return Call(gate, response, reader), latency


async def count_tokens(upstream: Upstream, request: wire.CountTokensRequest, body: bytes, headers: list, *, keep_billing_header: bool, wait: float) -> int:
    """count_tokens, asked of an Anthropic-API upstream; an OpenAI-API one cannot count (404:
    the client estimates)."""
    from ..errors import NotFound

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
