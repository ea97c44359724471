"""The ASGI application: routing, body limits, request ids, errors, and the SSE transport."""

from __future__ import annotations

import asyncio
import concurrent.futures
import hmac
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from .. import budget, constrain, lifeline, logs, misses, profiles, prompt, reload, toolcalls, upstream
from ..api import wire
from ..engine.events import Job, Sampling
from ..engine.scheduler import RANKS, SIDE
from ..server import Server
from ..api.errors import (
    AnthropicError,
    ApiError,
    InvalidRequest,
    NotFound,
    Overloaded,
    RequestTooLarge,
    Unauthorized,
    envelope,
    prompt_too_long,
)
from ..output import Output
from ..api.stream import MessageStream, Timeouts, accumulate, drive, new_id, relay, sse

# Probes and polls that would drown the request log.
_UNLOGGED = {"/", "/health", "/api/hello"}
_CREATED = "2026-01-01T00:00:00Z"


class App:
    """ASGI 3 entry point."""

    def __init__(self, server: Server):
        self.server = server
        self._stop = asyncio.Event()

    async def __call__(self, scope: dict, receive, send) -> None:
        if scope["type"] == "lifespan":
            await self._lifespan(receive, send)
        elif scope["type"] == "http":
            await Exchange(self.server, scope, receive, send).run()

    async def _lifespan(self, receive, send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                self.server.start()
                loop = asyncio.get_running_loop()
                loop.create_task(self._announce())
                loop.create_task(reload.watch(self.server, self._stop))
                _when_told_to_exit(loop, self.server.stopping)
                lifeline.watch_parent()
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                self._stop.set()
                self.server.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _announce(self) -> None:
        for key, engine in self.server.engines.items():
            await asyncio.to_thread(engine.wait_ready)  # waits on a threading.Event; MLX stays on its thread
            if engine.load_error:
                print(f"anyclaude: model {key!r} failed to load: {engine.load_error}", file=sys.stderr, flush=True)
            else:
                loaded = engine.loaded
                context = f"{loaded.context_length} tokens of context" if loaded.context_length else "context unknown"
                print(f"anyclaude: model {key!r} ready ({context}; {loaded.device})", flush=True)


class Exchange:
    """One HTTP request and its response."""

    def __init__(self, server: Server, scope: dict, receive, send):
        self.server, self.scope, self.receive, self.send = server, scope, receive, send
        self.request_id = new_id("req_")
        self.started = False
        self.status = 0
        self.last_event: str | None = None
        self.disconnected = asyncio.Event()
        self.clock = time.monotonic()
        self.logged = False
        self.written = False
        self.generation = None  # the engine's work for this request, once submitted
        # The request log line, filled in as the request goes.
        self.record = logs.Record(
            ts=logs.now(),
            request_id=self.request_id,
            outcome="complete",
            profile=server.loaded.name,
            revision=server.revision,
            path=scope["path"],
        )

    async def run(self) -> None:
        try:
            await self._route()
        except AnthropicError as exc:
            self.record.outcome = "overloaded" if isinstance(exc, Overloaded) else "error"
            self.record.error = exc.message
            await self._error(exc)
        except Exception as exc:  # a bug must still answer in the envelope, and be visible
            print(f"anyclaude: {self.request_id}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            self.record.outcome, self.record.error = "error", f"{type(exc).__name__}: {exc}"
            await self._error(ApiError(f"internal error: {type(exc).__name__}"))
        finally:
            self._log()

    def _log(self) -> None:
        """Write the request's log line, once: just before the response's last byte, so
        that a client that has read the whole response can find its line.

        When the response ends before the engine does (a hang-up, a timeout, a stop
        sequence), the line waits for the engine, which stops within a step, to say what
        became of the request's cache entry; it is written as /health shows the engine
        free (or after the idle timeout, should the engine not stop)."""
        if self.logged or self.scope["path"] in _UNLOGGED or self.scope["path"].startswith("/api/"):
            return
        self.logged = True
        record = self.record
        record.status = self.status
        record.ended = self.last_event if record.stream else None
        record.duration_s = round(time.monotonic() - self.clock, 3)
        generation = self.generation
        # (Work cancelled before an engine took it is never handed to one.)
        if generation is None or generation.ended or generation.started_at is None:
            self._write()
            return
        late = asyncio.get_running_loop().call_later(self.server.profile.timeouts.idle, self._write)

        def ended() -> None:
            late.cancel()
            self._write()

        generation.when_ended(ended)

    def _write(self) -> None:
        if self.written:
            return
        self.written = True
        record = self.record
        if self.generation is not None:
            record.cache_store = self.generation.cache_store
        try:
            self.server.log.write(record)
        except OSError as exc:  # a full disk must not take the response down with it
            print(f"anyclaude: cannot write the request log: {exc}", file=sys.stderr, flush=True)

    async def _route(self) -> None:
        method, path = self.scope["method"], self.scope["path"].rstrip("/") or "/"
        if path.startswith("/v1/v1/"):  # ANTHROPIC_BASE_URL set with a trailing /v1
            path = path[3:]
        if path in ("/", "/api/hello") and method in ("HEAD", "GET"):
            return await self._json(200, {"status": "ok"})
        if path == "/health" and method in ("GET", "HEAD"):
            return await self._health()
        self._authenticate()
        if path == "/v1/messages":
            self._allow(method, "POST")
            return await self._messages()
        if path == "/v1/messages/count_tokens":
            self._allow(method, "POST")
            return await self._count_tokens()
        if path == "/v1/models":
            self._allow(method, "GET")
            return await self._json(200, self._model_list())
        if path.startswith("/v1/models/"):
            self._allow(method, "GET")
            return await self._json(200, self._model_info(path.removeprefix("/v1/models/")))
        if path.startswith("/api/") and method == "POST":
            # Claude Code's housekeeping (event logging and the like): accepted, dropped.
            await self._body()
            return await self._json(200, {})
        raise NotFound(f"{method} {path}: no such endpoint")

    def _authenticate(self) -> None:
        token = self.server.profile.server.auth_token
        if token is None:
            return
        headers = dict(self.scope["headers"])
        offered = headers.get(b"x-api-key") or b""
        bearer = headers.get(b"authorization") or b""
        if bearer[:7].lower() == b"bearer ":
            offered = offered or bearer[7:].strip()
        # Constant time, so the token cannot be guessed a byte at a time.
        if not hmac.compare_digest(offered, token.encode()):
            raise Unauthorized("invalid x-api-key")

    def _allow(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise InvalidRequest(f"{method} is not allowed here; use {allowed}")

    # --- endpoints -----------------------------------------------------------

    async def _health(self) -> None:
        server = self.server
        models = {key: _model_health(e, server.schedulers[key], server.profile.models[key]) for key, e in server.engines.items()}
        status = "ready" if server.ready else "loading"
        p = server.profile
        body = {
            "status": status,
            "profile": server.loaded.name,
            "profile_path": str(server.loaded.path),
            "revision": server.revision,
            "reload_error": server.reload_error,
            "reloading": server.reloading,
            # Requests being decoded and rendered (in threads of their own).
            "preparing": server.preparing,
            "models": models,
            "sampling": msgspec.to_builtins(p.sampling),
            "timeouts": msgspec.to_builtins(p.timeouts),
            "log": str(server.log.path),
            # The last failure to write the request log (a full disk, a read-only folder), or None.
            "log_error": server.log.error,
            # The `anyclaude serve` process (Granian's, which runs this worker), for `anyclaude stop`.
            "pid": int(os.environ["ANYCLAUDE_PID"]) if os.environ.get("ANYCLAUDE_PID") else None,
            # This process: Granian's worker under `anyclaude serve`, for a stop after the serve process died.
            "worker_pid": os.getpid(),
        }
        await self._json(200 if server.ready else 503, body)

    async def _count_tokens(self) -> None:
        body = await self._body()
        tokens = await self._off_loop(self._count, body)
        if isinstance(tokens, tuple):  # a model on another server: it counts
            request, engine = tokens
            self.record.upstream = engine.url
            tokens = await upstream.count_tokens(
                engine, request, body, self.scope["headers"],
                keep_billing_header=self.server.profile.prompt.keep_billing_header, wait=engine.model.timeout_connect + self.server.profile.timeouts.idle,
            )
            self.record.prompt_tokens = tokens
        await self._json(200, wire.TokenCount(input_tokens=tokens))

    def _count(self, body: bytes) -> int | tuple:
        """Decode and render a count_tokens request (a worker thread: it may be large)."""
        request = wire.decode_request(body, wire.CountTokensRequest)
        self._describe(request)
        _, engine, _ = self.server.engine_for(request.model)
        if isinstance(engine, upstream.Upstream):
            if engine.model.api == "openai" and engine.tokenizer is not None:  # its server cannot count: this does
                tokens = self._upstream_prompt_tokens(request, engine)
                self.record.prompt_tokens = tokens
                return tokens
            return request, engine
        loaded = engine.loaded
        rendered = prompt.render(request, loaded.tokenizer, keep_billing_header=self.server.profile.prompt.keep_billing_header, vision=loaded.vision)
        self.record.prompt_tokens = len(rendered.ids)
        return len(rendered.ids)

    def _upstream_prompt_tokens(self, request: wire.CountTokensRequest, engine: upstream.Upstream) -> int:
        keep = self.server.profile.prompt.keep_billing_header
        return len(prompt.render(request, engine.tokenizer, keep_billing_header=keep).ids)

    def _describe(self, request: wire.CountTokensRequest) -> None:
        record = self.record
        record.model = request.model
        record.resolved_model = self.server.profile.resolve(request.model)
        if record.resolved_model:
            record.model_path = self.server.profile.models[record.resolved_model].where
        record.messages = len(request.messages)
        record.tools = len(request.tools or [])
        record.system_chars = len(prompt.system_text(request.system))
        record.session_id = self._session_id(request)
        record.request_class = self._header(b"x-claude-code-request-class")
        record.agent_id = self._header(b"x-claude-code-agent-id")
        record.parent_agent_id = self._header(b"x-claude-code-parent-agent-id")

    def _header(self, name: bytes) -> str | None:
        value = dict(self.scope["headers"]).get(name)
        return value.decode(errors="replace") if value else None

    def _rank(self, request: wire.MessagesRequest) -> int:
        """Where a request goes in its engine's queue (RANKS): Claude Code says
        what it is in its hint header; without one, its haiku model is what it uses for
        side requests (a title, a classifier)."""
        if kind := self._header(b"x-claude-code-request-class"):
            return RANKS.get(kind, 0)
        return SIDE if "haiku" in request.model else 0

    def _session_id(self, request: wire.CountTokensRequest) -> str | None:
        if header := self._header(b"x-claude-code-session-id"):
            return header
        user_id = getattr(getattr(request, "metadata", None), "user_id", None)
        if user_id and user_id.startswith("{"):
            try:
                return json.loads(user_id).get("session_id")
            except (ValueError, AttributeError):
                return None
        return None

    async def _messages(self) -> None:
        body = await self._body()
        planned = await self._off_loop(self._plan, body)
        if isinstance(planned, _Relayed):  # the one place a model on another server differs
            try:
                return await self._relay(planned)
            except upstream.Down as exc:
                if planned.model.fallback is None or self.started:
                    raise
                self.record.fallback = planned.model.fallback
                self.record.error = exc.message
                planned = await self._off_loop(self._plan, body, planned.model.fallback)
        await self._generate(*planned)

    async def _relay(self, planned: _Relayed) -> None:
        """A request for a model on another server: sent there, its answer turned into
        this daemon's events by the same state machine, watchdog and pings as a local one."""
        server, request, engine = self.server, planned.request, planned.engine
        t = server.profile.timeouts
        timeouts = Timeouts(t.first_token, t.idle, t.total, t.ping_interval, profile=server.loaded.name)
        record = self.record
        record.upstream = engine.url
        opening = asyncio.get_running_loop().create_task(
            upstream.start(
                engine, planned.gate, request, planned.body, self.scope["headers"],
                keep_billing_header=server.profile.prompt.keep_billing_header, wait=t.first_token,
            )
        )
        # A client that hangs up while the upstream has not answered yet cancels the
        # request to it, then the call once there is one.
        pending = _Pending(opening)
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(pending))
        try:
            call, latency = await opening
        except asyncio.CancelledError:
            watcher.cancel()
            if not self.disconnected.is_set():
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
        if self.disconnected.is_set():
            call.cancel()
        record.upstream_status, record.upstream_s = call.status, round(latency, 3)
        # Until the upstream counts the prompt (an OpenAI-API one does so at the end, and
        # message_delta carries its figures): the profile's tokenizer's count, or about
        # four bytes of request to a token.
        stream = MessageStream(model=request.model, input_tokens=planned.counted or max(1, len(planned.body) // 4), show_thinking=not (request.thinking and request.thinking.display == "omitted"))
        single_call = (request.tool_choice or wire.ToolChoice()).disable_parallel_tool_use
        try:
            if request.stream:

                async def send(events: list) -> bool:
                    # Headers once the upstream has answered something: an upstream that
                    # breaks before it did is a plain status the SDKs retry.
                    if not self.started and not self.disconnected.is_set():
                        await self._start(200, "text/event-stream", {"cache-control": "no-cache"})
                    return await self._send_events(events)

                outcome = await relay(stream, call, send, timeouts, single_call=single_call)
                self._record_outcome(None, outcome)
                record.prompt_tokens = stream.usage.input_tokens + stream.usage.cache_read_input_tokens
                if outcome.error and not self.started:
                    raise outcome.error
                if outcome.error and not self.disconnected.is_set():
                    await self._send_events([envelope(outcome.error, self.request_id)])
                if self.started:
                    await self._finish_body()
            else:
                events, collect, quiet = self._collecting(timeouts)
                outcome = await relay(stream, call, collect, quiet, single_call=single_call)
                self._record_outcome(None, outcome)
                record.prompt_tokens = stream.usage.input_tokens + stream.usage.cache_read_input_tokens
                if outcome.error:
                    raise outcome.error
                if not outcome.cancelled:
                    message = accumulate(events)
                    if server.profile.log.bodies:
                        record.response = message
                    await self._json(200, message)
        finally:
            watcher.cancel()
            call.cancel()

    async def _generate(self, request, rendered, scheduler, engine, job, held) -> None:
        server = self.server
        session = (self.record.session_id, request.model) if self.record.session_id else None
        t = server.profile.timeouts
        timeouts = Timeouts(t.first_token, t.idle, t.total, t.ping_interval, profile=server.loaded.name)
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
            rendered.format, [] if choice.type == "none" else rendered.tools, thinking=rendered.thinking_open, stream_calls=held
        )
        output = Output(engine.loaded.tokenizer, parser, request.stop_sequences)
        single_call = choice.disable_parallel_tool_use
        # Admission before any headers: a full queue is a plain 529 the SDKs retry.
        generation = self.generation = scheduler.submit(job)
        if session and engine.cache and self._header(b"x-claude-code-context-compacted") and (old := server.sessions.last(session)) is not None:
            # Claude Code compacted the conversation: the old one will not come back.
            self.record.cache_demoted = engine.cache.demote(old.tolist(), beyond=rendered.checkpoint)
        located = None
        if session and (position := server.sessions.check(session, rendered.cache_key)) is not None:
            # Finding the part renders the request several times: in a thread, while
            # the answer is generated, not before it on the event loop.
            located = (position, asyncio.create_task(asyncio.to_thread(misses.locate, request, engine.loaded.tokenizer, rendered.cache_key, position, engine.loaded.vision)))
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect(generation))
        try:
            if request.stream:
                await self._start(200, "text/event-stream", {"cache-control": "no-cache"})
                outcome = await drive(stream, generation, output, self._send_events, timeouts, single_call=single_call)
                self._record_outcome(generation, outcome)
                if session:
                    server.sessions.remember(session, rendered.cache_key + outcome.tokens)
                if outcome.error and not self.disconnected.is_set():
                    await self._send_events([envelope(outcome.error, self.request_id)])
                await self._note_miss(located)
                await self._finish_body()
            else:
                events, collect, quiet = self._collecting(timeouts)
                outcome = await drive(stream, generation, output, collect, quiet, single_call=single_call)
                self._record_outcome(generation, outcome)
                if session:
                    server.sessions.remember(session, rendered.cache_key + outcome.tokens)
                await self._note_miss(located)
                if outcome.error:
                    raise outcome.error
                if not outcome.cancelled:
                    message = accumulate(events)
                    if server.profile.log.bodies:
                        self.record.response = message
                    await self._json(200, message)
        finally:
            watcher.cancel()
            generation.cancel()

    def _plan(self, body: bytes, key: str | None = None):
        """Decode, check and render a request, and build its job: in a worker thread, so
        that a large request never holds up other streams, pings or /health. (`key`: the
        model that serves it, when it is not the one asked for: a fallback.)"""
        request: wire.MessagesRequest = wire.decode_request(body)
        server = self.server
        self._describe(request)
        self.record.stream = request.stream
        if server.profile.log.bodies:
            self.record.request = msgspec.Raw(body)
        key, engine, scheduler = server.engine_for(request.model, key)
        model = server.profile.models[key]
        if isinstance(engine, upstream.Upstream):
            # message_start's count of the prompt: the upstream's, or the profile's tokenizer's
            # for an OpenAI-API one (which counts only at the end), else an estimate.
            counted = self._upstream_prompt_tokens(request, engine) if engine.tokenizer is not None and model.api == "openai" else None
            return _Relayed(request, body, model, engine, scheduler, counted)
        loaded = engine.loaded
        rendered = prompt.render(request, loaded.tokenizer, keep_billing_header=server.profile.prompt.keep_billing_header, vision=loaded.vision)
        self.record.prompt_tokens = len(rendered.ids)
        self.record.checkpoint_tokens = rendered.checkpoint or None
        if unseen := rendered.images:
            self.record.images_unseen = unseen
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
            side=(rank := self._rank(request)) == SIDE,
            rank=rank,
            images=rendered.seen_images,
        )
        self.record.side = job.side or None
        self.record.call_grammar = "forced" if forced else "held" if lazy else None
        return request, rendered, scheduler, engine, job, bool(forced or lazy)

    async def _off_loop(self, function, *args):
        """Run `function` in a prompt thread, counted in /health's `preparing`."""
        self.server.preparing += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(_prompt_threads, function, *args)
        finally:
            self.server.preparing -= 1

    async def _note_miss(self, located: tuple[int, asyncio.Task] | None) -> None:
        if located is not None:
            position, part = located
            self.record.cache_miss = misses.Miss(position=position, part=await part)

    def _record_outcome(self, generation, outcome) -> None:
        record = self.record
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

    def _model_list(self) -> wire.ModelList:
        data = [self._info(name) for name in self.server.profile.listed_names()]
        return wire.ModelList(
            data=data, has_more=False, first_id=data[0].id if data else None, last_id=data[-1].id if data else None
        )

    def _model_info(self, name: str) -> wire.ModelInfo:
        if self.server.profile.resolve(name) is None:
            raise NotFound(f"model: {name} not found")
        return self._info(name)

    def _info(self, name: str) -> wire.ModelInfo:
        key = self.server.profile.resolve(name)
        model = self.server.profile.models[key]
        loaded = getattr(self.server.engines.get(key), "loaded", None)  # read once, as in /health
        context = loaded.context_length if loaded else model.context_length
        return wire.ModelInfo(
            id=name,
            display_name=model.display_name or f"{name} ({key})",
            created_at=_CREATED,
            max_input_tokens=context,
            max_tokens=model.max_tokens,
        )

    # --- transport -------------------------------------------------------------

    async def _body(self) -> bytes:
        settings = self.server.profile.server
        limit = settings.max_body_mb * 1024 * 1024
        chunks, size = [], 0
        while True:
            try:
                message = await asyncio.wait_for(self.receive(), settings.body_timeout)
            except TimeoutError:
                raise InvalidRequest(f"the request body stopped arriving: nothing for {settings.body_timeout:g} s (server.body_timeout)") from None
            if message["type"] == "http.disconnect":
                # A body cut short (the client half-closed, or broke the chunked
                # encoding): a client still reading gets told so.
                raise InvalidRequest("the request body is incomplete or malformed: the connection ended before it did, or its chunked encoding broke")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= limit:
                chunks.append(chunk)
            elif size > 4 * limit:
                raise RequestTooLarge(f"request body is larger than {limit} bytes")
            if not message.get("more_body", False):
                break
        # An oversized body is read to its end (up to a point) so that the client,
        # still sending, gets to read the 413 instead of a broken connection.
        if size > limit:
            raise RequestTooLarge(f"request body is larger than {limit} bytes")
        return b"".join(chunks)

    async def _watch_disconnect(self, generation) -> None:
        """A client that hangs up has its generation cancelled at once: queued, prefilling
        (the engine stops within a prefill chunk) or decoding, streamed or not."""
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                generation.cancel()
                return

    async def _start(self, status: int, content_type: str, extra: dict[str, str] | None = None) -> None:
        headers = [(b"content-type", content_type.encode()), (b"request-id", self.request_id.encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        self.started = True
        self.status = status
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

    def _collecting(self, timeouts):
        """For a response sent whole: the list the stream's events gather in, the sender
        that gathers them, and the timeouts with no pings (nothing is sent meanwhile)."""
        events: list = []

        async def collect(batch: list) -> bool:
            events.extend(batch)
            return not self.disconnected.is_set()

        return events, collect, msgspec.structs.replace(timeouts, ping_interval=timeouts.first_token)

    async def _send_events(self, events: list) -> bool:
        """Send SSE events, awaiting the transport; False once the client is gone."""
        if self.disconnected.is_set():
            return False
        if not events:
            return True
        try:
            await self.send({"type": "http.response.body", "body": b"".join(sse(e) for e in events), "more_body": True})
        except Exception:  # the transport refuses writes after a disconnect
            self.disconnected.set()
            return False
        self.last_event = type(events[-1]).__struct_config__.tag
        return True

    async def _finish_body(self) -> None:
        self._log()
        try:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:
            self.disconnected.set()

    async def _json(self, status: int, body: Any, extra: dict[str, str] | None = None) -> None:
        data = wire.encoder.encode(body) if isinstance(body, msgspec.Struct) else json.dumps(body).encode()
        if self.scope["method"] == "HEAD":
            data = b""
        try:
            await self._start(status, "application/json", extra)
            self._log()
            await self.send({"type": "http.response.body", "body": data, "more_body": False})
        except Exception:  # the client is gone: nobody to answer
            self.disconnected.set()

    async def _error(self, exc: AnthropicError) -> None:
        if self.disconnected.is_set():
            return
        if self.started:  # headers are out: the error event is the only channel left
            await self._send_events([envelope(exc, self.request_id)])
            await self._finish_body()
            return
        await self._json(exc.status, envelope(exc, self.request_id), exc.headers)


class _Pending:
    """What a hang-up cancels while a request goes to its upstream: the sending, then the call."""

    def __init__(self, opening: asyncio.Task):
        self.opening = opening
        self.call = None

    def cancel(self) -> None:
        self.opening.cancel()
        if self.call is not None:
            self.call.cancel()


class _Relayed(msgspec.Struct):
    """A request planned for a model on another server: nothing to render here."""

    request: wire.MessagesRequest
    body: bytes
    model: profiles.Model
    engine: upstream.Upstream
    gate: upstream.Gate
    counted: int | None = None  # prompt tokens, by the profile's tokenizer


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


# The fewest tokens a prompt must leave for its answer (or max_tokens, if smaller).
ANSWER_FLOOR = 1024

# Rendering and tokenizing: threads of their own, so that large requests wait for each
# other, never for the threads other work uses.
_prompt_threads = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="anyclaude-prompt")


def create_app() -> App:
    """The ASGI app for the profile named in ANYCLAUDE_PROFILE (set by `anyclaude serve`)."""
    loaded = profiles.load(os.environ["ANYCLAUDE_PROFILE"])
    return App(Server(loaded, exposed=not profiles.loopback(os.environ.get("ANYCLAUDE_HOST", "127.0.0.1"))))


def _model_health(engine, scheduler, model: profiles.Model) -> dict:
    if isinstance(engine, upstream.Upstream):
        return engine.health(scheduler)
    # Read once: an engine being replaced lets go of its model on its own thread.
    loaded, cache = engine.loaded, engine.cache
    return {
        "state": "failed" if engine.load_error else "ready" if loaded else "loading",
        "running": scheduler.running,
        "waiting": scheduler.waiting,
        "context_length": loaded.context_length if loaded else None,
        "device": loaded.device if loaded else None,
        "cache_types": loaded.cache_types if loaded else None,
        # Whether it sees images (the mlx-vlm model type it was loaded as), or reads them as a note.
        "vision": (loaded.vision.kind if loaded.vision else None) if loaded else None,
        "cache_bytes": cache.bytes if cache else 0,
        "cache_peak_bytes": cache.peak_bytes if cache else 0,
        "cache_budget_bytes": cache.max_bytes if cache else 0,
        "cache_entries": cache.entries if cache else 0,
        "prefill_step": getattr(engine, "prefill_step", None),
        "max_batch": engine.max_batch,
        # KV copied to merge requests into a batch and out of it again, since the start.
        "batch_copied_bytes": getattr(engine, "batch_copied", 0),
        # Metal's wired limit while the model is loaded, in bytes (None: not on Metal).
        "wired_limit_bytes": getattr(engine, "wired_limit", None),
        "error": engine.load_error,
        "warning": getattr(engine, "warning", None),
        "path": model.path,
    }


def _when_told_to_exit(loop: asyncio.AbstractEventLoop, callback: Callable[[], None]) -> None:
    """Run `callback` on `loop` when this process gets SIGINT or SIGTERM.

    Granian stops a worker by waiting for its responses to end, and a generation can
    run for minutes: `callback` ends them at once instead. Granian's own handler is
    chained, and the one asyncio dispatches through its wakeup fd still runs."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        previous = signal.getsignal(sig)
        if not callable(previous):  # the default action (or none): leave it be
            continue

        def handler(signum, frame, previous=previous):
            loop.call_soon_threadsafe(callback)
            previous(signum, frame)

        try:
            signal.signal(sig, handler)
        except ValueError:  # not the main thread: Granian's handling alone
            return
