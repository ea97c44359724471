"""The ASGI application: routing, body limits, request ids, errors, and the SSE transport."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from datetime import datetime, timezone
from typing import Any

import msgspec

from . import profiles, prompt, wire
from .engine import Engine, Job, Sampling
from .errors import AnthropicError, ApiError, InvalidRequest, NotFound, NotReady, RequestTooLarge, envelope, prompt_too_long
from .models import loader
from .output import Output
from .stream import MessageStream, accumulate, drive, new_id, sse

MAX_BODY = 32 * 1024 * 1024
_CREATED = "2026-01-01T00:00:00Z"


class Server:
    """The daemon's state: the active profile and one engine per model it names."""

    def __init__(self, loaded: profiles.Loaded):
        self.loaded = loaded
        self.engines: dict[str, Engine] = {}

    @property
    def profile(self) -> profiles.Profile:
        return self.loaded.profile

    def start(self) -> None:
        p = self.profile
        for key, model in p.models.items():
            engine = Engine(loader(model, p.engine, self.loaded.path.parent), prefill_step=p.engine.prefill_step, name=f"engine-{key}")
            self.engines[key] = engine
            engine.start()

    def engine_for(self, requested: str) -> Engine:
        key = self.profile.resolve(requested)
        if key is None:
            raise NotFound(f"model: {requested} is not served by profile {self.loaded.name!r}")
        engine = self.engines[key]
        if engine.load_error:
            raise ApiError(f"model {key!r} failed to load: {engine.load_error}")
        if not engine.ready:
            raise NotReady("the model is still loading; try again shortly")
        return engine

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines.values())


class App:
    """ASGI 3 entry point."""

    def __init__(self, server: Server):
        self.server = server

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
                asyncio.get_running_loop().create_task(self._announce())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                for engine in self.server.engines.values():
                    engine.stop()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def _announce(self) -> None:
        for key, engine in self.server.engines.items():
            await asyncio.to_thread(engine.wait_ready)  # waits on a threading.Event; MLX stays on its thread
            if engine.load_error:
                print(f"anyclaude: model {key!r} failed to load: {engine.load_error}", file=sys.stderr, flush=True)
            else:
                loaded = engine.loaded
                print(f"anyclaude: model {key!r} ready ({loaded.context_length} tokens of context; {loaded.device})", flush=True)


