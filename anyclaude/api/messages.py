"""The messages use case: a request's body -> its plan (decoded, checked, rendered, a job;
or a request to another server) -> the engine's or the upstream's events through the
stream state machine -> what the transport sends. Also count_tokens, which stops at the plan.

Nothing here knows HTTP: the transport is whatever gives the calls of `Transport`.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sys
from typing import TYPE_CHECKING, Protocol

import msgspec

from .. import budget, constrain, logs, misses, profiles, prompt, toolcalls, upstream
from ..engine.events import Generation, Job, Sampling
from ..engine.scheduler import RANKS, SIDE
from ..output import Output
from . import wire
from .errors import ANSWER_FLOOR, AnthropicError, InvalidRequest, envelope, prompt_too_long
from .stream import MessageStream, Timeouts, accumulate, drive, relay

if TYPE_CHECKING:
    from ..server import Server


class Transport(Protocol):
    """One request's connection to its client, as the use case sees it."""

    server: Server
    record: logs.Record  # the request log line, filled in as the request goes
    request_id: str
    disconnected: asyncio.Event
    started: bool  # whether the response has begun (its headers are out)
    generation: Generation | None  # the engine's work, once submitted (the log waits for it to end)

    def header(self, name: bytes) -> str | None: ...

    @property
    def headers(self) -> list[tuple[bytes, bytes]]: ...

    async def open_stream(self) -> None: ...

    async def send_events(self, events: list) -> bool: ...

    async def end_stream(self) -> None: ...

    async def send_json(self, status: int, body: object) -> None: ...

    def on_hang_up(self, cancellable) -> asyncio.Task:
        """A task that cancels `cancellable` once the client hangs up."""
        ...


class Planned(msgspec.Struct):
    """A request planned for a local engine: rendered, with its job."""

    request: wire.MessagesRequest
    rendered: prompt.Rendered
    scheduler: object
    engine: object
    job: Job
    held: bool  # a grammar holds its calls (forced or lazy): their arguments stream


class Relayed(msgspec.Struct):
    """A request planned for a model on another server: nothing to render here."""

    request: wire.MessagesRequest
    body: bytes
    model: profiles.Model
    engine: upstream.Upstream
    gate: upstream.Gate
    counted: int | None = None  # prompt tokens, by the profile's tokenizer


async def messages(t: Transport, body: bytes) -> None:
    """Answer a /v1/messages request, streamed or whole."""
    planned = await off_loop(t.server, plan, t, body)
    if isinstance(planned, Relayed):  # the one place a model on another server differs
        try:
            return await _relay(t, planned)
        except upstream.Down as exc:
            if planned.model.fallback is None or t.started:
                raise
            t.record.fallback = planned.model.fallback
            t.record.error = exc.message
            planned = await off_loop(t.server, plan, t, body, planned.model.fallback)
    await _generate(t, planned)


async def count_tokens(t: Transport, body: bytes) -> wire.TokenCount:
    """Count a /v1/messages/count_tokens request's prompt, as the model that serves it would."""
    tokens = await off_loop(t.server, _count, t, body)
    if isinstance(tokens, tuple):  # a model on another server: it counts
        request, engine = tokens
        t.record.upstream = engine.url
        server = t.server
        tokens = await upstream.count_tokens(
            engine, request, body, t.headers,
            keep_billing_header=server.profile.prompt.keep_billing_header, wait=engine.model.timeout_connect + server.profile.timeouts.idle,
        )
        t.record.prompt_tokens = tokens
    return wire.TokenCount(input_tokens=tokens)


