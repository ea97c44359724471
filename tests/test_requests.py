"""Claude Code's request shapes and bad input, against the real daemon."""

from __future__ import annotations

import http.client
import json
from pathlib import Path

import pytest

from claude_code import HEADERS, first_turn
from bench.harness import request
from sse_grammar import check


def post(daemon, body, path="/v1/messages?beta=true", headers=HEADERS):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    return request(daemon.port, "POST", path, data, headers)


def long_prompt(words: int) -> dict:
    return {"model": "claude-opus-4-8", "max_tokens": 64, "messages": [{"role": "user", "content": "Summarise:" + " word" * words}]}


def count(daemon, body) -> int:
    body = {k: v for k, v in body.items() if k not in ("max_tokens", "stream")}
    reply = post(daemon, body, "/v1/messages/count_tokens?beta=true")
    assert reply.status == 200, reply.body
    return reply.json()["input_tokens"]


def test_claude_code_first_turn_streams(daemon):
    body = first_turn()
    reply = post(daemon, body)
    assert reply.status == 200, reply.body
    assert reply.headers["content-type"] == "text/event-stream"
    events = check(reply.body)
    usage = events[0]["message"]["usage"]
    assert usage["input_tokens"] + usage["cache_read_input_tokens"] == count(daemon, body)


def test_claude_code_first_turn_too_long_for_the_window(daemon):
    body = first_turn(description_words=120)
    tokens = count(daemon, body)
    assert tokens > 8192
    reply = post(daemon, body)
    assert reply.status == 400
    assert reply.json()["error"] == {
        "type": "invalid_request_error",
        "message": f"prompt is too long: {tokens} tokens > {8192 - 1024} maximum",
    }


@pytest.mark.parametrize("max_tokens,refused", [(2048, True), (300, False)])
def test_a_prompt_that_leaves_too_little_room_for_an_answer_is_too_long(daemon, max_tokens, refused):
    """Within the window but less than 1,024 tokens (or max_tokens) from its end: Claude
    Code gets the error it compacts on, not an answer cut to a few tokens."""
    overhead = count(daemon, long_prompt(0))
    body = long_prompt(8192 - 1024 + 200 - overhead)  # one token a word
    tokens = count(daemon, body)
    assert 8192 - 1024 < tokens < 8192 - 300
    if refused:
        reply = post(daemon, body | {"max_tokens": max_tokens})
        assert reply.status == 400 and reply.json()["error"]["message"] == f"prompt is too long: {tokens} tokens > {8192 - 1024} maximum"
        return
    # Accepted: the stream starts (and the hang-up right after cancels its long prefill).
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=60)
    try:
        conn.request("POST", "/v1/messages", json.dumps(body | {"max_tokens": max_tokens, "stream": True}), HEADERS)
        reply = conn.getresponse()
        assert reply.status == 200 and reply.getheader("content-type") == "text/event-stream"
    finally:
        conn.close()


def test_billing_header_is_not_rendered(daemon):
    body = first_turn()
    without = dict(body, system=body["system"][1:])
    assert count(daemon, body) == count(daemon, without)


def test_mid_conversation_system_turn_is_rendered(daemon):
    body = first_turn()
    shorter = dict(body, messages=body["messages"][:1])
    assert count(daemon, body) > count(daemon, shorter)


def test_non_streaming_fallback_of_the_same_request(daemon):
    reply = post(daemon, first_turn(stream=False, max_tokens=8))
    assert reply.status == 200
    message = reply.json()
    assert message["type"] == "message" and message["stop_reason"] in ("end_turn", "max_tokens")
    assert all(b["type"] == "text" and b["text"] for b in message["content"])


