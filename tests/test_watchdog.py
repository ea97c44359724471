"""Every stream ends well-formed within its timeout, and the log says how (issue: watchdog)."""

from __future__ import annotations

import http.client
import json
import threading
import time

import pytest

from bench.harness import Daemon, profile_file, request
from sse_grammar import check, parse

from anyclaude import signature

TIMEOUTS = {"first_token": 1.5, "idle": 1.0, "total": 30, "ping_interval": 0.4}
STEP = 0.5  # what "plus one engine step" is allowed to add, with margin for a loaded CI machine


def fake_daemon(directory, model_cache, tiny_model, name: str, queue_size: int):
    """A daemon with the scripted engine (tests/fake_app.py), ready, stopped at the end."""
    profile = profile_file(directory, name, timeouts=TIMEOUTS, engine={"queue_size": queue_size})
    d = Daemon(str(profile), model_cache, directory / "daemon.log", fake=True, env={"FAKE_TOKENIZER_DIR": str(tiny_model)})
    try:
        d.wait_ready()
        yield d
    finally:
        d.stop()


@pytest.fixture(scope="module")
def fake(tmp_path_factory, model_cache, tiny_model):
    yield from fake_daemon(tmp_path_factory.mktemp("fake"), model_cache, tiny_model, "faults", 1)


