"""What every upstream shares: the stand-ins for an engine and its queue, one call's
events, the HTTP client, and the errors a server that is down or overloaded turns into.

An upstream API module (`anthropic`, `openai`) says how a request is written for its
API (`body`, `headers`) and how its streamed answer reads (a `Reader`); everything else
is here. Nothing of the upstream's bytes reaches the client: its events are parsed into
the events below, and anyclaude's stream state machine makes the Anthropic output.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
from collections.abc import AsyncIterator
from typing import Any

import httpx2
from msgspec import Struct

from .. import profiles
from ..api import wire
from ..api.errors import AnthropicError, InvalidRequest, NotFound, Overloaded, RequestTooLarge
from ..toolcalls import BadCall, ToolCall

RETRY_AFTER_SECONDS = 5
# /health asks an upstream again when nothing has been heard of it for this long.
STALE_SECONDS = 10.0


# --- what a call brings back, in order: Usage and Output any number of times, then
# Ended or Broke (nothing after either).


class Usage(Struct, frozen=True):
    """Token counts as the upstream reports them (None: not said in this event)."""

    input_tokens: int | None = None
    output_tokens: int | None = None
    cache_read: int | None = None
    cache_creation: int | None = None


class Output(Struct, frozen=True):
    """Pieces of the answer: toolcalls' Text, Thinking, CallStart, CallDelta, ToolCall, BadCall."""

    segments: list


class Ended(Struct, frozen=True):
    stop_reason: str
    stop_sequence: str | None = None


class Broke(Struct, frozen=True):
    """The answer cannot go on: the upstream hung up, sent an error, or the daemon stops.
    `overloaded`: worth a retry (Claude Code retries overloaded_error by itself);
    `invalid`: what the request asked cannot be had from this upstream (a 400)."""

    message: str
    overloaded: bool = True
    invalid: bool = False


Event = Usage | Output | Ended | Broke


class Down(Overloaded):
    """The upstream cannot take the request (refused, unreachable, 5xx, 529): a 529 with
    retry-after before any byte, or the model's fallback serves it."""

    def __init__(self, message: str, retry_after: str | None = None, status: int | None = None):
        super().__init__(message, headers={"retry-after": retry_after or str(RETRY_AFTER_SECONDS)})
        self.upstream_status = status  # None: no HTTP answer at all


class Refused(AnthropicError):
    """The upstream's own 4xx answer, passed on with its status and message (a prompt too
    long keeps its wording, which Claude Code compacts on)."""

    def __init__(self, status: int, kind: str, message: str, upstream_status: int | None = None):
        super().__init__(message)
        self.status, self.type = status, kind
        self.upstream_status = upstream_status or status


# --- the engine and queue stand-ins --------------------------------------------------


class Info(Struct):
    """What /health, /v1/models and the launcher read of a model (as `Engine.loaded`)."""

    context_length: int | None
    device: str
    weight_bytes: int = 0
    memory_budget: int = 0


