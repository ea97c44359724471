"""One bad request never hurts anyone else: bad input is a 400 naming the field, faults
end cleanly, and the daemon keeps serving (issue 11). Against the real daemon."""

from __future__ import annotations

import json
import socket
import threading
import time

import anthropic
import pytest

from bench.harness import request, serving
from sse_grammar import check

STEP = 256  # prompt tokens per prefill chunk
BASE = {"model": "claude-sonnet-4-6", "max_tokens": 4, "messages": [{"role": "user", "content": "Say OK."}]}


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache, tiny_model):
    yield from serving(tmp_path_factory.mktemp("faults"), model_cache, "faults", server={"body_timeout": 1.0}, engine={"prefill_step": STEP})


def post(daemon, body, path="/v1/messages"):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(daemon.port, "POST", path, data)


def bad(daemon, body, field: str, path="/v1/messages") -> str:
    reply = post(daemon, body, path)
    assert reply.status == 400, reply.body[:300]
    error = reply.json()["error"]
    assert error["type"] == "invalid_request_error" and field in error["message"], error
    return error["message"]


def test_top_k_as_large_as_the_vocabulary_keeps_every_token_and_breaks_nothing(daemon):
    # It once left MLX's random state broken: every sampled request after it failed.
    for top_k in (49152, 10**6, 2**64):
        assert post(daemon, {**BASE, "temperature": 0.7, "top_k": top_k}).status == 200
    assert post(daemon, {**BASE, "temperature": 0.7}).status == 200
    bad(daemon, {**BASE, "top_k": -1}, "top_k")


@pytest.mark.parametrize(("field", "value"), [("temperature", "-0.5"), ("temperature", "1e999"), ("top_p", "1.5")])
def test_sampling_values_out_of_range_are_refused(daemon, field, value):
    bad(daemon, json.dumps({**BASE, field: "VALUE"}).replace('"VALUE"', value).encode(), field)


@pytest.mark.parametrize(
    "content",
    [b'"a\xffb"', b'"a\xed\xa0\x80b"', b'"\xc0\xaf"', '"caf\u00e9"'.encode("latin-1")],
    ids=["invalid-byte", "surrogate", "overlong", "latin-1"],
)
def test_invalid_utf8_is_a_400(daemon, content):
    body = b'{"model":"claude-sonnet-4-6","max_tokens":4,"messages":[{"role":"user","content":' + content + b"}]}"
    bad(daemon, body, "UTF-8")
    bad(daemon, body, "UTF-8", "/v1/messages/count_tokens")


@pytest.mark.parametrize("levels", [100, 1000, 100000])
@pytest.mark.parametrize("where", ["content", "schema"])
def test_deeply_nested_json_is_a_400(daemon, levels, where):
    nested = "[" * levels + "]" * levels
    if where == "content":
        body = {**BASE, "messages": [{"role": "user", "content": "NESTED"}]}
    else:
        body = {**BASE, "tools": [{"name": "t", "input_schema": {"type": "object", "default": "NESTED"}}]}
    data = json.dumps(body).replace('"NESTED"', nested).encode()
    bad(daemon, data, "levels deep")
    bad(daemon, data, "levels deep", "/v1/messages/count_tokens")


SCHEMAS = {
    "unknown-type": {"type": "nonsense"},
    "properties-not-object": {"type": "object", "properties": 5},
    "dangling-ref": {"$ref": "#/$defs/missing"},
    "required-string": {"type": "object", "required": "a"},
    "empty-anyOf": {"anyOf": []},
    "bad-pattern": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}, "required": ["a"]},
    "empty-enum": {"type": "object", "properties": {"a": {"enum": []}}, "required": ["a"]},
    "min-above-max": {"type": "object", "properties": {"a": {"type": "string", "minLength": 5, "maxLength": 2}}, "required": ["a"]},
    "huge-integer": {"type": "object", "properties": {"mode": {"enum": [-(2**70), "b"]}}, "required": ["mode"]},
    "endless-ref": {"$defs": {"n": {"type": "object", "properties": {"c": {"$ref": "#/$defs/n"}}, "required": ["c"]}}, "$ref": "#/$defs/n"},
}


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_a_forced_call_whose_schema_cannot_compile_is_a_400(daemon, schema, stream):
    tools = [{"name": "t", "input_schema": schema}, {"name": "ok", "input_schema": {"type": "object"}}]
    bad(daemon, {**BASE, "stream": stream, "tools": tools, "tool_choice": {"type": "any"}}, "'t'")