def plan(t: Transport, body: bytes, key: str | None = None) -> Planned | Relayed:
    """Decode, check and render a request, and build its job: in a worker thread, so
    that a large request never holds up other streams, pings or /health. (`key`: the
    model that serves it, when it is not the one asked for: a fallback.)"""
    request: wire.MessagesRequest = wire.decode_request(body)
    server, record = t.server, t.record
    _describe(t, request)
    record.stream = request.stream
    if server.profile.log.bodies:
        record.request = msgspec.Raw(body)
    key, engine, scheduler = server.engine_for(request.model, key)
    model = server.profile.models[key]
    if isinstance(engine, upstream.Upstream):
        # message_start's count of the prompt: the upstream's, or the profile's tokenizer's
        # for an OpenAI-API one (which counts only at the end), else an estimate.
        counted = _upstream_prompt_tokens(server, request, engine) if engine.tokenizer is not None and model.api == "openai" else None
        return Relayed(request, body, model, engine, scheduler, counted)
    loaded = engine.loaded
    rendered = prompt.render(request, loaded.tokenizer, keep_billing_header=server.profile.prompt.keep_billing_header, vision=loaded.vision)
    record.prompt_tokens = len(rendered.ids)
    record.checkpoint_tokens = rendered.checkpoint or None
    if unseen := rendered.images:
        record.images_unseen = unseen
        if key not in server.warned_images:  # once per model, in the daemon's output
            server.warned_images.add(key)
            print(f"anyclaude: model {key!r} cannot see images; they reach it as a note saying so", file=sys.stderr, flush=True)
    context = loaded.context_length
    # A prompt that leaves less room than this for the answer is refused, with the
    # error Claude Code compacts on, rather than answered in a handful of tokens.
    room = min(ANSWER_FLOOR, request.max_tokens)
    if len(rendered.ids) > context - room:
        raise prompt_too_long(len(rendered.ids), context - room)
    # Claude Code asks for 32-64K tokens whatever the model: clamp, don't refuse.
    max_tokens = min(request.max_tokens, model.max_tokens, context - len(rendered.ids))
    defaults = server.profile.sampling
    top_k = defaults.top_k if request.top_k is None else request.top_k
    forced = _forced_call(request.tool_choice, rendered, loaded.tokenizer)
    lazy = None if forced else _lazy_calls(request.tool_choice, rendered, loaded.tokenizer)
    job = Job(
        prompt=rendered.ids,
        checkpoint=rendered.checkpoint,
        max_tokens=max_tokens,
        sampling=Sampling(
            temperature=defaults.temperature if request.temperature is None else request.temperature,
            top_p=defaults.top_p if request.top_p is None else request.top_p,
            # As many as the vocabulary or more keeps every token: no top-k at all.
            top_k=0 if top_k >= loaded.vocab_size else top_k,
            repetition_penalty=defaults.repetition_penalty,
        ),
        processors=_together(forced, lazy, budget.for_request(request, rendered, max_tokens)),
        grammar=forced is not None,
        side=(rank := _rank(t, request)) == SIDE,
        rank=rank,
        images=rendered.seen_images,
        reply_start=rendered.reply_start,
        user_turn=rendered.user_turn,
    )
    record.side = job.side or None
    record.call_grammar = "forced" if forced else "held" if lazy else None
    return Planned(request, rendered, scheduler, engine, job, bool(forced or lazy))


