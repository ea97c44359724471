"""The one producer of Anthropic output: a state machine over generation, and its driver.

Every response, streamed or not, is made of the events this module emits, so the
grammar of the reference (§1) holds by construction: message_start first, blocks
indexed 0..n-1 one at a time, delta types matching block types, one message_delta
with a stop_reason, then message_stop; or an `error` event.
"""

from __future__ import annotations

import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

import msgspec
from msgspec import Struct

from .. import signature
from . import wire
from ..engine.events import Done, Failed, Generation, Prefilled, Token
from .errors import AnthropicError, ApiError, ErrorEnvelope, InvalidRequest, Overloaded
from ..output import Output
from ..toolcalls import BadCall, CallDelta, CallStart, Text, Thinking, ToolCall
from ..upstream import base as upstream

_ALPHABET = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789"


_JSON_PIECE = 64  # characters of tool input per input_json_delta


def new_id(prefix: str) -> str:
    return prefix + "".join(secrets.choice(_ALPHABET) for _ in range(24))


class MessageStream:
    """Anthropic events for one message, in an order that is always valid."""

    def __init__(self, *, model: str, input_tokens: int, cache_read: int = 0, cache_creation: int = 0, show_thinking: bool = True):
        self.id = new_id("msg_")
        self.model = model
        self.usage = wire.Usage(
            input_tokens=input_tokens,
            output_tokens=0,
            cache_read_input_tokens=cache_read,
            cache_creation_input_tokens=cache_creation,
        )
        self.output_tokens = 0
        self.show_thinking = show_thinking
        self._omitted = ""  # the open thinking block's text, when it is not shown
        self._streamed_call = False  # the open tool_use block's input is being streamed
        self.tool_uses = 0
        self._usage_changed = False
        self._index = -1
        self._open: str | None = None
        self.finished = False
        self.started = False

    def start(self) -> list[wire.Event]:
        self.started = True
        body = wire.MessageBody(
            id=self.id, model=self.model, content=[], stop_reason=None, stop_sequence=None, usage=self.usage
        )
        return [wire.MessageStart(message=body)]

    def text(self, text: str) -> list[wire.Event]:
        if not text or self.finished:
            return []
        events = self._switch("text", wire.TextContent())
        events.append(wire.ContentBlockDelta(index=self._index, delta=wire.TextDelta(text=text)))
        return events

    def thinking(self, text: str) -> list[wire.Event]:
        if not text or self.finished:
            return []
        events = self._switch("thinking", wire.ThinkingContent())
        if self.show_thinking:
            events.append(wire.ContentBlockDelta(index=self._index, delta=wire.ThinkingDelta(thinking=text)))
        else:  # display "omitted": the block and its signature, which carries the text
            self._omitted += text
        return events

    def call_start(self, name: str) -> list[wire.Event]:
        """A tool_use block whose input follows in `call_delta` pieces."""
        if self.finished:
            return []
        events = self._switch("tool_use", wire.ToolUseContent(id=new_id("toolu_"), name=name), always_new=True)
        self._streamed_call = True
        return events

    def call_delta(self, json: str) -> list[wire.Event]:
        if self.finished or not self._streamed_call:
            return []
        return [wire.ContentBlockDelta(index=self._index, delta=wire.InputJsonDelta(partial_json=json))]

    def tool_use(self, name: str, arguments: dict) -> list[wire.Event]:
        """A whole tool_use block: its input as one JSON object, in input_json_delta pieces
        (or the end of the block `call_start` opened, its input sent already)."""
        if self.finished:
            return []
        if self._streamed_call:
            return self._close()
        events = self._switch("tool_use", wire.ToolUseContent(id=new_id("toolu_"), name=name), always_new=True)
        text = wire.encoder.encode(arguments).decode()
        if text != "{}":
            for i in range(0, len(text), _JSON_PIECE):
                events.append(wire.ContentBlockDelta(index=self._index, delta=wire.InputJsonDelta(partial_json=text[i : i + _JSON_PIECE])))
        events += self._close()
        self.tool_uses += 1
        return events

    def cached(self, tokens: int) -> None:
        """The engine's actual reuse, if it differs from what message_start said."""
        total = self.usage.input_tokens + self.usage.cache_read_input_tokens
        if tokens != self.usage.cache_read_input_tokens:
            self.usage.cache_read_input_tokens = tokens
            self.usage.input_tokens = total - tokens
            self._usage_changed = True

    def counted(self, input_tokens: int | None, cache_read: int | None, cache_creation: int | None = None) -> None:
        """Prompt tokens as an upstream counts them: in message_start if it has not gone
        out yet, else in message_delta."""
        usage, changed = self.usage, False
        if input_tokens is not None and input_tokens != usage.input_tokens:
            usage.input_tokens, changed = input_tokens, True
        if cache_read is not None and cache_read != usage.cache_read_input_tokens:
            usage.cache_read_input_tokens, changed = cache_read, True
        if cache_creation is not None:
            usage.cache_creation_input_tokens = cache_creation
        self._usage_changed = self._usage_changed or (changed and self.started)

    def finish(self, stop_reason: str, stop_sequence: str | None = None) -> list[wire.Event]:
        if self.finished:
            return []
        self.finished = True
        events = self._close()
        usage = wire.DeltaUsage(output_tokens=self.output_tokens)
        if self._usage_changed:  # the SDKs overwrite these when present (cumulative, not increments)
            usage.input_tokens = self.usage.input_tokens
            usage.cache_read_input_tokens = self.usage.cache_read_input_tokens
        events.append(wire.MessageDelta(delta=wire.StopInfo(stop_reason=stop_reason, stop_sequence=stop_sequence), usage=usage))
        events.append(wire.MessageStop())
        return events

    def _switch(self, kind: str, block: wire.Content, always_new: bool = False) -> list[wire.Event]:
        if self._open == kind and not always_new:
            return []
        events = self._close()
        self._index += 1
        self._open = kind
        events.append(wire.ContentBlockStart(index=self._index, content_block=block))
        return events

    def _close(self) -> list[wire.Event]:
        if self._open is None:
            return []
        events: list[wire.Event] = []
        if self._open == "thinking":
            # Clients expect a signature; nothing checks a local one.
            sealed = signature.seal(self._omitted) if self._omitted else signature.PLAIN
            events.append(wire.ContentBlockDelta(index=self._index, delta=wire.SignatureDelta(signature=sealed)))
            self._omitted = ""
        if self._streamed_call:  # however it ends, the client has a tool_use block
            self._streamed_call = False
            self.tool_uses += 1
        self._open = None
        events.append(wire.ContentBlockStop(index=self._index))
        return events

    @property
    def open_block(self) -> str | None:
        return self._open


