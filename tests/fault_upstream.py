"""An upstream inference server for fault injection: raw HTTP/1.1 on asyncio, in a thread of
its own, speaking just enough of the Anthropic and OpenAI APIs to play a script.

The last `SCRIPT:<name>` in a request body says what it does (see `_play`). Each request
is kept in `requests` (path, headers, body); each connection a client closed while a
script held it open is put in `hangups` (the script's name), so that a test can wait for
it, and a request held before any answer in `held` once it has arrived.
"""

from __future__ import annotations

import asyncio
import json
import queue
import re
import threading

from bench.harness import free_port

MODELS = {"object": "list", "data": [{"id": "big-model", "object": "model", "max_model_len": 32768}]}


def anthropic_events(*events: dict) -> bytes:
    return b"".join(f"event: {e['type']}\ndata: {json.dumps(e)}\n\n".encode() for e in events)


def start(input_tokens: int = 7, cache_read: int = 3) -> dict:
    usage = {"input_tokens": input_tokens, "output_tokens": 1, "cache_read_input_tokens": cache_read, "cache_creation_input_tokens": 0}
    return {"type": "message_start", "message": {"id": "msg_up", "type": "message", "role": "assistant", "model": "big-model", "content": [], "stop_reason": None, "stop_sequence": None, "usage": usage}}


def block(index: int, content_block: dict) -> dict:
    return {"type": "content_block_start", "index": index, "content_block": content_block}


def delta(index: int, d: dict) -> dict:
    return {"type": "content_block_delta", "index": index, "delta": d}


def stop(index: int) -> dict:
    return {"type": "content_block_stop", "index": index}


def end(reason: str, output_tokens: int) -> list[dict]:
    return [{"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": None}, "usage": {"output_tokens": output_tokens}}, {"type": "message_stop"}]


def chunk(delta: dict | None = None, finish: str | None = None, usage: dict | None = None) -> bytes:
    body: dict = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "model": "big-model", "choices": []}
    if delta is not None or finish is not None:
        body["choices"] = [{"index": 0, "delta": delta or {}, "finish_reason": finish}]
    if usage is not None:
        body["usage"] = usage
    return f"data: {json.dumps(body)}\n\n".encode()


def _text(s: str) -> dict:
    return {"type": "text_delta", "text": s}