async def _generate(t: Transport, planned: Planned) -> None:
    server, record = t.server, t.record
    request, rendered, scheduler, engine = planned.request, planned.rendered, planned.scheduler, planned.engine
    session = (record.session_id, request.model) if record.session_id else None
    timeouts = _timeouts(server)
    # What the prefix cache holds now; if it changes before the engine gets here
    # (eviction while queued), message_delta carries the true figures.
    cached = engine.cache.peek(rendered.cache_key) if engine.cache else 0
    stream = MessageStream(
        model=request.model,
        input_tokens=len(rendered.ids) - cached,
        cache_read=cached,
        show_thinking=not (request.thinking and request.thinking.display == "omitted"),
    )
    choice = request.tool_choice or wire.ToolChoice()
    # tool_choice none: the tools stay in the prompt, but no call is made.
    # A grammar makes a call's arguments valid as they come: they stream.
    parser = toolcalls.Parser(
        rendered.format, [] if choice.type == "none" else rendered.tools, thinking=rendered.thinking_open, stream_calls=planned.held
    )
    output = Output(engine.loaded.tokenizer, parser, request.stop_sequences)
    single_call = choice.disable_parallel_tool_use
    # Admission before any headers: a full queue is a plain 529 the SDKs retry.
    generation = t.generation = scheduler.submit(planned.job)
    if session and engine.cache and t.header(b"x-claude-code-context-compacted") and (old := server.sessions.last(session)) is not None:
        # Claude Code compacted the conversation: the old one will not come back.
        record.cache_demoted = engine.cache.demote(old.tolist(), beyond=rendered.checkpoint)
    located = None
    if session and (position := server.sessions.check(session, rendered.cache_key)) is not None:
        # Finding the part renders the request several times: in a thread, while
        # the answer is generated, not before it on the event loop.
        located = (position, asyncio.create_task(asyncio.to_thread(misses.locate, request, engine.loaded.tokenizer, rendered.cache_key, position, engine.loaded.vision)))
    watcher = t.on_hang_up(generation)
    events = [] if server.profile.log.bodies else None
    try:
        if request.stream:
            await t.open_stream()
            outcome = await drive(stream, generation, output, _sending(t, events), timeouts, single_call=single_call)
        else:
            events, collect, quiet = _collecting(t, timeouts)
            outcome = await drive(stream, generation, output, collect, quiet, single_call=single_call)
        _record_outcome(record, generation, outcome)
        if session:
            server.sessions.remember(session, rendered.cache_key + outcome.tokens)
        if located is not None:
            position, part = located
            record.cache_miss = misses.Miss(position=position, part=await part)
        await _answer(t, request, outcome, events)
    finally:
        watcher.cancel()
        generation.cancel()