@pytest.mark.parametrize("schema", SCHEMAS.values(), ids=SCHEMAS.keys())
def test_unforced_such_a_schema_is_served_with_calls_that_come_whole(daemon, schema):
    tools = [{"name": "t", "input_schema": schema}, {"name": "ok", "input_schema": {"type": "object"}}]
    reply = post(daemon, {**BASE, "tools": tools})
    assert reply.status == 200, reply.body[:300]
    (logged,) = [r for r in daemon.records() if r["request_id"] == reply.headers["request-id"]]
    assert "call_grammar" not in logged


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({**BASE, "tools": [{"name": "", "input_schema": {}}], "tool_choice": {"type": "any"}}, "tools.0.name"),
        ({**BASE, "tools": [{"name": "t" * 10_000, "input_schema": {}}], "tool_choice": {"type": "any"}}, "tools.0.name"),
        ({**BASE, "model": "m" * 3_000_000}, "model"),
        ({**BASE, "stop_sequences": ["x" * 5000]}, "stop_sequences"),
        ({**BASE, "stop_sequences": [str(i) for i in range(10_000)]}, "stop_sequences"),
    ],
    ids=["empty-tool-name", "long-tool-name", "long-model-name", "long-stop-sequence", "many-stop-sequences"],
)
def test_limits_on_names_and_stop_sequences(daemon, body, field):
    bad(daemon, body, field)


def raw(daemon, data: bytes, *, half_close: bool = True) -> bytes:
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=60) as s:
        s.sendall(data)
        if half_close:
            s.shutdown(socket.SHUT_WR)
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.mark.parametrize("half_close", [True, False], ids=["short-body", "stalled-body"])
def test_a_body_shorter_than_its_length_gets_the_envelope(daemon, half_close):
    body = json.dumps(BASE).encode()
    head = f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body) + 100}\r\n\r\n"
    # Half-closed: the body can never complete. Left open: server.body_timeout (1 s here) ends the wait.
    reply = raw(daemon, head.encode() + body, half_close=half_close)
    assert reply.startswith(b"HTTP/1.1 400"), reply[:200]
    error = json.loads(reply.split(b"\r\n\r\n", 1)[1])["error"]
    assert error["type"] == "invalid_request_error" and "body" in error["message"]


def test_a_malformed_chunk_gets_the_envelope(daemon):
    body = json.dumps(BASE).encode()
    head = b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    reply = raw(daemon, head + b"zz\r\n" + body + b"\r\n0\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 400") and b"invalid_request_error" in reply, reply[:200]


def long_prompt(n: int = 200) -> str:
    return " ".join(f"item{i} is {i * 7 % 13} units" for i in range(n))


def cached_after(daemon, content: str) -> tuple[int, int]:
    """(prompt tokens, tokens reused from the cache) of the same prompt asked again."""
    client = anthropic.Anthropic(base_url=daemon.url, api_key="x", max_retries=0)
    message = client.messages.create(**{**BASE, "max_tokens": 1, "messages": [{"role": "user", "content": content}]})
    usage = message.usage
    return usage.input_tokens + usage.cache_read_input_tokens, usage.cache_read_input_tokens


def wait_running(daemon) -> None:
    while not any(m["running"] for m in request(daemon.port, "GET", "/health").json()["models"].values()):
        time.sleep(0.05)  # polling /health, the signal for this; not a wait for an outcome