def accumulate(events: list[wire.Event]) -> wire.MessageBody:
    """The non-streaming Message: the same events, put together."""
    message: wire.MessageBody | None = None
    partial_json: dict[int, str] = {}
    for event in events:
        if isinstance(event, wire.MessageStart):
            message = event.message
        elif isinstance(event, wire.ContentBlockStart):
            message.content.append(event.content_block)
        elif isinstance(event, wire.ContentBlockDelta):
            block, delta = message.content[event.index], event.delta
            if isinstance(delta, wire.TextDelta):
                block.text += delta.text
            elif isinstance(delta, wire.ThinkingDelta):
                block.thinking += delta.thinking
            elif isinstance(delta, wire.SignatureDelta):
                block.signature = delta.signature
            elif isinstance(delta, wire.InputJsonDelta):
                partial_json[event.index] = partial_json.get(event.index, "") + delta.partial_json
        elif isinstance(event, wire.ContentBlockStop) and event.index in partial_json:
            try:
                message.content[event.index].input = msgspec.json.decode(partial_json.pop(event.index))
            except msgspec.DecodeError:  # a call an upstream's stream cut short: no input
                pass
        elif isinstance(event, wire.MessageDelta):
            message.stop_reason = event.delta.stop_reason
            message.stop_sequence = event.delta.stop_sequence
            message.usage.output_tokens = event.usage.output_tokens
            if event.usage.input_tokens is not None:
                message.usage.input_tokens = event.usage.input_tokens
                message.usage.cache_read_input_tokens = event.usage.cache_read_input_tokens
    return message