async def _relay(t: Transport, planned: Relayed) -> None:
    """A request for a model on another server: sent there, its answer turned into
    this daemon's events by the same state machine, watchdog and pings as a local one."""
    server, request, engine, record = t.server, planned.request, planned.engine, t.record
    timeouts = _timeouts(server)
    record.upstream = engine.url
    opening = asyncio.get_running_loop().create_task(
        upstream.start(
            engine, planned.gate, request, planned.body, t.headers,
            keep_billing_header=server.profile.prompt.keep_billing_header, wait=timeouts.first_token,
        )
    )
    # A client that hangs up while the upstream has not answered yet cancels the
    # request to it, then the call once there is one.
    pending = _Pending(opening)
    watcher = t.on_hang_up(pending)
    try:
        call, latency = await opening
    except asyncio.CancelledError:
        watcher.cancel()
        if not t.disconnected.is_set():
            raise
        record.outcome = "cancelled"
        return
    except AnthropicError as exc:
        watcher.cancel()
        record.upstream_status = getattr(exc, "upstream_status", None)
        raise
    except BaseException:
        watcher.cancel()
        raise
    pending.call = call
    if t.disconnected.is_set():
        call.cancel()
    record.upstream_status, record.upstream_s = call.status, round(latency, 3)
    # Until the upstream counts the prompt (an OpenAI-API one does so at the end, and
    # message_delta carries its figures): the profile's tokenizer's count, or about
    # four bytes of request to a token.
    stream = MessageStream(model=request.model, input_tokens=planned.counted or max(1, len(planned.body) // 4), show_thinking=not (request.thinking and request.thinking.display == "omitted"))
    single_call = (request.tool_choice or wire.ToolChoice()).disable_parallel_tool_use
    events = [] if server.profile.log.bodies else None
    try:
        if request.stream:
            sending = _sending(t, events)

            async def send(batch: list) -> bool:
                # Headers once the upstream has answered something: an upstream that
                # breaks before it did is a plain status the SDKs retry.
                if not t.started and not t.disconnected.is_set():
                    await t.open_stream()
                return await sending(batch)

            outcome = await relay(stream, call, send, timeouts, single_call=single_call)
        else:
            events, collect, quiet = _collecting(t, timeouts)
            outcome = await relay(stream, call, collect, quiet, single_call=single_call)
        _record_outcome(record, None, outcome)
        record.prompt_tokens = stream.usage.input_tokens + stream.usage.cache_read_input_tokens
        if outcome.error and not t.started:  # nothing sent yet: a plain status
            raise outcome.error
        await _answer(t, request, outcome, events)
    finally:
        watcher.cancel()
        call.cancel()


async def _answer(t: Transport, request: wire.MessagesRequest, outcome, events: list | None) -> None:
    """The end of a response: a stream's error event and its end, or the whole message.
    (`events`: what the stream sent, when the log keeps bodies; a whole one's, always.)"""
    if request.stream:
        if events and (message := accumulate(events)) is not None:
            t.record.response = message  # what the client was sent, put together
        if outcome.error and not t.disconnected.is_set():
            await t.send_events([envelope(outcome.error, t.request_id)])
        if t.started:
            await t.end_stream()
        return
    if outcome.error:
        raise outcome.error
    if not outcome.cancelled:
        message = accumulate(events)
        if t.server.profile.log.bodies:
            t.record.response = message
        await t.send_json(200, message)


def _timeouts(server: Server) -> Timeouts:
    t = server.profile.timeouts
    return Timeouts(t.first_token, t.idle, t.total, t.ping_interval, profile=server.loaded.name)


def _sending(t: Transport, kept: list | None):
    """The stream's sender: the transport's, keeping a copy of the events in `kept` (for the log)."""
    if kept is None:
        return t.send_events

    async def send(batch: list) -> bool:
        kept.extend(batch)
        return await t.send_events(batch)

    return send


def _collecting(t: Transport, timeouts: Timeouts):
    """For a response sent whole: the list the stream's events gather in, the sender
    that gathers them, and the timeouts with no pings (nothing is sent meanwhile)."""
    events: list = []

    async def collect(batch: list) -> bool:
        events.extend(batch)
        return not t.disconnected.is_set()

    return events, collect, msgspec.structs.replace(timeouts, ping_interval=timeouts.first_token)


def _count(t: Transport, body: bytes) -> int | tuple:
    """Decode and render a count_tokens request (a worker thread: it may be large)."""
    request = wire.decode_request(body, wire.CountTokensRequest)
    _describe(t, request)
    server = t.server
    _, engine, _ = server.engine_for(request.model)
    if isinstance(engine, upstream.Upstream):
        if engine.model.api == "openai" and engine.tokenizer is not None:  # its server cannot count: this does
            tokens = _upstream_prompt_tokens(server, request, engine)
            t.record.prompt_tokens = tokens
            return tokens
        return request, engine
    loaded = engine.loaded
    rendered = prompt.render(request, loaded.tokenizer, keep_billing_header=server.profile.prompt.keep_billing_header, vision=loaded.vision)
    t.record.prompt_tokens = len(rendered.ids)
    return len(rendered.ids)


def _upstream_prompt_tokens(server: Server, request: wire.CountTokensRequest, engine: upstream.Upstream) -> int:
    keep = server.profile.prompt.keep_billing_header
    return len(prompt.render(request, engine.tokenizer, keep_billing_header=keep).ids)


def _describe(t: Transport, request: wire.CountTokensRequest) -> None:
    record, profile = t.record, t.server.profile
    record.model = request.model
    record.resolved_model = profile.resolve(request.model)
    if record.resolved_model:
        record.model_path = profile.models[record.resolved_model].where
    record.messages = len(request.messages)
    record.tools = len(request.tools or [])
    record.system_chars = len(prompt.system_text(request.system))
    record.session_id = _session_id(t, request)
    record.request_class = t.header(b"x-claude-code-request-class")
    record.agent_id = t.header(b"x-claude-code-agent-id")
    record.parent_agent_id = t.header(b"x-claude-code-parent-agent-id")


def _rank(t: Transport, request: wire.MessagesRequest) -> int:
    """Where a request goes in its engine's queue (RANKS): Claude Code says
    what it is in its hint header; without one, its haiku model is what it uses for
    side requests (a title, a classifier)."""
    if kind := t.header(b"x-claude-code-request-class"):
        return RANKS.get(kind, 0)
    return SIDE if "haiku" in request.model else 0


def _session_id(t: Transport, request: wire.CountTokensRequest) -> str | None:
    if header := t.header(b"x-claude-code-session-id"):
        return header
    user_id = getattr(getattr(request, "metadata", None), "user_id", None)
    if user_id and user_id.startswith("{"):
        try:
            return json.loads(user_id).get("session_id")
        except (ValueError, AttributeError):
            return None
    return None


def _record_outcome(record: logs.Record, generation: Generation | None, outcome) -> None:
    if generation is not None and generation.submitted_at is not None and generation.started_at is not None:
        record.queue_wait_s = round(generation.started_at - generation.submitted_at, 3)
    record.outcome = outcome.outcome
    record.stop_reason = outcome.stop_reason
    record.output_tokens = outcome.output_tokens
    record.cached_tokens = outcome.cached_tokens
    record.cache_source = outcome.cache_source
    record.cache_lookup = outcome.cache_lookup
    record.prefill_s = None if outcome.prefill_seconds is None else round(outcome.prefill_seconds, 3)
    if outcome.first_token_seconds is not None:
        record.ttft_s = round(outcome.first_token_seconds, 3)
    if outcome.decode_seconds > 0 and outcome.output_tokens > 1:
        record.decode_tps = round((outcome.output_tokens - 1) / outcome.decode_seconds, 2)
    if outcome.error:
        record.error = outcome.error.message
    if outcome.tool_parse_errors:
        record.tool_parse_errors = outcome.tool_parse_errors


class _Pending:
    """What a hang-up cancels while a request goes to its upstream: the sending, then the call."""

    def __init__(self, opening: asyncio.Task):
        self.opening = opening
        self.call = None

    def cancel(self) -> None:
        self.opening.cancel()
        if self.call is not None:
            self.call.cancel()


def _forced_call(choice: wire.ToolChoice | None, rendered: prompt.Rendered, tokenizer):
    """For tool_choice any/tool: a grammar that lets the model write only a valid call,
    compiled now so that a schema no grammar can express is a 400, or None."""
    if choice is None or choice.type not in ("any", "tool"):
        return None
    names = {t["function"]["name"] for t in rendered.tools}
    if not names:
        raise InvalidRequest(f"tool_choice: {choice.type} needs tools")
    if choice.type == "tool" and choice.name not in names:
        raise InvalidRequest(f"tool_choice.name: no tool named {choice.name!r} among the tools")
    if not constrain.supports(rendered.format, tokenizer):
        # Families without a call grammar are asked, not forced.
        return None
    name = choice.name if choice.type == "tool" else None
    try:
        processor = constrain.forced_call(tokenizer, rendered.tools, name, rendered.format)
    except constrain.ConstraintError as exc:
        raise InvalidRequest(f"tools: {exc}") from None
    return lambda tokenizer: [processor]


def _lazy_calls(choice: wire.ToolChoice | None, rendered: prompt.Rendered, tokenizer):
    """For an answer that may call a tool: a grammar that holds each call to its tool's
    schema from the moment its marker is written, or None (no tools, a family without
    such a marker, or a schema no grammar can express: then calls come whole)."""
    if not rendered.tools or (choice is not None and choice.type == "none") or not constrain.supports(rendered.format, tokenizer):
        return None
    try:
        processor = constrain.lazy_calls(tokenizer, rendered.tools, rendered.format)
    except constrain.ConstraintError:
        return None
    return None if processor is None else lambda tokenizer: [processor]


def _together(*factories):
    """One `Job.processors` factory for several (None where there are none)."""
    factories = [f for f in factories if f is not None]
    if not factories:
        return None
    return lambda tokenizer: [p for f in factories for p in f(tokenizer)]


async def off_loop(server: Server, function, *args):
    """Run `function` in a prompt thread, counted in /health's `preparing`."""
    server.preparing += 1
    try:
        return await asyncio.get_running_loop().run_in_executor(_prompt_threads, function, *args)
    finally:
        server.preparing -= 1


# Rendering and tokenizing: threads of their own, so that large requests wait for each
# other, never for the threads other work uses.
_prompt_threads = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="anyclaude-prompt")