class Exchange:
    """One HTTP request and its response."""

    def __init__(self, server: Server, scope: dict, receive, send):
        self.server, self.scope, self.receive, self.send = server, scope, receive, send
        self.request_id = new_id("req_")
        self.started = False
        self.disconnected = asyncio.Event()

    async def run(self) -> None:
        try:
            await self._route()
        except AnthropicError as exc:
            await self._error(exc)
        except Exception as exc:  # a bug must still answer in the envelope, and be visible
            print(f"anyclaude: {self.request_id}: {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
            await self._error(ApiError(f"internal error: {type(exc).__name__}"))

    async def _route(self) -> None:
        method, path = self.scope["method"], self.scope["path"].rstrip("/") or "/"
        if path.startswith("/v1/v1/"):  # ANTHROPIC_BASE_URL set with a trailing /v1
            path = path[3:]
        if path in ("/", "/api/hello") and method in ("HEAD", "GET"):
            return await self._json(200, {"status": "ok"})
        if path == "/health" and method in ("GET", "HEAD"):
            return await self._health()
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

    def _allow(self, method: str, allowed: str) -> None:
        if method != allowed:
            raise InvalidRequest(f"{method} is not allowed here; use {allowed}")

    # --- endpoints -----------------------------------------------------------

    async def _health(self) -> None:
        server = self.server
        models = {
            key: "failed" if e.load_error else "ready" if e.ready else "loading" for key, e in server.engines.items()
        }
        status = "ready" if server.ready else "loading"
        body = {"status": status, "profile": server.loaded.name, "profile_path": str(server.loaded.path), "models": models}
        await self._json(200 if server.ready else 503, body)

    async def _count_tokens(self) -> None:
        request = wire.decode_request(await self._body(), wire.CountTokensRequest)
        engine = self.server.engine_for(request.model)
        rendered = prompt.render(request, engine.loaded.tokenizer)
        await self._json(200, wire.TokenCount(input_tokens=len(rendered.ids)))

    async def _messages(self) -> None:
        request: wire.MessagesRequest = wire.decode_request(await self._body())
        server = self.server
        engine = server.engine_for(request.model)
        key = server.profile.resolve(request.model)
        model = server.profile.models[key]
        rendered = prompt.render(request, engine.loaded.tokenizer)
        context = engine.loaded.context_length
        if len(rendered.ids) >= context:
            raise prompt_too_long(len(rendered.ids), context)
        # Claude Code asks for 32-64K tokens whatever the model: clamp, don't refuse.
        max_tokens = min(request.max_tokens, model.max_tokens, context - len(rendered.ids))
        defaults = server.profile.sampling
        job = Job(
            prompt=rendered.ids,
            max_tokens=max_tokens,
            sampling=Sampling(
                temperature=defaults.temperature if request.temperature is None else request.temperature,
                top_p=defaults.top_p if request.top_p is None else request.top_p,
                top_k=defaults.top_k if request.top_k is None else request.top_k,
            ),
        )
        stream = MessageStream(model=request.model, input_tokens=len(rendered.ids))
        output = Output(engine.loaded.tokenizer, request.stop_sequences)
        watcher = asyncio.get_running_loop().create_task(self._watch_disconnect())
        try:
            if request.stream:
                await self._start(200, "text/event-stream", {"cache-control": "no-cache"})
                generation = engine.submit(job)
                outcome = await drive(
                    stream, generation, output, self._send_events, ping_interval=server.profile.timeouts.ping_interval
                )
                if outcome.error and not self.disconnected.is_set():
                    await self._send_events([envelope(outcome.error, self.request_id)])
                await self._finish_body()
            else:
                events: list = []

                async def collect(batch: list) -> bool:
                    events.extend(batch)
                    return not self.disconnected.is_set()

                generation = engine.submit(job)
                outcome = await drive(stream, generation, output, collect, ping_interval=3600.0)
                if outcome.error:
                    raise outcome.error
                if not outcome.cancelled:
                    await self._json(200, accumulate(events))
        finally:
            watcher.cancel()

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
        engine = self.server.engines.get(key)
        context = engine.loaded.context_length if engine and engine.ready else model.context_length
        return wire.ModelInfo(
            id=name,
            display_name=model.display_name or f"{name} ({key})",
            created_at=_CREATED,
            max_input_tokens=context,
            max_tokens=model.max_tokens,
        )

    # --- transport -------------------------------------------------------------

    async def _body(self) -> bytes:
        chunks, size = [], 0
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                raise ApiError("client disconnected")
            chunk = message.get("body", b"")
            size += len(chunk)
            if size <= MAX_BODY:
                chunks.append(chunk)
            elif size > 4 * MAX_BODY:
                raise RequestTooLarge(f"request body is larger than {MAX_BODY} bytes")
            if not message.get("more_body", False):
                break
        # An oversized body is read to its end (up to a point) so that the client,
        # still sending, gets to read the 413 instead of a broken connection.
        if size > MAX_BODY:
            raise RequestTooLarge(f"request body is larger than {MAX_BODY} bytes")
        return b"".join(chunks)

    async def _watch_disconnect(self) -> None:
        while True:
            message = await self.receive()
            if message["type"] == "http.disconnect":
                self.disconnected.set()
                return

    async def _start(self, status: int, content_type: str, extra: dict[str, str] | None = None) -> None:
        headers = [(b"content-type", content_type.encode()), (b"request-id", self.request_id.encode())]
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        self.started = True
        await self.send({"type": "http.response.start", "status": status, "headers": headers})

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
        return True

    async def _finish_body(self) -> None:
        try:
            await self.send({"type": "http.response.body", "body": b"", "more_body": False})
        except Exception:
            self.disconnected.set()

    async def _json(self, status: int, body: Any, extra: dict[str, str] | None = None) -> None:
        data = wire.encoder.encode(body) if isinstance(body, msgspec.Struct) else json.dumps(body).encode()
        await self._start(status, "application/json", extra)
        if self.scope["method"] == "HEAD":
            data = b""
        await self.send({"type": "http.response.body", "body": data, "more_body": False})

    async def _error(self, exc: AnthropicError) -> None:
        if self.disconnected.is_set():
            return
        if self.started:  # headers are out: the error event is the only channel left
            await self._send_events([envelope(exc, self.request_id)])
            await self._finish_body()
            return
        await self._json(exc.status, envelope(exc, self.request_id), exc.headers)


def create_app() -> App:
    """The ASGI app for the profile named in ANYCLAUDE_PROFILE (set by `anyclaude serve`)."""
    loaded = profiles.load(os.environ["ANYCLAUDE_PROFILE"])
    return App(Server(loaded))