VALID = {"model": "claude-opus-4-8", "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]}


@pytest.mark.parametrize(
    ("body", "status", "kind", "message"),
    [
        (b'{"model": "claude-opus-4-8", "max_tokens": 4, "messages": [', 400, "invalid_request_error", "not valid JSON"),
        ({k: v for k, v in VALID.items() if k != "max_tokens"}, 400, "invalid_request_error", "max_tokens: Field required"),
        (dict(VALID, max_tokens="4"), 400, "invalid_request_error", "max_tokens: Expected `int`, got `str`"),
        (dict(VALID, messages=[{"role": "robot", "content": "hi"}]), 400, "invalid_request_error", "messages.0.role"),
        (dict(VALID, messages=[]), 400, "invalid_request_error", "messages"),
        (dict(VALID, stop_sequences=[""]), 400, "invalid_request_error", "stop sequences must be non-empty"),
        (dict(VALID, thinking={"type": "enabled", "budget_tokens": -1}), 400, "invalid_request_error", "thinking.budget_tokens"),
        (dict(VALID, model="gpt-4o"), 404, "not_found_error", "gpt-4o"),
        (b"x" * (33 * 1024 * 1024), 413, "request_too_large", "larger than"),
    ],
    ids=["malformed-json", "missing-max-tokens", "wrong-type", "bad-role", "no-messages", "empty-stop", "negative-budget", "unknown-model", "oversized"],
)
def test_bad_input_gets_the_envelope_and_the_daemon_keeps_serving(daemon, body, status, kind, message):
    reply = post(daemon, body)
    assert reply.status == status, reply.body
    error = reply.json()
    assert error["type"] == "error" and error["error"]["type"] == kind
    assert message in error["error"]["message"]
    assert error["request_id"] == reply.headers["request-id"]
    assert post(daemon, VALID).status == 200


def test_lenient_input_is_accepted(daemon):
    body = dict(
        VALID,
        system="Be brief.",
        messages=[
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "brand_new_block", "x": 1}]},
            {"role": "user", "content": "again"},
            {"role": "assistant", "content": [{"type": "thinking", "thinking": "hm", "signature": ""}, {"type": "text", "text": "Hello"}]},
            {"role": "user", "content": [{"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}, {"type": "text", "text": "what is this?"}]},
        ],
        # Anthropic wants 1024 <= budget_tokens < max_tokens; here any budget is served.
        thinking={"type": "enabled", "budget_tokens": 16},
        some_future_field={"a": 1},
        speed="fast",
    )
    reply = post(daemon, body, headers={"anthropic-beta": "a-beta-from-the-future-2030-01-01"})
    assert reply.status == 200, reply.body


@pytest.mark.parametrize(
    ("method", "path", "status"),
    [("HEAD", "/", 200), ("GET", "/health", 200), ("HEAD", "/api/hello", 200), ("POST", "/api/event_logging/batch", 200), ("GET", "/nope", 404), ("GET", "/v1/messages", 400)],
)
def test_housekeeping_routes(daemon, method, path, status):
    reply = request(daemon.port, method, path, b"{}" if method == "POST" else None)
    assert reply.status == status
    assert reply.headers["request-id"].startswith("req_")
    if status >= 400:
        assert reply.json()["type"] == "error"


CAPTURED = json.loads((Path(__file__).parent / "fixtures" / "claude_code_2.1.332.json").read_text())


def test_claude_code_2_1_332_s_default_request_is_understood(daemon):
    """Its whole default request (12 tools, one deferred; adaptive thinking shown as
    omitted; context management): counted, and too long for the tiny model's window in
    the words Claude Code compacts on. Its deferred tool costs nothing."""
    body, headers = CAPTURED["body"], CAPTURED["headers"] | {"content-type": "application/json"}
    assert body["model"] == "anyclaude-smollm2" and headers["x-claude-code-request-class"] == "main"
    tokens = count(daemon, body)
    room = min(1024, body["max_tokens"])  # the launcher's output limit for the tiny model
    assert tokens > 8192 - room
    reply = post(daemon, body, CAPTURED["path"], headers)
    assert reply.status == 400 and reply.json()["error"]["message"] == f"prompt is too long: {tokens} tokens > {8192 - room} maximum"
    undeferred = body | {"tools": [{k: v for k, v in t.items() if k != "defer_loading"} for t in body["tools"]]}
    assert count(daemon, undeferred) > tokens
