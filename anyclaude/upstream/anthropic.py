"""An upstream that speaks the Anthropic Messages API (vLLM, SGLang, llama-server,
another anyclaude): the request forwarded nearly as it came, its events read back, each
tool call validated and repaired as a local one is."""

from __future__ import annotations

import json

from .. import prompt, repair, toolcalls
from ..api import wire
from ..toolcalls import BadCall, Text, Thinking, ToolCall
from .base import Broke, Ended, Output, Usage, usage_of, whole_json

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
    not trusted, only what the blocks hold (the stream state machine numbers them). A
    tool_use block's input is gathered until the block ends, then repaired and checked
    against its tool's schema, as an OpenAI-API upstream's calls and a local model's are:
    what is streamed to the client cannot be taken back."""

    def __init__(self, tools: list[wire.Tool] | None = None) -> None:
        self.done = False
        # Custom tools are checked against their schema (deferred ones too: the upstream may
        # load them itself); Anthropic-defined ones (bash_20250124...) have none to check.
        custom = [t for t in tools or [] if t.type in (None, "custom")]
        self._tools = toolcalls.functions([{"name": t.name, "parameters": t.input_schema} for t in custom])
        self._schemaless = {t.name for t in tools or [] if t.type not in (None, "custom")}
        self._kinds: dict[int, str] = {}
        self._calls: dict[int, list[str]] = {}  # index -> [name, input JSON so far]
        self._stop: tuple[str, str | None] | None = None
        self._pending: list[str] | None = None  # a closed call whose input is not whole JSON

    @classmethod
    def for_request(cls, request: wire.MessagesRequest) -> Reader:
        return cls(request.tools)

    def feed(self, name: str, data: str) -> list:
        event = json.loads(data)
        if not isinstance(event, dict):
            raise ValueError("an event that is not a JSON object")
        kind = event.get("type") or name
        # A call held at its block's end is settled by what comes next (pings say nothing).
        events = self._settle(kind, event) if kind in ("content_block_start", "message_delta", "message_stop", "error") else []
        return events + self._event(kind, event)

    def _event(self, kind: str, event: dict) -> list:
        if kind == "message_start":
            usage = usage_of((event.get("message") or {}).get("usage"))
            return [_usage(usage)]
        if kind == "content_block_start":
            return self._start(event.get("index", 0), event.get("content_block") or {})
        if kind == "content_block_delta":
            return self._delta(event.get("index", 0), event.get("delta") or {})
        if kind == "content_block_stop":
            index = event.get("index", 0)
            if self._kinds.pop(index, None) != "tool_use" or index not in self._calls:
                return []
            call = self._calls.pop(index)
            if not whole_json(call[1]):
                # Not whole JSON: cut short if the message ends at max_tokens next (the API
                # closes the block all the same), else repaired.
                self._pending = call
                return [Output([])]
            return [Output([self._check(*call)])]
        if kind == "message_delta":
            delta = event.get("delta") or {}
            if delta.get("stop_reason"):
                self._stop = (delta["stop_reason"], delta.get("stop_sequence"))
            return [_usage(usage_of(event.get("usage")))]
        if kind == "message_stop":
            self.done = True
            # A call whose block never closed was cut short: shown as text, as a local one.
            events = [Output([_truncated(*self._calls.pop(i))]) for i in sorted(self._calls)]
            reason, sequence = self._stop or ("end_turn", None)
            return events + [Ended(reason, sequence)]
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
            # The input comes in deltas, or whole in the start (an upstream that does not stream it).
            given = block.get("input")
            self._calls[index] = [str(block.get("name") or ""), json.dumps(given, ensure_ascii=False) if given else ""]
        return []

    def _delta(self, index: int, delta: dict) -> list:
        kind, open_as = delta.get("type"), self._kinds.get(index)
        if kind == "text_delta" and open_as == "text" and delta.get("text"):
            return [Output([Text(delta["text"])])]
        if kind == "thinking_delta" and open_as == "thinking" and delta.get("thinking"):
            return [Output([Thinking(delta["thinking"])])]
        if kind == "input_json_delta" and open_as == "tool_use" and isinstance(delta.get("partial_json"), str) and index in self._calls:
            self._calls[index][1] += delta["partial_json"]
            # Nothing to show yet, but the upstream is not silent: the watchdog's idle
            # clock and the client's pings go by this.
            return [Output([])]
        return []  # signatures (this daemon seals its own), and deltas of blocks it dropped

    def _settle(self, kind: str, event: dict) -> list:
        """The call held at its block's end, once the event after it shows whether the
        message was cut there (max_tokens) or went on."""
        if self._pending is None:
            return []
        call, self._pending = self._pending, None
        cut = kind == "message_delta" and (event.get("delta") or {}).get("stop_reason") == "max_tokens"
        return [Output([_truncated(*call) if cut else self._check(*call)])]

    def _check(self, name: str, text: str) -> ToolCall | BadCall:
        raw = _raw(name, text)
        try:
            parsed = repair.loads(text) if text.strip() else {}
        except ValueError as exc:
            return BadCall(raw=raw, reason=f"{name}: unparseable input: {exc}")
        if name in self._schemaless and name not in self._tools:
            return ToolCall(name, parsed) if isinstance(parsed, dict) else BadCall(raw=raw, reason=f"{name}: input is not a JSON object")
        checked = toolcalls.check_call(self._tools, name, parsed)
        return checked if isinstance(checked, ToolCall) else BadCall(raw=raw, reason=checked)


def _raw(name: str, text: str) -> str:
    """A call that cannot be made valid, as the client is shown it: its input as written."""
    return '{"type": "tool_use", "name": %s, "input": %s}' % (json.dumps(name, ensure_ascii=False), text or "{}")


def _truncated(name: str, text: str) -> BadCall:
    return BadCall(raw=_raw(name, text), reason="truncated")


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