class Upstream:
    """A model served by another server, in the place of an Engine: it has no MLX, no
    thread of its own and no prefix cache. It is ready once its /v1/models was asked
    (reachable or not: requests to an upstream that is down get 529s, not a hung daemon)."""

    cache = None
    load_error = None

    def __init__(self, key: str, model: profiles.Model, api: Any):
        self.key, self.model, self.api = key, model, api
        self.url = model.upstream.rstrip("/")
        self.loaded: Info | None = None
        self.reachable: bool | None = None  # None: not known yet
        self.last_error: str | None = None
        self.served: list[str] = []  # the model names its /v1/models lists
        self._ready = threading.Event()
        self._client: httpx2.AsyncClient | None = None
        self._checked = 0.0  # when reachability was last seen (monotonic)
        self._probing: threading.Thread | None = None
        # The profile's `tokenizer`, loaded (None: none named, or it failed: `tokenizer_error`).
        self.tokenizer: Any = None
        self.tokenizer_error: str | None = None

    # -- the Engine interface the server uses --

    def start(self) -> None:
        threading.Thread(target=self._start, name=f"upstream-{self.key}", daemon=True).start()

    def _start(self) -> None:
        if self.model.tokenizer:
            self._load_tokenizer(self.model.tokenizer)
        self._probe()

    def _load_tokenizer(self, spec: str) -> None:
        """A tokenizer (and chat template) to count prompts with; no MLX is involved."""
        from pathlib import Path

        from mlx_lm.utils import load_tokenizer

        from ..models import locate

        try:
            where = locate(spec)
            if not Path(where).exists():  # a Hugging Face repo id: its tokenizer files only
                from huggingface_hub import snapshot_download

                where = snapshot_download(where, allow_patterns=["*.json", "*.jinja", "*.model", "*.txt", "*.tiktoken"])
            self.tokenizer = load_tokenizer(Path(where))
        except Exception as exc:  # a count is a nicety: the model serves without one
            self.tokenizer_error = f"tokenizer {spec!r}: {type(exc).__name__}: {exc}"
            print(f"anyclaude: model {self.key!r}: cannot load its {self.tokenizer_error}", file=sys.stderr, flush=True)

    @property
    def ready(self) -> bool:
        return self._ready.is_set()

    def wait_ready(self, timeout: float | None = None) -> bool:
        return self._ready.wait(timeout)

    def stop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                asyncio.get_running_loop().create_task(client.aclose())
            except RuntimeError:  # no loop (a test, the daemon gone): the sockets go with the process
                pass

    def wait_stopped(self, timeout: float | None = None) -> None:
        pass

    def set_prefill_step(self, tokens: int | None) -> None:
        pass

    def set_max_batch(self, sequences: int | None) -> None:
        pass  # the upstream batches as it will

    def configure_cache(self, max_bytes: int | None, persist: bool) -> None:
        pass

    # -- what it knows --

    def headers(self) -> dict[str, str]:
        """The upstream's key, from the environment variable the profile names."""
        name = self.model.api_key_env
        key = os.environ.get(name, "") if name else ""
        return {"x-api-key": key, "authorization": f"Bearer {key}"} if key else {}

    def _probe(self) -> None:
        """Ask /v1/models: reachable, what it serves, its context (at start, and again
        after a request got through to an upstream that was down then)."""
        listed: list = []
        try:
            with httpx2.Client(timeout=self.model.timeout_connect, trust_env=False) as client:
                reply = client.get(f"{self.url}/v1/models", headers=self.headers())
            self.reachable, self.last_error = True, None
            if reply.status_code == 200:
                listed = reply.json().get("data") or []
        except httpx2.HTTPError as exc:
            self.reachable, self.last_error = False, f"{type(exc).__name__}: {exc}"
            print(f"anyclaude: upstream {self.url} for model {self.key!r} is not reachable: {self.last_error}", file=sys.stderr, flush=True)
        except (ValueError, AttributeError):  # answered, but no list of models (mlx_lm.server's may be empty)
            pass
        self._checked = time.monotonic()
        entries = [e for e in listed if isinstance(e, dict)] if isinstance(listed, list) else []
        self.served = [str(e.get("id")) for e in entries]
        chosen = [e for e in entries if e.get("id") == self.model.upstream_model] or (entries if len(entries) == 1 else [])
        context = None
        for entry in chosen:
            for field in ("max_model_len", "context_length", "max_input_tokens", "context_window"):
                if isinstance(entry.get(field), int):
                    context = entry[field]
                    break
        self.loaded = Info(context_length=self.model.context_length or context, device=f"upstream {self.model.api} {self.url}")
        self._ready.set()

    def saw(self, error: str | None) -> None:
        """What the last request found: the upstream answered (None), or not (why)."""
        if error is None and self.reachable is False and self.ready:  # back: ask what it serves
            self.refresh()
        self.reachable, self.last_error = error is None, error
        self._checked = time.monotonic()

    def refresh(self) -> threading.Thread:
        """Ask /v1/models again, in a thread (one at a time), which it returns."""
        if self._probing is None or not self._probing.is_alive():
            self._probing = threading.Thread(target=self._probe, name=f"upstream-{self.key}", daemon=True)
            self._probing.start()
        return self._probing

    def health(self, gate: Gate) -> dict:
        # What it was when last seen; asked again (for the next look) when that is a while ago
        # and no request has told since.
        if self.ready and time.monotonic() - self._checked > STALE_SECONDS:
            self.refresh()
        loaded = self.loaded
        return {
            "state": "ready" if loaded else "loading",
            "running": gate.active,
            "waiting": 0,
            "context_length": loaded.context_length if loaded else None,
            "device": loaded.device if loaded else None,
            "upstream": self.url,
            "api": self.model.api,
            "upstream_model": self.model.upstream_model,
            "reachable": self.reachable,
            "served": self.served,
            "fallback": self.model.fallback,
            "error": self.last_error,
            "tokenizer": self.model.tokenizer,
            "tokenizer_error": self.tokenizer_error,
            "path": None,
        }

    # -- calls --

    def client(self) -> httpx2.AsyncClient:
        if self._client is None:
            self._client = httpx2.AsyncClient(
                # No read timeout: silence is the watchdog's to judge ([timeouts]).
                timeout=httpx2.Timeout(connect=self.model.timeout_connect, read=None, write=60.0, pool=None),
                limits=httpx2.Limits(max_connections=256, max_keepalive_connections=32),
                trust_env=False,
            )
        return self._client

    async def open(self, body: dict, headers: dict[str, str], wait: float, path: str | None = None) -> tuple[httpx2.Response, float]:
        """Send a request and wait (up to `wait` seconds) for the upstream's response
        headers: the response, streaming, and the seconds it took. Down when it cannot
        take the request, Refused for its 4xx."""
        url = f"{self.url}{path or self.api.PATH}"
        started = time.monotonic()
        client = self.client()
        request = client.build_request("POST", url, content=json.dumps(body).encode(), headers={**headers, **self.headers()})
        try:
            response = await asyncio.wait_for(client.send(request, stream=True), wait)
        except TimeoutError:
            self.saw(f"no response within {wait:g} s")
            raise Down(f"upstream {self.url} did not answer within {wait:g} s (timeouts.first_token)") from None
        except (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.PoolTimeout) as exc:
            self.saw(f"{type(exc).__name__}: {exc}")
            raise Down(f"upstream {self.url} is unreachable ({type(exc).__name__}: {exc}); retry shortly") from None
        except httpx2.HTTPError as exc:
            self.saw(f"{type(exc).__name__}: {exc}")
            raise Down(f"upstream {self.url} failed before answering ({type(exc).__name__}: {exc}); retry shortly") from None
        latency = time.monotonic() - started
        if response.status_code == 200:
            self.saw(None)
            return response, latency
        try:
            text = (await response.aread()).decode(errors="replace")
        except httpx2.HTTPError:
            text = ""
        finally:
            await response.aclose()
        status, message = response.status_code, _message(text) or f"HTTP {response.status_code}"
        if status >= 500 or status in (408, 429):
            self.saw(f"HTTP {status}: {message}")
            raise Down(f"upstream {self.url} answered {status}: {message}", response.headers.get("retry-after"), status)
        self.saw(None)
        if status in (401, 403):
            # Not the client's key (a 401 would have Claude Code ask its user to log in): the profile's.
            variable = f"${self.model.api_key_env}" if self.model.api_key_env else "none: set api_key_env"
            raise Refused(500, "api_error", f"upstream {self.url} refused the key (HTTP {status}: {message}); check the profile's api_key_env ({variable})", status)
        if status == 404:
            message = f"{message} (upstream {self.url}; the profile's upstream_model is {self.model.upstream_model!r})"
        kinds = {400: InvalidRequest, 404: NotFound, 413: RequestTooLarge}
        raise Refused(status, kinds.get(status, InvalidRequest).type, message)