READ = {"name": "Read", "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}}, "required": ["file_path"]}}


def ask(daemon, script: str, stream: bool = True, **extra):
    body = {"model": "claude-opus-4-8", "max_tokens": 100, "stream": stream, "tools": [READ], "messages": [{"role": "user", "content": f"SCRIPT:{script}"}], **extra}
    started = time.monotonic()
    reply = request(daemon.port, "POST", "/v1/messages", json.dumps(body).encode())
    return reply, time.monotonic() - started


def record(daemon, request_id: str) -> dict:
    if daemon.process.poll() is None:
        # A response that ends before its engine (a timeout) is logged once the engine is free.
        daemon.wait_idle()
    (found,) = [r for r in daemon.records() if r["request_id"] == request_id]
    return found


def test_stall_before_the_first_token_ends_with_an_overloaded_error(fake):
    reply, took = ask(fake, "stall-before-first-token")
    events = check(reply.body)
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "overloaded_error"
    assert "timeouts.first_token" in events[-1]["error"]["message"] and "faults" in events[-1]["error"]["message"]
    assert TIMEOUTS["first_token"] <= took < TIMEOUTS["first_token"] + STEP
    pings = reply.body.count(b"event: ping\n")
    assert pings >= 2  # the wait was kept alive with real ping events
    r = record(fake, reply.headers["request-id"])
    assert r["outcome"] == "timeout_first_token" and r["ended"] == "error"


def test_stall_mid_text_ends_the_message_as_max_tokens(fake):
    reply, took = ask(fake, "stall-mid-text")
    events = check(reply.body)
    text = "".join(e["delta"]["text"] for e in events if e["type"] == "content_block_delta")
    assert text == "Hello, this is the start of"
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert took < TIMEOUTS["idle"] + STEP
    r = record(fake, reply.headers["request-id"])
    assert r["outcome"] == "timeout_idle" and r["ended"] == "message_stop" and r["stop_reason"] == "max_tokens"


WRITE = {"name": "Write", "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}}}}
# A schema no grammar can express: with it among the tools, calls are not held, and come whole.
UNHELD = {"name": "Odd", "input_schema": {"type": "object", "properties": {"a": {"type": "string", "pattern": "(("}}, "required": ["a"]}}


def test_a_long_tool_call_keeps_the_stream_alive_with_pings(fake):
    """Tokens of a call that comes whole send nothing: Claude Code's byte watchdog would
    see silence. A ping goes out whenever nothing has been sent for ping_interval."""
    reply, took = ask(fake, "slow-tool-call", max_tokens=1000, tools=[WRITE, UNHELD])
    assert check(reply.body)[-2]["delta"]["stop_reason"] == "tool_use"
    assert took > 3 * TIMEOUTS["ping_interval"]  # the call took longer than a ping interval, tokens flowing all along
    names = [name for name, _ in parse(reply.body)]
    assert names[: names.index("content_block_start")].count("ping") >= 2
    assert "call_grammar" not in record(fake, reply.headers["request-id"])


def test_a_call_the_model_makes_by_itself_streams_as_it_is_written(fake):
    reply, _ = ask(fake, "slow-tool-call", max_tokens=1000, tools=[WRITE])
    events = check(reply.body)
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    names = [e["type"] for e in events]
    start = names.index("content_block_start")
    assert events[start]["content_block"] == {"type": "tool_use", "id": events[start]["content_block"]["id"], "name": "Write", "input": {}}
    pieces = [e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta"]
    assert len(pieces) > 10  # as it was written, not at the end
    assert json.loads("".join(pieces)) == {"file_path": "/tmp/a.txt", "content": "lorem ipsum " * 12}
    assert record(fake, reply.headers["request-id"])["call_grammar"] == "held"


def test_stall_mid_tool_call_ends_the_call_begun_as_valid_json(fake):
    reply, took = ask(fake, "stall-mid-tool-call")
    events = check(reply.body)
    blocks = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    text = "".join(e["delta"].get("text", "") for e in events if e["type"] == "content_block_delta")
    assert blocks == ["text", "tool_use"] and text == "Let me read it."
    pieces = "".join(e["delta"].get("partial_json", "") for e in events if e["type"] == "content_block_delta")
    assert json.loads(pieces) == {"file_": None}  # what was sent, closed: never half a value
    assert events[-2]["delta"]["stop_reason"] == "max_tokens"
    assert took < TIMEOUTS["idle"] + STEP
    assert record(fake, reply.headers["request-id"])["outcome"] == "timeout_idle"


def test_non_streaming_stall_before_first_token_is_a_529(fake):
    reply, _ = ask(fake, "stall-before-first-token", stream=False)
    assert reply.status == 529
    assert reply.json()["error"]["type"] == "overloaded_error"


def test_engine_crash_mid_text_ends_with_an_error_event(fake):
    reply, _ = ask(fake, "crash-mid-text")
    events = check(reply.body)
    assert events[-1]["type"] == "error" and "crashed" in events[-1]["error"]["message"]
    assert record(fake, reply.headers["request-id"])["outcome"] == "error"


def test_a_full_queue_answers_529_with_retry_after_before_any_headers(fake):
    # queue_size is 1: one stalled request runs, one waits, the third is refused.
    results = {}

    def run(name):
        results[name] = ask(fake, "stall-before-first-token")[0]

    threads = [threading.Thread(target=run, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:  # until both are admitted: one running, one waiting
        health = request(fake.port, "GET", "/health").json()["models"]["smollm2"]
        if health["running"] and health["waiting"] == 1:
            break
    refused = ask(fake, "stall-before-first-token")[0]
    for t in threads:
        t.join()
    assert refused.status == 529, refused.body
    assert refused.headers["retry-after"].isdigit() and 0 < int(refused.headers["retry-after"]) <= 60
    assert refused.json()["error"]["type"] == "overloaded_error"
    assert record(fake, refused.headers["request-id"])["outcome"] == "overloaded"
    assert all(results[n].status == 200 for n in results)


def test_real_engine_with_a_tiny_first_token_budget(tmp_path, model_cache, tiny_model):
    profile = profile_file(tmp_path, "impatient", timeouts={"first_token": 0.05, "ping_interval": 0.02}, engine={"prefill_step": 256})
    d = Daemon(str(profile), model_cache, tmp_path / "daemon.log")
    try:
        d.wait_ready()
        long_prompt = "Tell me about the sea. " * 60
        body = {"model": "claude-opus-4-8", "max_tokens": 20, "stream": True, "messages": [{"role": "user", "content": long_prompt}]}
        started = time.monotonic()
        reply = request(d.port, "POST", "/v1/messages", json.dumps(body).encode())
        took = time.monotonic() - started
        events = check(reply.body)
        assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "overloaded_error"
        assert took < 1
        # The engine notices at its next prefill step (512 tokens at most) and is free again.
        assert d.wait_idle(timeout=15) < 10
        logged = record(d, reply.headers["request-id"])
        assert logged["outcome"] == "timeout_first_token" and logged["cache_store"] == "stored"
        # The prefill done before the timeout was kept: Claude Code's retry resumes from it.
        retry = check(request(d.port, "POST", "/v1/messages", json.dumps(body).encode()).body)
        assert retry[0]["message"]["usage"]["cache_read_input_tokens"] >= 256
    finally:
        assert d.stop() == 0


def test_reasoning_streams_as_a_signed_thinking_block_before_the_text(fake):
    events = check(ask(fake, "think", thinking={"type": "adaptive"})[0].body)
    blocks = [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"]
    deltas = [(e["index"], e["delta"]["type"]) for e in events if e["type"] == "content_block_delta"]
    assert blocks == ["thinking", "text"]
    thinking = "".join(e["delta"].get("thinking", "") for e in events if e["type"] == "content_block_delta")
    assert thinking == "The user wants a number."
    assert [d for d in deltas if d[0] == 0][-1] == (0, "signature_delta")  # one signature, just before the stop
    assert sum(d == (0, "signature_delta") for d in deltas) == 1
    message = ask(fake, "think", stream=False)[0].json()
    assert [b["type"] for b in message["content"]] == ["thinking", "text"] and message["content"][0]["signature"]
    omitted = check(ask(fake, "think", thinking={"type": "adaptive", "display": "omitted"})[0].body)
    [sealed] = [e["delta"] for e in omitted if e["type"] == "content_block_delta" and e["index"] == 0]
    # Not shown, but carried in the signature: the next turn renders it back.
    assert sealed["type"] == "signature_delta" and signature.unseal(sealed["signature"]) == "The user wants a number."


def test_stopping_the_daemon_ends_the_streams_in_flight_at_once(tmp_path, model_cache, tiny_model):
    # Granian waits for responses to end before a worker exits: without help, a
    # generation would hold the daemon up until its end (here: never).
    profile = profile_file(tmp_path, "stopping", timeouts={"first_token": 600, "idle": 600, "total": 600})
    daemon = Daemon(str(profile), model_cache, tmp_path / "daemon.log", fake=True, env={"FAKE_TOKENIZER_DIR": str(tiny_model)})
    try:
        daemon.wait_ready()
        body = {"model": "claude-opus-4-8", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": "SCRIPT:stall-mid-text"}]}
        conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
        conn.request("POST", "/v1/messages", body=json.dumps(body), headers={"content-type": "application/json"})
        response = conn.getresponse()
        seen = b""
        while b"content_block_delta" not in seen:  # generating: text has arrived
            seen += response.read1()
        assert daemon.stop() == 0  # within its 30 s wait, not the 600 s the stall would last
    finally:
        daemon.process.kill()  # only if it is still there
    events = check(seen + response.read())
    assert events[-1]["error"] == {"type": "overloaded_error", "message": "the daemon is stopping; retry once it is back"}
    r = record(daemon, response.getheader("request-id"))
    assert r["outcome"] == "error" and r["ended"] == "error" and "stopping" in r["error"]


@pytest.fixture(scope="module")
def queueing(tmp_path_factory, model_cache, tiny_model):
    yield from fake_daemon(tmp_path_factory.mktemp("queueing"), model_cache, tiny_model, "queueing", 4)


def test_waiting_requests_run_by_class_and_their_first_token_timer_starts_at_the_engine(queueing):
    """The main conversation before subagents before side requests, however they came;
    and time spent queued is not the prefill taking too long."""
    results = {}

    def run(name, script, kind):
        body = {"model": "claude-opus-4-8", "max_tokens": 100, "stream": True, "messages": [{"role": "user", "content": f"SCRIPT:{script}"}]}
        results[name] = request(queueing.port, "POST", "/v1/messages", json.dumps(body).encode(), {"x-claude-code-request-class": kind})

    def health():
        return request(queueing.port, "GET", "/health").json()["models"]["smollm2"]

    first = threading.Thread(target=run, args=("first", "slow-answer", "main"))
    first.start()
    while not health()["running"]:
        pass
    threads = []
    for name in ("auxiliary", "subagent", "main"):  # the reverse of their ranks
        threads.append(threading.Thread(target=run, args=(name, "think", name)))
        threads[-1].start()
        while health()["waiting"] < len(threads):  # each queued before the next comes
            pass
    for t in [first, *threads]:
        t.join()
    logged = [r for r in queueing.records() if r["request_id"] in {results[n].headers["request-id"] for n in results}]
    classes = [r["request_class"] for r in logged]
    from anyclaude.engine.scheduler import MAX_WAIT

    if all(r["queue_wait_s"] < MAX_WAIT for r in logged):
        assert classes == ["main", "main", "subagent", "auxiliary"]
    else:  # a box so loaded that one waited past MAX_WAIT: the oldest goes first, as it must
        assert classes[:2] == ["main", "main"] and sorted(classes[2:]) == ["auxiliary", "subagent"], logged
    assert all(r["outcome"] == "complete" for r in logged), logged
    assert min(r["queue_wait_s"] for r in logged[1:]) > TIMEOUTS["first_token"]