# Scripts whose whole answer is known up front: (status, SSE body).
_ANSWERS = {
    "echo": anthropic_events(start(), block(0, {"type": "text", "text": ""}), delta(0, _text("ok")), stop(0), *end("end_turn", 2)),
    # A call cut in pieces, an upstream ping, an event and a delta type this daemon does
    # not know, a block type it drops; its stop_reason says end_turn though a call was made.
    "tool": anthropic_events(
        start(),
        block(0, {"type": "text", "text": ""}),
        delta(0, _text("Reading.")),
        {"type": "ping"},
        delta(0, {"type": "citations_delta", "citation": {}}),
        stop(0),
        block(1, {"type": "server_tool_use", "id": "srvtoolu_1", "name": "web_search", "input": {}}),
        stop(1),
        {"type": "some_future_event"},
        block(2, {"type": "tool_use", "id": "toolu_up", "name": "Read", "input": {}}),
        delta(2, {"type": "input_json_delta", "partial_json": '{"file_path":'}),
        delta(2, {"type": "input_json_delta", "partial_json": ' "/tmp/x"}'}),
        stop(2),
        *end("end_turn", 12),
    ),
    # Calls whose input a model wrote wrong: a string for an integer and a trailing comma
    # (repaired), a required key missing (shown as text); then one no repair makes JSON.
    "tool-repair": anthropic_events(
        start(),
        block(0, {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}),
        delta(0, {"type": "input_json_delta", "partial_json": '{"file_path": "/tmp/x", '}),
        delta(0, {"type": "input_json_delta", "partial_json": '"limit": "5",}'}),
        stop(0),
        block(1, {"type": "tool_use", "id": "toolu_2", "name": "Read", "input": {}}),
        delta(1, {"type": "input_json_delta", "partial_json": '{"limit": 3}'}),
        stop(1),
        *end("tool_use", 20),
    ),
    "tool-unparseable": anthropic_events(
        start(),
        block(0, {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}),
        delta(0, {"type": "input_json_delta", "partial_json": "{file_path /tmp/x"}),
        stop(0),
        *end("tool_use", 9),
    ),
    "error-event": anthropic_events(start(), block(0, {"type": "text", "text": ""}), delta(0, _text("Hel")), {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    "oai-tool": b"".join(
        [
            chunk({"role": "assistant", "content": ""}),
            chunk({"content": "Let me look."}),
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "Read", "arguments": ""}}]}),
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"file_path": "/tmp/x",'}}]}),
            # `limit` is an integer in the schema: the model wrote a string, repair makes it one.
            chunk({"tool_calls": [{"index": 0, "function": {"arguments": ' "limit": "5"}'}}]}),
            chunk({"tool_calls": [{"index": 1, "id": "call_2", "type": "function", "function": {"name": "Read", "arguments": '{"file_path": "/tmp/y"}'}}]}),
            chunk(finish="tool_calls"),
            chunk(usage={"prompt_tokens": 20, "completion_tokens": 9, "total_tokens": 29, "prompt_tokens_details": {"cached_tokens": 12}}),
            b"data: [DONE]\n\n",
        ]
    ),
    "oai-reasoning": b"".join(
        [
            chunk({"role": "assistant", "reasoning_content": "The user wants "}),
            chunk({"reasoning": "a number."}),
            chunk({"content": "Forty-two."}),
            chunk(finish="stop"),
            chunk(usage={"prompt_tokens": 11, "completion_tokens": 6, "total_tokens": 17}),
            b"data: [DONE]\n\n",
        ]
    ),
    "oai-bad-tool": b"".join(
        [
            chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "Read", "arguments": '{"limit": [1,'}}]}),
            chunk(finish="tool_calls"),
            b"data: [DONE]\n\n",
        ]
    ),
}

# Scripts that send a beginning, then stall (hold the connection open) or hang up.
_BEGUN = {
    "stall": anthropic_events(start(), block(0, {"type": "text", "text": ""}), delta(0, _text("Hello"))),
    "hangup": anthropic_events(start(), block(0, {"type": "text", "text": ""}), delta(0, _text("Hello"))),
    "oai-hangup": chunk({"role": "assistant", "content": "Hel"}),
    "oai-stall": chunk({"role": "assistant", "content": "Hel"}),
}

# Scripts that write a few words, then a long call slowly: a piece each PACE seconds, for
# longer in all than the front daemon's idle timeout (but never silent for as long).
PACE = 1.0
_PACED = {
    "slow-tool": [
        anthropic_events(start(), block(0, {"type": "text", "text": "Reading."}), stop(0), block(1, {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}})),
        *(anthropic_events(delta(1, {"type": "input_json_delta", "partial_json": p})) for p in ['{"file_path": ', '"/tmp/', "long/", "path", '"}']),
        anthropic_events(stop(1), *end("tool_use", 9)),
    ],
    "oai-slow-tool": [
        chunk({"content": "Reading."}) + chunk({"tool_calls": [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "Read", "arguments": ""}}]}),
        *(chunk({"tool_calls": [{"index": 0, "function": {"arguments": p}}]}) for p in ['{"file_path": ', '"/tmp/', "long/", "path", '"}']),
        chunk(finish="tool_calls") + b"data: [DONE]\n\n",
    ],
}

_HELD = (
    anthropic_events(start(), block(0, {"type": "text", "text": "Reading."}), stop(0), block(1, {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {}}), delta(1, {"type": "input_json_delta", "partial_json": '{"file_path":'})),
    anthropic_events(delta(1, {"type": "input_json_delta", "partial_json": '"/tmp/x"}'}), stop(1), *end("tool_use", 9)),
)

_STATUS = {
    "status-500": (500, {"type": "error", "error": {"type": "api_error", "message": "CUDA out of memory"}}),
    "status-529": (529, {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}),
    "status-401": (401, {"type": "error", "error": {"type": "authentication_error", "message": "invalid x-api-key"}}),
    "status-400": (400, {"type": "error", "error": {"type": "invalid_request_error", "message": "prompt is too long: 40000 tokens > 32768 maximum"}}),
}