def _message(text: str) -> str:
    """The message of an error body, Anthropic's or OpenAI's shape, or the text itself."""
    try:
        data = json.loads(text)
    except ValueError:
        return text.strip()[:500]
    error = data.get("error") if isinstance(data, dict) else None
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return error["message"]
    if isinstance(error, str):
        return error
    if isinstance(data, dict) and isinstance(data.get("detail"), str):  # FastAPI's
        return data["detail"]
    if isinstance(data, dict) and isinstance(data.get("message"), str):
        return data["message"]
    return text.strip()[:500]


class Gate:
    """In the place of a Scheduler: an upstream queues and batches on its own, so this only
    counts the calls in flight, turns new ones away while drained or closed, and ends the
    calls in hand when the daemon stops."""

    def __init__(self, engine: Upstream):
        self.engine = engine
        self.queue_size = 0
        self.closed: str | None = None
        self._calls: set[Call] = set()
        self._idle: asyncio.Future | None = None

    @property
    def active(self) -> int:
        return len(self._calls)

    @property
    def running(self) -> int:
        return len(self._calls)

    @property
    def waiting(self) -> int:
        return 0

    def check_open(self) -> None:
        if self.closed:
            raise Overloaded(self.closed, headers={"retry-after": str(RETRY_AFTER_SECONDS)})

    def drain(self, reason: str) -> None:
        self.closed = reason

    def close(self, reason: str) -> None:
        self.drain(reason)
        for call in list(self._calls):
            call.fail(reason)

    def enter(self, call: Call) -> None:
        self._calls.add(call)

    def leave(self, call: Call) -> None:
        self._calls.discard(call)
        if not self._calls and self._idle is not None and not self._idle.done():
            self._idle.set_result(None)

    async def idle(self) -> None:
        while self._calls:
            self._idle = asyncio.get_running_loop().create_future()
            await self._idle