def sse(event: wire.Event | ErrorEnvelope) -> bytes:
    """One event in SSE framing; the event name always equals data.type."""
    name = type(event).__struct_config__.tag
    return b"event: " + name.encode() + b"\ndata: " + wire.encoder.encode(event) + b"\n\n"


class Outcome(Struct):
    """How a response ended, for the caller and the request log."""

    # complete, max_tokens, stop_sequence, tool_use, cancelled, timeout_first_token,
    # timeout_idle, timeout_total, error (and overloaded, decided before this runs).
    outcome: str = "error"
    stop_reason: str | None = None
    error: AnthropicError | None = None
    output_tokens: int = 0
    first_token_seconds: float | None = None
    decode_seconds: float = 0.0
    prefill_seconds: float | None = None
    tool_parse_errors: list[str] = []
    cached_tokens: int | None = None
    cache_source: str | None = None
    cache_lookup: str | None = None
    # The generated token ids (for the session's miss diagnostics).
    tokens: list[int] = []

    @property
    def cancelled(self) -> bool:
        return self.outcome == "cancelled"


class Timeouts(Struct, frozen=True):
    first_token: float
    idle: float
    total: float
    ping_interval: float
    profile: str = ""


async def drive(
    stream: MessageStream,
    generation: Generation,
    output: Output,
    emit: Callable[[list[Any]], Awaitable[bool]],
    timeouts: Timeouts,
    *,
    single_call: bool = False,
) -> Outcome:
    """Run a generation to its end, emitting events; `emit` returns False once the client is gone.

    Every path ends the message (finish, or an error for the caller to send) within
    its timeout plus one engine step, and the engine work is cancelled whenever
    this returns before the engine is done. `single_call`: stop after the first
    tool call (disable_parallel_tool_use).
    """
    outcome = Outcome()
    started = sent_at = time.monotonic()
    first = last = None
    try:
        if not await emit(stream.start()):
            outcome.outcome = "cancelled"
            return outcome
        while True:
            if first is None:
                # From when the engine took it up: time queued behind others is not the
                # prefill taking too long (a retry would only rejoin the queue).
                deadline, kind = (generation.started_at or time.monotonic()) + timeouts.first_token, "timeout_first_token"
            else:
                deadline, kind = min((last + timeouts.idle, "timeout_idle"), (started + timeouts.total, "timeout_total"))
            wait = max(0.0, min(timeouts.ping_interval, deadline - time.monotonic()))
            event = await generation.next(timeout=wait)
            now = time.monotonic()
            if event is None and generation.cancelled:  # the client hung up; the engine stops on its own
                outcome.outcome = "cancelled"
                return outcome
            if event is None:
                if now >= deadline:
                    return await _time_out(kind, stream, output, emit, outcome, timeouts)
                sent_at = now
                if not await emit([wire.Ping()]):
                    outcome.outcome = "cancelled"
                    return outcome
            elif isinstance(event, Prefilled):
                outcome.prefill_seconds = event.seconds
                outcome.cached_tokens = event.cached
                outcome.cache_source = event.source or None
                outcome.cache_lookup = event.lookup or None
                stream.cached(event.cached)
            elif isinstance(event, Token):
                first = first or now
                last = now
                stream.output_tokens += 1
                outcome.tokens.append(event.id)
                events = _events(stream, output.add(event.id))
                # Tokens that show nothing yet (a call being written) are silence to the
                # client, whose watchdog counts bytes: a ping fills it.
                if not events and now - sent_at >= timeouts.ping_interval:
                    events = [wire.Ping()]
                if events:
                    sent_at = now
                sent = await emit(events)
                if output.stop_sequence is not None:
                    return await _finish(stream, output, emit, outcome, "stop_sequence")
                if single_call and stream.tool_uses:
                    return await _finish(stream, output, emit, outcome, "tool_use", cut=True)
                if not sent:
                    outcome.outcome = "cancelled"
                    return outcome
            elif isinstance(event, Done):
                if event.reason == "cancelled":
                    outcome.outcome = "cancelled"
                    return outcome
                if event.reason == "stop":
                    stream.output_tokens += 1  # the end-of-turn token was generated too
                    return await _finish(stream, output, emit, outcome, "complete")
                return await _finish(stream, output, emit, outcome, "max_tokens", cut=True)
            elif isinstance(event, Failed):
                # overloaded_error is the one clients retry by themselves.
                outcome.error = Overloaded(event.message) if event.retry else ApiError(f"generation failed: {event.message}")
                return outcome
    finally:
        generation.cancel()
        outcome.output_tokens = stream.output_tokens
        outcome.tool_parse_errors = output.bad_calls
        if first is not None:
            outcome.first_token_seconds = first - started
            outcome.decode_seconds = last - first