class FaultUpstream:
    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.requests: list[dict] = []
        self.hangups: queue.Queue[str] = queue.Queue()
        self.held: queue.Queue[str] = queue.Queue()  # requests held before any answer
        self.released = threading.Event()  # lets "held-tool" finish its call
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread = threading.Thread(target=self._run, name="fault-upstream", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the fault upstream did not start")

    def last(self, path: str = "/v1/messages") -> dict:
        return [r for r in self.requests if r["path"] == path][-1]

    def close(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        self._loop = asyncio.new_event_loop()
        server = self._loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        self._ready.set()
        try:
            self._loop.run_forever()
        finally:
            server.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            line = await reader.readline()
            if not line:
                return
            method, path, _ = line.decode().split(" ", 2)
            headers = {}
            while (header := await reader.readline()) not in (b"\r\n", b"\n", b""):
                name, _, value = header.decode().partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", 0)))
            self.requests.append({"method": method, "path": path, "headers": headers, "body": json.loads(body) if body else None})
            await self._play(method, path, body.decode(), reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    async def _play(self, method: str, path: str, body: str, reader, writer) -> None:
        if method == "GET" and path == "/v1/models":
            return await _respond(writer, 200, "application/json", json.dumps(MODELS).encode())
        if path == "/v1/messages/count_tokens":
            return await _respond(writer, 200, "application/json", b'{"input_tokens": 1234}')
        scripts = re.findall(r"SCRIPT:([\w-]+)", body)
        script = scripts[-1] if scripts else "echo"
        if script == "no-answer":  # not even headers: held until the client closes
            self.held.put(script)
            await reader.read()
            self.hangups.put(script)
            return
        if script.startswith("context"):  # vLLM's answer to a request beyond its context
            tokens, context, wanted = (1500 if script == "context-prompt" else 900), 2000, json.loads(body)["max_tokens"]
            if tokens + wanted > context:
                message = f"This model's maximum context length is {context} tokens. However, you requested {tokens + wanted} tokens ({tokens} in the messages, {wanted} in the completion). Please reduce the length of the messages or completion."
                return await _respond(writer, 400, "application/json", json.dumps({"object": "error", "message": message, "type": "BadRequestError", "code": 400}).encode())
            script = "oai-reasoning"
        if script in _STATUS:
            status, error = _STATUS[script]
            return await _respond(writer, status, "application/json", json.dumps(error).encode(), {"retry-after": "7"} if status == 529 else None)
        if script in _ANSWERS:
            return await _respond(writer, 200, "text/event-stream", _ANSWERS[script])
        if script == "held-tool":  # a call that goes on (a space each PACE / 4) until released
            await _respond(writer, 200, "text/event-stream", _HELD[0], end=False)
            while not self.released.is_set():
                await asyncio.sleep(PACE / 4)
                writer.write(anthropic_events(delta(1, {"type": "input_json_delta", "partial_json": " "})))
                await writer.drain()
            writer.write(_HELD[1])
            await writer.drain()
            return
        if script in _PACED:
            first, *rest = _PACED[script]
            await _respond(writer, 200, "text/event-stream", first, end=False)
            for piece in rest:
                await asyncio.sleep(PACE)  # the upstream's pace, not a wait for anything
                writer.write(piece)
                await writer.drain()
            return
        await _respond(writer, 200, "text/event-stream", _BEGUN[script], end=False)
        if "stall" in script:
            await reader.read()  # b"" once the client closes the connection
            self.hangups.put(script)


async def _respond(writer, status: int, content_type: str, body: bytes, headers: dict | None = None, *, end: bool = True) -> None:
    extra = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
    length = f"content-length: {len(body)}\r\n" if end else ""
    writer.write(f"HTTP/1.1 {status} X\r\ncontent-type: {content_type}\r\n{length}{extra}connection: close\r\n\r\n".encode() + body)
    await writer.drain()