class Call:
    """One upstream answer, seen from the event loop like a Generation: its events, read
    from the response by a task, and `cancel`, which closes the upstream request."""

    def __init__(self, gate: Gate, response: httpx2.Response, reader: Any):
        self.gate, self.response, self.reader = gate, response, reader
        self.status = response.status_code
        self._events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False
        self.ended = False
        gate.enter(self)
        self._task = asyncio.get_running_loop().create_task(self._read())

    async def next(self, timeout: float | None = None) -> Event | None:
        """The next event, or None if `timeout` seconds pass first (or the call is cancelled)."""
        if self.cancelled and self._events.empty():
            return None
        try:
            event = await asyncio.wait_for(self._events.get(), timeout)
        except TimeoutError:
            return None
        return None if event is _WAKE else event

    def cancel(self) -> None:
        """Stop reading and close the upstream request (its server sees the hang-up)."""
        if not self.cancelled:
            self.cancelled = True
            self._task.cancel()
            self._events.put_nowait(_WAKE)  # a waiting `next` returns at once

    def fail(self, reason: str) -> None:
        """End the call with `reason` as its error (the daemon is stopping)."""
        self._events.put_nowait(Broke(reason))
        self.cancel()

    async def _read(self) -> None:
        put = self._events.put_nowait
        try:
            async for name, data in sse(self.response.aiter_lines()):
                for event in self.reader.feed(name, data):
                    put(event)
                if self.reader.done:
                    return
            for event in self.reader.close():  # the stream ended: a last word, or a hang-up
                put(event)
        except (httpx2.HTTPError, OSError) as exc:
            put(Broke(f"the upstream's stream broke off ({type(exc).__name__}: {exc}); retry"))
            self.gate.engine.saw(f"{type(exc).__name__}: {exc}")
        except ValueError as exc:  # not JSON, or not the API's shape
            put(Broke(f"the upstream sent what its API does not: {exc}", overloaded=False))
        finally:
            self.ended = True
            self.gate.leave(self)
            try:
                await self.response.aclose()
            except Exception:
                pass