def _events(stream: MessageStream, segments: list) -> list[wire.Event]:
    events: list[wire.Event] = []
    for segment in segments:
        if isinstance(segment, Text):
            events += stream.text(segment.text)
        elif isinstance(segment, Thinking):
            events += stream.thinking(segment.text)
        elif isinstance(segment, ToolCall):
            events += stream.tool_use(segment.name, segment.arguments)
        elif isinstance(segment, CallStart):
            events += stream.call_start(segment.name)
        elif isinstance(segment, CallDelta):
            events += stream.call_delta(segment.json)
        elif isinstance(segment, BadCall):
            # Never a broken tool_use: the model's words are shown as they were written.
            events += stream.text(("\n" if stream.open_block == "text" else "") + segment.raw)
    return events


async def _finish(stream, output: Output, emit, outcome: Outcome, ending: str, *, cut: bool = False) -> Outcome:
    """End the message. `ending`: complete, max_tokens, stop_sequence or tool_use (from the
    engine's point of view); a call cut short by the cap makes it max_tokens, any call
    emitted makes it tool_use."""
    cut_call = cut and output.in_call
    events = _events(stream, output.finish(cut=cut))
    if stream.tool_uses and not (ending == "max_tokens" and cut_call):
        reason = "tool_use"
    else:
        reason = {"complete": "end_turn", "tool_use": "tool_use"}.get(ending, ending)
    outcome.stop_reason = reason
    if outcome.outcome not in ("timeout_idle", "timeout_total"):
        outcome.outcome = "complete" if reason == "end_turn" else reason
    return await _end(emit, events + stream.finish(reason, output.stop_sequence if reason == "stop_sequence" else None), outcome)


async def _time_out(kind, stream, output, emit, outcome: Outcome, timeouts: Timeouts) -> Outcome:
    outcome.outcome = kind
    if kind == "timeout_first_token":
        # Nothing was generated: an overloaded error makes Claude Code retry.
        where = f" in profile {timeouts.profile}" if timeouts.profile else ""
        outcome.error = Overloaded(
            f"no output within {timeouts.first_token:g} s (timeouts.first_token{where}); the prompt is still prefilling"
        )
        return outcome
    # Output began: end the message as cut short, keeping what was sent (but not half a call).
    return await _finish(stream, output, emit, outcome, "max_tokens", cut=True)


async def _end(emit, events: list, outcome: Outcome) -> Outcome:
    # A client gone before message_stop reached it ended the stream itself.
    if not await emit(events):
        outcome.outcome = "cancelled"
    return outcome


