"""An upstream that speaks the Anthropic Messages API (vLLM, SGLang, llama-server,
another anyclaude): the request forwarded nearly as it came, its events read back."""

from __future__ import annotations

import json

from .. import prompt
from ..api import wire
from ..toolcalls import CallDelta, CallStart, Text, Thinking, ToolCall
from .base import Broke, Ended, Output, Usage, usage_of

PATH = "/v1/messages"


def body(raw: dict, request: wire.MessagesRequest, model, max_tokens: int, *, keep_billing_header: bool) -> dict:
    """The client's request as the upstream gets it: every field and beta it did not
    name is passed on; the model is the upstream's name for it; always streamed (a
    non-streaming answer is put together here, under the same watchdog)."""
    out = dict(raw)
    out["model"] = model.upstream_model or request.model
    out["stream"] = True
    out["max_tokens"] = max_tokens
    if not keep_billing_header:
        out["system"] = _without_billing_header(raw.get("system"))
        if out["system"] in (None, "", []):
            out.pop("system")
    return out


def count_body(raw: dict, request: wire.CountTokensRequest, model, *, keep_billing_header: bool) -> dict:
    out = dict(raw)
    out["model"] = model.upstream_model or request.model
    if not keep_billing_header:
        out["system"] = _without_billing_header(raw.get("system"))
        if out["system"] in (None, "", []):
            out.pop("system")
    return out


def _without_billing_header(system):
    if isinstance(system, str):
        return "" if system.startswith(prompt.BILLING_HEADER) else system
    if isinstance(system, list):
        return [
            b for b in system
            if not (isinstance(b, dict) and b.get("type") == "text" and str(b.get("text", "")).startswith(prompt.BILLING_HEADER))
        ]
    return system


def headers(forwarded: dict[str, str]) -> dict[str, str]:
    return {"content-type": "application/json", "accept": "text/event-stream", "anthropic-version": "2023-06-01", **forwarded}


class Reader:
    """The upstream's events, as the events of `base`: its block indexes and types are
    not trusted, only what the blocks hold (the stream state machine numbers them)."""

    def __init__(self) -> None:
        self.done = False
        self._kinds: dict[int, str] = {}
        self._names: dict[int, str] = {}
        self._stop: tuple[str, str | None] | None = None

    def feed(self, name: str, data: str) -> list:
        event = json.loads(data)
        if not isinstance(event, dict):
            raise ValueError("an event that is not a JSON object")
        kind = event.get("type") or name
        if kind == "message_start":
            usage = usage_of((event.get("message") or {}).get("usage"))
            return [_usage(usage)]
        if kind == "content_block_start":
            return self._start(event.get("index", 0), event.get("content_block") or {})
        if kind == "content_block_delta":
            return self._delta(event.get("index", 0), event.get("delta") or {})
        if kind == "content_block_stop":
            index = event.get("index", 0)
            if self._kinds.pop(index, None) == "tool_use":
                return [Output([ToolCall(name=self._names.pop(index, ""), arguments={})])]  # closes the streamed call
            return []
        if kind == "message_delta":
            delta = event.get("delta") or {}
            if delta.get("stop_reason"):
                self._stop = (delta["stop_reason"], delta.get("stop_sequence"))
            return [_usage(usage_of(event.get("usage")))]
        if kind == "message_stop":
            self.done = True
            reason, sequence = self._stop or ("end_turn", None)
            return [Ended(reason, sequence)]
        if kind == "error":
            self.done = True
            error = event.get("error") or {}
            message = error.get("message") or "the upstream sent an error"
            return [Broke(f"upstream: {message}", overloaded=error.get("type") in ("overloaded_error", None))]
        return []  # ping, and events of betas it knows and we do not

    def close(self) -> list:
        """The stream ended without message_stop: the upstream hung up."""
        self.done = True
        return [Broke("the upstream ended the stream before the message's end; retry")]

    def _start(self, index: int, block: dict) -> list:
        kind = block.get("type")
        if kind not in ("text", "thinking", "tool_use"):
            return []  # redacted thinking, server tools: nothing a local client can use
        self._kinds[index] = kind
        if kind == "text" and block.get("text"):
            return [Output([Text(block["text"])])]
        if kind == "thinking" and block.get("thinking"):
            return [Output([Thinking(block["thinking"])])]
        if kind == "tool_use":
            self._names[index] = str(block.get("name") or "")
            segments: list = [CallStart(self._names[index])]
            if block.get("input"):
                segments.append(CallDelta(json.dumps(block["input"], ensure_ascii=False)))
            return [Output(segments)]
        return []

    def _delta(self, index: int, delta: dict) -> list:
        kind, open_as = delta.get("type"), self._kinds.get(index)
        if kind == "text_delta" and open_as == "text" and delta.get("text"):
            return [Output([Text(delta["text"])])]
        if kind == "thinking_delta" and open_as == "thinking" and delta.get("thinking"):
            return [Output([Thinking(delta["thinking"])])]
        if kind == "input_json_delta" and open_as == "tool_use" and delta.get("partial_json"):
            return [Output([CallDelta(delta["partial_json"])])]
        return []  # signatures (this daemon seals its own), and deltas of blocks it dropped


def _usage(usage: dict) -> Usage:
    def count(key: str) -> int | None:
        value = usage.get(key)
        return value if isinstance(value, int) else None

    return Usage(
        input_tokens=count("input_tokens"),
        output_tokens=count("output_tokens"),
        cache_read=count("cache_read_input_tokens"),
        cache_creation=count("cache_creation_input_tokens"),
    )