class Forced:
    """A reader whose answer must call a tool (tool_choice any, or tool: that one), as a
    local model's grammar makes it. Not every server forces the call (mlx_lm.server
    ignores tool_choice), so what comes before a call is held back, and an answer that
    ends without one is an invalid_request_error that says so: never text passed off as
    the forced call. A call cut short by max_tokens ends as max_tokens, as a local one."""

    def __init__(self, reader: Any, choice: wire.ToolChoice, where: str):
        self.reader, self.where = reader, where
        self.kind, self.name = choice.type, choice.name if choice.type == "tool" else None
        self._called = False
        self._held: list = []  # text and thinking before the call
        self._missed: list[str] = []  # calls that came and do not count, and why

    @property
    def done(self) -> bool:
        return self.reader.done

    def feed(self, name: str, data: str) -> list:
        return self._filter(self.reader.feed(name, data))

    def close(self) -> list:
        return self._filter(self.reader.close())

    def _filter(self, events: list) -> list:
        out: list = []
        for event in events:
            if self._called or isinstance(event, (Usage, Broke)):
                out.append(event)
            elif isinstance(event, Output):
                # Kept even when empty: the relay's watchdog and pings go by the upstream's output.
                out.append(Output(self._segments(event.segments)))
            elif isinstance(event, Ended):
                if event.stop_reason == "max_tokens" and "truncated" in self._missed:
                    out.append(Ended("max_tokens"))  # a call was being written: cut short, not refused
                else:
                    out.append(Broke(self._refusal(event.stop_reason), overloaded=False, invalid=True))
        return out

    def _segments(self, segments: list) -> list:
        out: list = []
        for segment in segments:
            if self._called:
                out.append(segment)
            elif isinstance(segment, ToolCall) and self.name in (None, segment.name):
                self._called = True
                out += self._held + [segment]
                self._held = []
            elif isinstance(segment, ToolCall):
                self._missed.append(f"it called {segment.name!r}")
            elif isinstance(segment, BadCall):  # not shown: the forced answer is the call
                self._missed.append(segment.reason)
            else:
                self._held.append(segment)
        return out

    def _refusal(self, stop_reason: str) -> str:
        wanted = f"a call to {self.name!r}" if self.name else "a tool call"
        missed = f" ({'; '.join(self._missed)})" if self._missed else ""
        return (
            f"tool_choice {self.kind}: the upstream {self.where} ended its answer (stop_reason {stop_reason}) without "
            f"{wanted}{missed}; it does not force the call (mlx_lm.server ignores tool_choice, vLLM and SGLang force it)"
        )


_WAKE = object()  # not an event: wakes a `next` waiting on a cancelled call


async def sse(lines: AsyncIterator[str]) -> AsyncIterator[tuple[str, str]]:
    """Server-sent events as (event name, data) from a response's lines."""
    name, data = "", []
    async for line in lines:
        if not line:
            if data:
                yield name or "message", "\n".join(data)
            name, data = "", []
        elif line.startswith(":"):
            continue
        else:
            field, _, value = line.partition(":")
            value = value.removeprefix(" ")
            if field == "event":
                name = value
            elif field == "data":
                data.append(value)
    if data:
        yield name or "message", "\n".join(data)


def forwarded(scope_headers: list[tuple[bytes, bytes]]) -> dict[str, str]:
    """The client's headers an upstream may need: the API version and betas (unknown ones
    too), and Claude Code's hints (session, request class, agent)."""
    out = {}
    for name, value in scope_headers:
        key = name.decode("latin-1").lower()
        if key in ("anthropic-version", "anthropic-beta") or key.startswith("x-claude-code-"):
            out[key] = value.decode("latin-1")
    return out


def whole_json(text: str) -> bool:
    """Whether a call's arguments are complete JSON as they stand (repair would close
    what a cap cut short into a call the model did not write)."""
    try:
        json.loads(text or "{}")
    except ValueError:
        return False
    return True


def usage_of(data: dict | None) -> dict:
    return data if isinstance(data, dict) else {}


def clamp(request: wire.MessagesRequest, model: profiles.Model) -> int:
    """max_tokens as sent: what the client asks, at most the profile's max_tokens."""
    return min(request.max_tokens, model.max_tokens)