async def relay(
    stream: MessageStream,
    call,
    emit: Callable[[list[Any]], Awaitable[bool]],
    timeouts: Timeouts,
    *,
    single_call: bool = False,
) -> Outcome:
    """Run an upstream's answer (an `upstream.Call`) to its end, emitting events, as `drive`
    runs a generation: the same watchdog, pings and endings. message_start goes out with
    the first piece of the answer or the first ping, so that it carries the upstream's
    count of the prompt when the upstream gives one first; the call is closed whenever
    this returns before the upstream is done."""
    outcome = Outcome()
    started = sent_at = time.monotonic()
    first = last = None
    pieces = 0  # output events, the count of output tokens if the upstream gives none
    reported: int | None = None

    async def send(events: list) -> bool:
        nonlocal sent_at
        if not stream.started:
            events = stream.start() + events
        sent_at = time.monotonic()
        return await emit(events)

    try:
        while True:
            if first is None:
                deadline, kind = started + timeouts.first_token, "timeout_first_token"
            else:
                deadline, kind = min((last + timeouts.idle, "timeout_idle"), (started + timeouts.total, "timeout_total"))
            now = time.monotonic()
            wait = max(0.0, min(sent_at + timeouts.ping_interval, deadline) - now)
            event = await call.next(timeout=wait)
            now = time.monotonic()
            if call.cancelled and event is None:  # the client hung up
                outcome.outcome = "cancelled"
                return outcome
            if isinstance(event, upstream.Usage):
                stream.counted(event.input_tokens, event.cache_read, event.cache_creation)
                if event.input_tokens is not None:
                    outcome.cached_tokens = event.cache_read
                reported = event.output_tokens if event.output_tokens is not None else reported
            elif isinstance(event, upstream.Output):
                first = first or now
                last = now
                pieces += 1
                stream.output_tokens = max(stream.output_tokens, reported or 0, pieces)
                events = _events(stream, event.segments)
                outcome.tool_parse_errors += [s.reason for s in event.segments if isinstance(s, BadCall)]
                if events and not await send(events):
                    outcome.outcome = "cancelled"
                    return outcome
                if single_call and stream.tool_uses:
                    return await _settle(stream, send, outcome, "tool_use", None, pieces, reported)
            elif isinstance(event, upstream.Ended):
                return await _settle(stream, send, outcome, event.stop_reason, event.stop_sequence, pieces, reported)
            elif isinstance(event, upstream.Broke):
                # overloaded_error is the one clients retry by themselves.
                outcome.error = InvalidRequest(event.message) if event.invalid else Overloaded(event.message) if event.overloaded else ApiError(event.message)
                return outcome
            if now >= deadline:
                outcome.outcome = kind
                if kind == "timeout_first_token":
                    where = f" in profile {timeouts.profile}" if timeouts.profile else ""
                    outcome.error = Overloaded(f"the upstream sent no output within {timeouts.first_token:g} s (timeouts.first_token{where})")
                    return outcome
                return await _settle(stream, send, outcome, "max_tokens", None, pieces, reported, cut=True)
            if now - sent_at >= timeouts.ping_interval and not await send([wire.Ping()]):
                outcome.outcome = "cancelled"
                return outcome
    finally:
        call.cancel()
        outcome.output_tokens = stream.output_tokens
        if first is not None:
            outcome.first_token_seconds = first - started
            outcome.decode_seconds = last - first


async def _settle(stream: MessageStream, send, outcome: Outcome, reason: str, sequence: str | None, pieces: int, reported: int | None, *, cut: bool = False) -> Outcome:
    """End a relayed message. Its stop_reason follows what was sent: tool_use when a call
    was, never when none was; max_tokens for a call cut short."""
    stream.output_tokens = reported if reported is not None else max(stream.output_tokens, pieces)
    cut_call = cut and stream.open_block == "tool_use"
    if stream.tool_uses or (stream.open_block == "tool_use" and not cut_call):
        reason = "tool_use"
    elif reason == "tool_use" or cut_call:
        reason = "max_tokens" if cut_call else "end_turn"
    if reason != "stop_sequence":
        sequence = None
    outcome.stop_reason = reason
    if outcome.outcome not in ("timeout_idle", "timeout_total"):
        outcome.outcome = "complete" if reason == "end_turn" else reason
    if not await send(stream.finish(reason, sequence)):
        outcome.outcome = "cancelled"
    return outcome