@pytest.mark.parametrize("stream", [False, True], ids=["json", "stream"])
def test_a_hang_up_during_prefill_frees_the_engine_within_a_chunk(daemon, stream):
    content = ("Streamed. " if stream else "Whole. ") + long_prompt()  # no prefix shared with the other case
    body = json.dumps({**BASE, "stream": stream, "messages": [{"role": "user", "content": content}]}).encode()
    head = f"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    s = socket.create_connection(("127.0.0.1", daemon.port), timeout=60)
    s.sendall(head.encode() + body)
    seen = b""
    while stream and b"message_start" not in seen:
        seen += s.recv(65536)
    wait_running(daemon)
    s.close()
    daemon.wait_idle(timeout=300)
    total, reused = cached_after(daemon, content)
    # The prefill stopped at the chunk it was in: what it kept is that far in, well
    # short of the whole prompt it would have computed had nobody noticed.
    assert total > 5 * STEP and reused <= total - 2 * STEP, (total, reused)
    cancelled = [r for r in daemon.records() if r.get("prompt_tokens") == total and r["outcome"] == "cancelled" and r["stream"] is stream]
    assert len(cancelled) == 1
    # Its line waited for the engine to stop, and says the prefill done so far was kept.
    assert cancelled[0]["cache_store"] == "stored"


def test_a_large_request_does_not_hold_up_the_others(daemon):
    # About 8 MB of text: seconds of tokenizing, which once ran on the event loop.
    text = "word " * 1_600_000
    body = json.dumps({**BASE, "messages": [{"role": "user", "content": text}]}).encode()
    head = f"POST /v1/messages/count_tokens HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    with socket.create_connection(("127.0.0.1", daemon.port), timeout=300) as big:
        big.sendall(head.encode() + body)
        while request(daemon.port, "GET", "/health").json()["preparing"] == 0:
            time.sleep(0.05)
        # While it is being rendered: another client's stream, start to end, and /health.
        reply = post(daemon, {**BASE, "stream": True})
        assert check(reply.body)[-1]["type"] == "message_stop"
        assert request(daemon.port, "GET", "/health").json()["preparing"] == 1
        big.settimeout(300)
        answer = b""
        while b"input_tokens" not in answer:
            answer += big.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200")


def test_the_daemon_is_still_healthy_after_all_this(daemon):
    assert request(daemon.port, "GET", "/health").status == 200
    reply = post(daemon, {**BASE, "temperature": 0.7, "stream": True})
    assert check(reply.body)[-1]["type"] == "message_stop"
    threads = [threading.Thread(target=post, args=(daemon, {**BASE, "temperature": 0.5})) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not [r for r in daemon.records() if r.get("status", 0) >= 500]


def test_a_sampler_that_fails_leaves_nothing_broken_for_the_next_request(tiny_net):
    # In process, past the daemon's own checks: the engine itself must not let one
    # failure (here mlx-lm refusing a top_k of the whole vocabulary) break later requests.
    import asyncio

    from anyclaude.engine.cache import PrefixCache
    from anyclaude.engine.engine import Engine, Loaded
    from anyclaude.engine.events import Done, Failed, Generation, Job, Sampling

    model, tokenizer = tiny_net
    loaded = Loaded(model=model, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset(tokenizer.eos_token_ids))
    engine = Engine(lambda: loaded, cache=PrefixCache(2**28))
    engine.start()
    prompt = tokenizer.encode("Say OK.", add_special_tokens=False)

    async def run(top_k: int):
        generation = Generation(asyncio.get_running_loop())
        engine.submit(Job(prompt=prompt, max_tokens=3, sampling=Sampling(temperature=0.7, top_p=1.0, top_k=top_k)), generation)
        while not isinstance(event := await generation.next(), (Done, Failed)):
            pass
        return event

    try:
        failed = asyncio.run(run(model.args.vocab_size))
        assert isinstance(failed, Failed) and "top_k" in failed.message
        assert engine.cache.entries == 0 and failed.store == "failed"  # nothing kept of a request that failed
        for _ in range(2):  # sampled: it may end at its cap or at an end-of-turn token
            assert asyncio.run(run(20)) in (Done("length", store="stored"), Done("stop", store="stored"))
    finally:
        engine.stop()
        engine.wait_stopped()
