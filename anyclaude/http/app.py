"""The ASGI application: routing, body limits, auth, request ids, errors, and the SSE and
JSON transport. What a request means is the `api` package's; this is the HTTP around it."""

from __future__ import annotations

import asyncio
import hmac
import json
import os
import signal
import sys
import time
from collections.abc import Callable
from typing import Any

import msgspec

from .. import lifeline, logs, profiles, reload
from ..api import messages, models, wire
from ..api.errors import AnthropicError, ApiError, InvalidRequest, NotFound, Overloaded, RequestTooLarge, Unauthorized, envelope
from ..api.stream import new_id, sse
from ..server import Server

# Probes and polls that would drown the request log.
_UNLOGGED = {"/", "/health", "/api/hello"}


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
        # (Work the engine has not begun holds no cache entry to wait for.)
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
            return await self.send_json(200, {"status": "ok"})
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
            return await self.send_json(200, models.model_list(self.server))
        if path.startswith("/v1/models/"):
            self._allow(method, "GET")
            return await self.send_json(200, models.model_info(self.server, path.removeprefix("/v1/models/")))
        if path.startswith("/api/") and method == "POST":
            # Claude Code's housekeeping (event logging and the like): accepted, dropped.
            await self._body()
            return await self.send_json(200, {})
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
        status, body = models.health(self.server)
        await self.send_json(status, body)

    async def _messages(self) -> None:
        await messages.messages(self, await self._body())

    async def _count_tokens(self) -> None:
        await self.send_json(200, await messages.count_tokens(self, await self._body()))

    # --- what the use case needs of the connection (api.messages.Transport) -----

    @property
    def headers(self) -> list[tuple[bytes, bytes]]:
        return self.scope["headers"]

    def header(self, name: bytes) -> str | None:
        value = dict(self.scope["headers"]).get(name)
        return value.decode(errors="replace") if value else None

    async def open_stream(self) -> None:
        await self._start(200, "text/event-stream", {"cache-control": "no-cache"})

    def on_hang_up(self, cancellable) -> asyncio.Task:
        return asyncio.get_running_loop().create_task(self._watch_disconnect(cancellable))

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

    async def send_events(self, events: list) -> bool:
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

    async def end_stream(self) -> None:
        self._log()
        try:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:
            self.disconnected.set()

    async def send_json(self, status: int, body: Any, extra: dict[str, str] | None = None) -> None:
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
            await self.send_events([envelope(exc, self.request_id)])
            await self.end_stream()
            return
        await self.send_json(exc.status, envelope(exc, self.request_id), exc.headers)


def create_app() -> App:
    """The ASGI app for the profile named in ANYCLAUDE_PROFILE (set by `anyclaude serve`)."""
    loaded = profiles.load(os.environ["ANYCLAUDE_PROFILE"])
    return App(Server(loaded, exposed=not profiles.loopback(os.environ.get("ANYCLAUDE_HOST", "127.0.0.1"))))


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
