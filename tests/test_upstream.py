"""A profile's model on another server (issue 15), against real servers: a second anyclaude
daemon (the tiny profile) as an Anthropic-API upstream, mlx_lm.server with the tiny model as
an OpenAI-API one, and a scripted upstream (tests/fault_upstream.py) for what real servers
do only sometimes: stall, hang up, answer 500 or 529. The client is the official SDK."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import tomllib
from datetime import datetime, timedelta
from pathlib import Path

import anthropic
import pytest
import tomli_w

from anyclaude import doctor, launcher, profiles
import claude_code
from bench.harness import Daemon, free_port, request
import fault_upstream
from fault_upstream import FaultUpstream
from sse_grammar import check

IDLE = 3.0  # the front daemon's [timeouts] idle: a stalled upstream meets it
TOOLS = [{"name": "Read", "description": "Read a file", "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["file_path"]}}]


@pytest.fixture(scope="module")
def fault():
    server = FaultUpstream()
    yield server
    server.close()


class MlxServer:
    """mlx_lm.server on the tiny model (imported from its GGUF as the daemon does it),
    started at once and waited for later, so that it loads while other servers do."""

    def __init__(self, model: Path, log: Path):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", str(model), "--port", str(self.port)], stdout=out, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:  # its /health says when the model is loaded
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlx_lm.server did not start:\n{self.log.read_text()}")
            try:
                if request(self.port, "GET", "/health").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)


@pytest.fixture(scope="module")
def mlx_server(tiny_model, tmp_path_factory):
    server = MlxServer(tiny_model, tmp_path_factory.mktemp("mlx_server") / "server.log")
    yield server
    server.process.terminate()
    server.process.wait(30)


def front_profile(directory: Path, daemon, mlx_server: MlxServer, fault: FaultUpstream, tiny_model: Path) -> Path:
    data = tomllib.loads(profiles.find("tiny").read_text())
    local = data["models"]["smollm2"]
    data["models"] = {
        "local": local,
        "anth": {"upstream": daemon.url, "upstream_model": "anyclaude-smollm2", "max_tokens": 200},
        "oai": {"upstream": mlx_server.url, "api": "openai", "upstream_model": "default_model", "max_tokens": 64, "tokenizer": str(tiny_model)},
        "faulty": {"upstream": fault.url, "upstream_model": "big-model", "max_tokens": 100, "api_key_env": "FAULT_KEY"},
        "faulty-oai": {"upstream": fault.url, "api": "openai", "upstream_model": "big-model"},
        "down": {"upstream": f"http://127.0.0.1:{free_port()}", "timeout_connect": 2},
        "down-fb": {"upstream": f"http://127.0.0.1:{free_port()}", "fallback": "local"},
    }
    data["aliases"] = {"claude-opus-4-8": "anth", "claude-*": "oai"}
    data["timeouts"] = {"first_token": 60, "idle": IDLE, "total": 300, "ping_interval": 0.5}
    path = directory / "front.toml"
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.fixture(scope="module")
def front(tmp_path_factory, model_cache, mlx_server, daemon, fault, tiny_model):
    directory = tmp_path_factory.mktemp("front")
    mlx_server.wait_ready()  # it loaded while the upstream daemon did
    d = Daemon(str(front_profile(directory, daemon, mlx_server, fault, tiny_model)), model_cache, directory / "daemon.log", env={"FAULT_KEY": "sk-upstream"})
    try:
        d.wait_ready()
        yield d
    finally:
        assert d.stop() == 0, d.output()


@pytest.fixture(scope="module")
def sdk(front) -> anthropic.Anthropic:
    return anthropic.Anthropic(base_url=front.url, api_key="sk-local", max_retries=0, timeout=120)


def post(front, body: dict, path: str = "/v1/messages", headers: dict | None = None):
    return request(front.port, "POST", path, json.dumps(body).encode(), headers)


def ask(model: str, text: str, **extra) -> dict:
    return {"model": model, "max_tokens": 32, "messages": [{"role": "user", "content": text}], **extra}


def record(front, request_id: str) -> dict:
    (line,) = [r for r in front.records() if r["request_id"] == request_id]
    return line


# --- real upstreams -------------------------------------------------------------------


def test_an_anthropic_api_upstream_through_the_sdk_streamed_and_not(front, sdk, daemon):
    with sdk.messages.stream(model="claude-opus-4-8", max_tokens=8, messages=[{"role": "user", "content": "Say hello."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    assert final.usage.input_tokens > 0 and final.usage.output_tokens > 0
    assert final.stop_reason in ("end_turn", "max_tokens") and final.model == "claude-opus-4-8"
    message = sdk.messages.create(model="anyclaude-anth", max_tokens=4, messages=[{"role": "user", "content": "Say hello."}])
    assert message.content[0].text and message.usage.input_tokens > 0
    reply = post(front, ask("anyclaude-anth", "Hi", stream=True, max_tokens=4))
    check(reply.body)
    line = record(front, reply.headers["request-id"])
    assert line["upstream"] == daemon.url and line["upstream_status"] == 200 and line["upstream_s"] >= 0
    assert line["outcome"] in ("complete", "max_tokens") and line["ended"] == "message_stop" and line["ttft_s"] > 0
    # The upstream was asked for its own name of the model.
    assert daemon.records()[-1]["model"] == "anyclaude-smollm2"
    counted = sdk.messages.count_tokens(model="anyclaude-anth", messages=[{"role": "user", "content": "Say hello."}])
    assert counted.input_tokens > 0


def test_an_openai_api_upstream_mlx_lm_server_through_the_sdk(front, sdk, daemon):
    with sdk.messages.stream(model="claude-sonnet-4-6", max_tokens=6, messages=[{"role": "user", "content": "Say hello."}]) as stream:
        text = "".join(stream.text_stream)
        final = stream.get_final_message()
    assert text and final.content[0].text == text
    # Counted by mlx_lm.server at the end, carried in message_delta (the SDK takes those).
    assert final.usage.input_tokens + final.usage.cache_read_input_tokens > 5 and final.usage.output_tokens > 0
    message = sdk.messages.create(model="anyclaude-oai", max_tokens=4, system="You are terse.", messages=[{"role": "user", "content": "Hi"}])
    assert message.content[0].text
    reply = post(front, ask("anyclaude-oai", "Hi", stream=True, max_tokens=4))
    events = check(reply.body)
    assert events[-2]["usage"]["output_tokens"] > 0
    # A conversation with tool calls and their results, and a system turn mid-way, as
    # mlx_lm.server renders it with a template that knows no tools.
    history = [
        {"role": "user", "content": "Read /tmp/x"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/tmp/x"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "hello"}]},
        {"role": "system", "content": "Be brief."},
    ]
    check(post(front, {"model": "anyclaude-oai", "max_tokens": 4, "stream": True, "tools": TOOLS, "messages": history}).body)
    # OpenAI-API servers do not count tokens: the model's `tokenizer` does (as the tiny
    # daemon counts the same prompt), and message_start says as much...
    counted = post(front, ask("anyclaude-oai", "Hi"), "/v1/messages/count_tokens").json()["input_tokens"]
    assert counted == post(daemon, ask("anyclaude-smollm2", "Hi"), "/v1/messages/count_tokens").json()["input_tokens"]
    assert events[0]["message"]["usage"]["input_tokens"] == counted
    # ... and without one, a 404 tells the client to estimate.
    assert post(front, ask("anyclaude-faulty-oai", "Hi"), "/v1/messages/count_tokens").status == 404


# --- what is forwarded ------------------------------------------------------------------


def test_the_request_is_forwarded_without_the_billing_header_with_unknown_fields_and_betas(front, fault):
    body = ask("anyclaude-faulty", "SCRIPT:echo", max_tokens=5000, future_field={"x": 1}, context_management={"edits": []})
    body["system"] = [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.3; cch=abc"}, {"type": "text", "text": "You are Claude Code."}]
    reply = post(front, body, headers={"anthropic-beta": "fancy-beta-2099-01-01", "anthropic-version": "2023-06-01", "x-claude-code-session-id": "s1"})
    assert reply.status == 200, reply.body
    sent = fault.last()
    assert sent["body"]["model"] == "big-model" and sent["body"]["stream"] is True
    assert sent["body"]["max_tokens"] == 100  # the profile's max_tokens
    assert sent["body"]["system"] == [{"type": "text", "text": "You are Claude Code."}]
    assert sent["body"]["future_field"] == {"x": 1} and sent["body"]["context_management"] == {"edits": []}
    assert sent["headers"]["anthropic-beta"] == "fancy-beta-2099-01-01" and sent["headers"]["x-claude-code-session-id"] == "s1"
    assert sent["headers"]["x-api-key"] == "sk-upstream"  # from api_key_env, never the client's
    message = reply.json()
    assert message["content"] == [{"type": "text", "text": "ok"}]
    assert message["usage"]["input_tokens"] == 7 and message["usage"]["cache_read_input_tokens"] == 3
    counted = post(front, ask("anyclaude-faulty", "Hi"), "/v1/messages/count_tokens")
    assert counted.json() == {"input_tokens": 1234} and fault.last("/v1/messages/count_tokens")["body"]["model"] == "big-model"


def test_claude_code_s_first_turn_reaches_the_upstream_whole_but_for_the_billing_header(front, fault):
    turn = {**claude_code.first_turn(), "model": "anyclaude-faulty"}
    reply = post(front, turn, headers=claude_code.HEADERS)
    assert reply.status == 200
    check(reply.body)
    sent = fault.last()
    assert sent["body"] == {**turn, "model": "big-model", "max_tokens": 100, "system": turn["system"][1:]}
    assert sent["headers"]["anthropic-beta"] == claude_code.HEADERS["anthropic-beta"]
    assert sent["headers"]["x-api-key"] != claude_code.HEADERS["x-api-key"]  # the client's key stays here


def test_blocks_are_renumbered_unknown_events_dropped_and_a_call_makes_it_tool_use(front):
    events = check(post(front, ask("anyclaude-faulty", "SCRIPT:tool", stream=True, tools=TOOLS)).body)
    starts = [e["content_block"] for e in events if e["type"] == "content_block_start"]
    assert [b["type"] for b in starts] == ["text", "tool_use"] and starts[1]["name"] == "Read"
    json_text = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert json.loads(json_text) == {"file_path": "/tmp/x"}
    assert events[-2]["delta"]["stop_reason"] == "tool_use" and events[-2]["usage"]["output_tokens"] == 12


def test_a_conversation_is_translated_to_chat_completions(front, fault):
    body = {
        "model": "anyclaude-faulty-oai",
        "max_tokens": 50,
        "system": [{"type": "text", "text": "x-anthropic-billing-header: cc_version=2"}, {"type": "text", "text": "Be brief."}],
        "temperature": 0.3, "top_p": 0.9, "top_k": 20, "stop_sequences": ["END"],
        "tools": TOOLS, "tool_choice": {"type": "auto", "disable_parallel_tool_use": True},
        "messages": [
            {"role": "user", "content": "Read /tmp/x"},
            {"role": "assistant", "content": [{"type": "text", "text": "Reading."}, {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"file_path": "/tmp/x"}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_1", "content": "hello"}, {"type": "text", "text": "Now SCRIPT:oai-reasoning"}]},
            {"role": "system", "content": "The user is in a hurry."},
        ],
    }
    reply = post(front, body)
    assert reply.status == 200, reply.body
    sent = fault.last("/v1/chat/completions")["body"]
    messages = sent["messages"]
    assert messages[0] == {"role": "system", "content": "Be brief."}
    assert messages[2]["role"] == "assistant" and messages[2]["content"] == "Reading."
    call = messages[2]["tool_calls"][0]
    assert call["id"] == "toolu_1" and call["function"]["name"] == "Read" and json.loads(call["function"]["arguments"]) == {"file_path": "/tmp/x"}
    assert messages[3] == {"role": "tool", "tool_call_id": "toolu_1", "content": "hello"}
    # A system message mid-conversation reaches servers that take one at the start only.
    assert messages[-1]["role"] == "user" and "The user is in a hurry." in messages[-1]["content"]
    assert sent["tools"][0]["function"]["name"] == "Read" and sent["tool_choice"] == "auto" and sent["parallel_tool_calls"] is False
    assert (sent["temperature"], sent["top_p"], sent["top_k"], sent["stop"], sent["max_tokens"]) == (0.3, 0.9, 20, ["END"], 50)
    assert sent["stream"] is True and sent["stream_options"] == {"include_usage": True} and sent["model"] == "big-model"
    message = reply.json()
    assert [b["type"] for b in message["content"]] == ["thinking", "text"]
    assert message["content"][0]["thinking"] == "The user wants a number." and message["content"][1]["text"] == "Forty-two."
    assert message["usage"]["input_tokens"] == 11 and message["usage"]["output_tokens"] == 6


def test_streamed_openai_tool_calls_become_tool_use_blocks_repaired_to_the_schema(front, sdk):
    events = check(post(front, ask("anyclaude-faulty-oai", "SCRIPT:oai-tool", stream=True, tools=TOOLS)).body)
    assert [e["content_block"]["type"] for e in events if e["type"] == "content_block_start"] == ["text", "tool_use", "tool_use"]
    message = sdk.messages.create(model="anyclaude-faulty-oai", max_tokens=50, tools=TOOLS, messages=[{"role": "user", "content": "SCRIPT:oai-tool"}])
    assert message.stop_reason == "tool_use"
    assert [b.input for b in message.content if b.type == "tool_use"] == [{"file_path": "/tmp/x", "limit": 5}, {"file_path": "/tmp/y"}]
    assert message.usage.input_tokens == 8 and message.usage.cache_read_input_tokens == 12 and message.usage.output_tokens == 9
    # A call that cannot be made valid is shown as text, and the turn ends as text does.
    bad = post(front, ask("anyclaude-faulty-oai", "SCRIPT:oai-bad-tool", tools=TOOLS))
    body = bad.json()
    assert body["stop_reason"] == "end_turn" and [b["type"] for b in body["content"]] == ["text"]
    assert record(front, bad.headers["request-id"])["tool_parse_errors"]


def test_tool_input_from_an_anthropic_api_upstream_is_repaired_and_checked_as_a_local_model_s(front, sdk):
    message = sdk.messages.create(model="anyclaude-faulty", max_tokens=50, tools=TOOLS, messages=[{"role": "user", "content": "SCRIPT:tool-repair"}])
    assert [b.type for b in message.content] == ["tool_use", "text"] and message.stop_reason == "tool_use"
    assert message.content[0].name == "Read" and message.content[0].input == {"file_path": "/tmp/x", "limit": 5}
    assert '"limit": 3' in message.content[1].text  # the call no repair makes valid, as its words
    reply = post(front, ask("anyclaude-faulty", "SCRIPT:tool-repair", stream=True, tools=TOOLS))
    events = check(reply.body)
    json_text = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert json.loads(json_text) == {"file_path": "/tmp/x", "limit": 5}
    (reason,) = record(front, reply.headers["request-id"])["tool_parse_errors"]
    assert "file_path" in reason and "required" in reason
    # Input that is not JSON at all: text, and the turn ends as text does.
    bad = post(front, ask("anyclaude-faulty", "SCRIPT:tool-unparseable", tools=TOOLS))
    body = bad.json()
    assert body["stop_reason"] == "end_turn" and [b["type"] for b in body["content"]] == ["text"]
    assert "unparseable" in record(front, bad.headers["request-id"])["tool_parse_errors"][0]


def test_mlx_lm_server_ignores_tool_choice():
    """What the forced-call tests below build on: mlx-lm 0.32's server reads neither
    tool_choice nor response_format, and renders tools only into templates that know them."""
    import inspect

    from mlx_lm import server

    source = inspect.getsource(server)
    assert "tool_choice" not in source and "response_format" not in source


def test_a_forced_tool_call_through_mlx_lm_server_is_refused_never_answered_as_text(front, sdk, mlx_server):
    forced = dict(model="anyclaude-oai", max_tokens=24, tools=TOOLS, messages=[{"role": "user", "content": "Read the file /tmp/x."}])
    # mlx_lm.server takes the forced request (tool_choice named, or "required") and answers
    # it with text: anyclaude says so, in a 400 (the streamed request, in an error event
    # if pings began the stream first), rather than pass that text off as the call.
    with pytest.raises(anthropic.BadRequestError) as caught:
        sdk.messages.create(**forced, tool_choice={"type": "tool", "name": "Read"})
    message = caught.value.body["error"]["message"]
    assert caught.value.body["error"]["type"] == "invalid_request_error"
    assert message.startswith("tool_choice tool: the upstream ") and mlx_server.url in message and "without a call to 'Read'" in message
    line = record(front, caught.value.response.headers["request-id"])
    assert line["upstream"] == mlx_server.url and line["upstream_status"] == 200 and line["outcome"] == "error" and line["error"] == message
    with pytest.raises(anthropic.APIStatusError) as caught:
        with sdk.messages.stream(**forced, tool_choice={"type": "any"}) as stream:
            for _ in stream:
                pass
    assert caught.value.body["error"]["type"] == "invalid_request_error" and "tool_choice any" in caught.value.body["error"]["message"]
    # Not forced, the same request is answered as text.
    assert sdk.messages.create(**forced).content[0].type == "text"
    # A forced tool that is not among the tools is refused before anything is sent, as for a local model.
    reply = post(front, {**forced, "tool_choice": {"type": "tool", "name": "Write"}})
    assert reply.status == 400 and reply.json()["error"]["message"] == "tool_choice.name: no tool named 'Write' among the tools"
    assert record(front, reply.headers["request-id"]).get("upstream_status") is None


def test_a_forced_tool_call_through_an_anthropic_api_upstream_that_forces_it(front, sdk, daemon):
    """The upstream daemon forces the call with its grammar; this one checks it again."""
    message = sdk.messages.create(
        model="anyclaude-anth", max_tokens=200, tools=TOOLS, tool_choice={"type": "tool", "name": "Read"},
        messages=[{"role": "user", "content": "What is in my notes file?"}], extra_body={"temperature": 0},
    )
    assert message.stop_reason == "tool_use"
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert call.name == "Read" and isinstance(call.input["file_path"], str)
    assert daemon.records()[-1]["call_grammar"] == "forced"


def test_a_forced_tool_call_through_upstreams_that_answer_with_a_call_or_without(front, fault):
    # An OpenAI-API server that forces it (vLLM, SGLang) is asked to: "required", or the function named.
    message = post(front, ask("anyclaude-faulty-oai", "SCRIPT:oai-tool", tools=TOOLS, tool_choice={"type": "any"})).json()
    assert fault.last("/v1/chat/completions")["body"]["tool_choice"] == "required"
    assert message["stop_reason"] == "tool_use" and [b["type"] for b in message["content"]] == ["text", "tool_use", "tool_use"]
    post(front, ask("anyclaude-faulty-oai", "SCRIPT:oai-tool", tools=TOOLS, tool_choice={"type": "tool", "name": "Read"}))
    assert fault.last("/v1/chat/completions")["body"]["tool_choice"] == {"type": "function", "function": {"name": "Read"}}
    # An Anthropic-API upstream that answers text, or a call that cannot be made valid.
    for script, missing in [("echo", "without a tool call"), ("tool-unparseable", "unparseable input")]:
        reply = post(front, ask("anyclaude-faulty", f"SCRIPT:{script}", tools=TOOLS, tool_choice={"type": "any"}))
        assert reply.status == 400 and missing in reply.json()["error"]["message"], reply.body
        assert fault.last()["body"]["tool_choice"] == {"type": "any"}


# --- faults -------------------------------------------------------------------------------


def test_a_stalled_upstream_meets_the_watchdog_and_the_stream_ends_well_formed(front, fault):
    started = time.monotonic()
    reply = post(front, ask("anyclaude-faulty", "SCRIPT:stall", stream=True))
    took = time.monotonic() - started
    events = check(reply.body)
    assert events[-2]["delta"]["stop_reason"] == "max_tokens" and "Hello" in reply.body.decode()
    assert IDLE <= took < IDLE + 10
    assert record(front, reply.headers["request-id"])["outcome"] == "timeout_idle"
    assert fault.hangups.get(timeout=10) == "stall"  # the upstream request was closed


@pytest.mark.parametrize("model", ["anyclaude-faulty", "anyclaude-faulty-oai"])
def test_a_call_written_for_longer_than_the_idle_timeout_is_not_cut(front, model):
    """Its arguments show nothing until the call ends, but the upstream is not silent."""
    script = "SCRIPT:oai-slow-tool" if model.endswith("oai") else "SCRIPT:slow-tool"
    assert 6 * fault_upstream.PACE > IDLE > fault_upstream.PACE  # what the script is for
    reply = post(front, ask(model, script, stream=True, tools=TOOLS))
    events = check(reply.body)
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    json_text = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert json.loads(json_text) == {"file_path": "/tmp/long/path"}
    assert record(front, reply.headers["request-id"])["outcome"] == "tool_use"


@pytest.mark.parametrize("script", ["hangup", "error-event", "oai-hangup"])
def test_an_upstream_that_hangs_up_mid_stream_ends_it_with_an_error_claude_code_retries(front, script):
    model = "anyclaude-faulty-oai" if script.startswith("oai") else "anyclaude-faulty"
    reply = post(front, ask(model, f"SCRIPT:{script}", stream=True))
    events = check(reply.body)
    assert events[-1]["type"] == "error" and events[-1]["error"]["type"] == "overloaded_error"
    assert record(front, reply.headers["request-id"])["ended"] == "error"


@pytest.mark.parametrize(("model", "script", "retry_after"), [("anyclaude-down", "", "5"), ("anyclaude-faulty", "SCRIPT:status-500", "5"), ("anyclaude-faulty", "SCRIPT:status-529", "7"), ("anyclaude-faulty-oai", "SCRIPT:status-529", "7")])
@pytest.mark.parametrize("stream", [True, False])
def test_an_upstream_that_refuses_or_fails_is_a_529_with_retry_after_before_any_byte(front, model, script, retry_after, stream):
    reply = post(front, ask(model, script or "Hi", stream=stream))
    assert reply.status == 529 and reply.headers["retry-after"] == retry_after, reply.body
    assert reply.json()["error"]["type"] == "overloaded_error"
    line = record(front, reply.headers["request-id"])
    assert line["outcome"] == "overloaded" and line["upstream"]
    assert line.get("upstream_status") == (int(script[-3:]) if script else None)


def test_an_upstream_4xx_is_passed_on_with_its_wording(front, fault):
    reply = post(front, ask("anyclaude-faulty", "SCRIPT:status-400"))
    assert reply.status == 400 and reply.json()["error"]["message"] == "prompt is too long: 40000 tokens > 32768 maximum"
    # A request beyond the upstream's context: with room for an answer, max_tokens is
    # clamped, as for a local model; without, the prompt is too long, in Claude Code's words.
    reply = post(front, ask("anyclaude-faulty-oai", "SCRIPT:context", max_tokens=2000))
    assert reply.status == 200 and fault.last("/v1/chat/completions")["body"]["max_tokens"] == 1100
    reply = post(front, ask("anyclaude-faulty-oai", "SCRIPT:context-prompt", max_tokens=2000))
    assert reply.status == 400 and reply.json()["error"]["message"] == "prompt is too long: 1500 tokens > 976 maximum"
    # Its refusal of the profile's key is not the client's 401 (Claude Code would ask its user to log in).
    reply = post(front, ask("anyclaude-faulty", "SCRIPT:status-401"))
    assert reply.status == 500 and "$FAULT_KEY" in reply.json()["error"]["message"]
    assert record(front, reply.headers["request-id"])["upstream_status"] == 401


def test_a_client_that_hangs_up_closes_the_upstream_request(front, sdk, fault):
    with sdk.messages.create(model="anyclaude-faulty", max_tokens=20, stream=True, messages=[{"role": "user", "content": "SCRIPT:stall"}]) as stream:
        for event in stream:
            if event.type == "content_block_delta":
                break
    assert fault.hangups.get(timeout=IDLE - 1) == "stall"  # before the watchdog would have


def test_a_client_that_hangs_up_before_the_upstream_answers_closes_its_request(front, fault):
    body = json.dumps(ask("anyclaude-faulty", "SCRIPT:no-answer", stream=True)).encode()
    with socket.create_connection(("127.0.0.1", front.port)) as client:
        client.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        assert fault.held.get(timeout=10) == "no-answer"
    assert fault.hangups.get(timeout=10) == "no-answer"


def test_a_fallback_serves_while_the_upstream_is_down(front):
    reply = post(front, ask("anyclaude-down-fb", "Hi", max_tokens=4))
    assert reply.status == 200 and reply.json()["content"]
    line = record(front, reply.headers["request-id"])
    assert line["fallback"] == "local" and "unreachable" in line["error"]


def test_health_and_models_show_each_upstream(front):
    models = request(front.port, "GET", "/health").json()["models"]
    assert models["faulty"]["reachable"] is True and models["faulty"]["context_length"] == 32768  # its /v1/models
    assert models["faulty"]["served"] == ["big-model"] and models["faulty"]["api"] == "anthropic"
    assert models["down"]["reachable"] is False and models["down"]["error"]
    assert models["anth"]["reachable"] is True and models["oai"]["api"] == "openai"
    listed = {m["id"]: m for m in request(front.port, "GET", "/v1/models").json()["data"]}
    assert listed["anyclaude-faulty"]["max_input_tokens"] == 32768 and "claude-opus-4-8" in listed
    health = request(front.port, "GET", "/health").json()
    lines = doctor.status_lines(front.url, health)
    assert f"upstream  faulty: anthropic API at {models['faulty']['upstream']}, reachable" in lines
    assert any(line.startswith("upstream  down: anthropic API at") and "not reachable" in line for line in lines)
    # `anyclaude claude`: the context window Claude Code is given is the upstream's.
    profile = profiles.load(health["profile_path"]).profile
    assert models["anth"]["context_length"] == 8192  # from the upstream daemon's /v1/models
    assert launcher.context_window(profile, health) == 8192
    assert launcher.model_ids(profile)["opus"] == "anyclaude-anth"
    # `anyclaude doctor` asks each upstream itself.
    assert doctor.check_upstream("oai", profile.models["oai"])[0] == doctor.OK
    verdict, _, detail = doctor.check_upstream("faulty", profile.models["faulty"])  # its key's variable is not set here
    assert verdict == doctor.WARN and "$FAULT_KEY" in detail
    assert doctor.check_upstream("down", profile.models["down"])[0] == doctor.FAIL


def test_profile_errors_name_the_key(tmp_path):
    path = tmp_path / "p.toml"

    def error(models: str) -> str:
        path.write_text(models)
        with pytest.raises(profiles.ProfileError) as caught:
            profiles.load(str(path))
        return str(caught.value)

    assert "models.a.path: required key missing" in error("[models.a]\nmax_tokens = 5\n")
    assert "not both" in error('[models.a]\npath = "x"\nupstream = "http://h:1"\n')
    assert "models.a.upstream: expected a base URL" in error('[models.a]\nupstream = "gpu-box:8000"\n')
    assert "without /v1" in error('[models.a]\nupstream = "http://h:1/v1"\n')
    assert "models.a.api: Invalid enum value 'grpc'" in error('[models.a]\nupstream = "http://h:1"\napi = "grpc"\n')
    assert "models.a.fallback: expected one of the models" in error('[models.a]\nupstream = "http://h:1"\nfallback = "b"\n')
    assert "models.a.fallback: expected a local model" in error('[models.a]\nupstream = "http://h:1"\nfallback = "b"\n[models.b]\nupstream = "http://h:2"\n')
    assert "models.a.tokenizer: only for a model with an `upstream`" in error('[models.a]\npath = "x"\ntokenizer = "t"\n')
    assert "models.a.upstream_model: only for a model with an `upstream`" in error('[models.a]\npath = "x"\nupstream_model = "m"\n')
    assert "line 3" in error('[models.a]\nupstream = "http://h:1"\ntimeout_connect = 0\n')


def streaming(front, body: dict) -> tuple[threading.Event, dict, threading.Thread]:
    """A streamed request read in a thread: set once its first bytes came, its body and
    request id in the dict once it ended."""
    began, result = threading.Event(), {}

    def read():
        import http.client

        conn = http.client.HTTPConnection("127.0.0.1", front.port, timeout=120)
        conn.request("POST", "/v1/messages", json.dumps(body).encode(), {"content-type": "application/json"})
        response = conn.getresponse()
        chunks = [response.read1()]
        began.set()
        while chunk := response.read1():
            chunks.append(chunk)
        result["body"], result["id"] = b"".join(chunks), response.getheader("request-id")

    reader = threading.Thread(target=read)
    reader.start()
    return began, result, reader


def reloaded(front, path: Path, data: dict) -> dict:
    """Write the profile and wait for the daemon to log the swap, watching its log: a busy
    poll of /health would take the CPU the daemon needs (this machine has two), and a
    model loading beside a stream starves it enough already."""
    import watchfiles

    seen = len(front.events())
    profiles.write(path, data)
    deadline = time.monotonic() + 120
    for _ in watchfiles.watch(front.requests, debounce=50, rust_timeout=5000, yield_on_timeout=True):
        new = [e["event"] for e in front.events()[seen:]]
        assert "profile.reload.error" not in new, front.events()[seen:]
        if "profile.reload" in new:
            return request(front.port, "GET", "/health").json()
        assert time.monotonic() < deadline, new


def test_a_hot_reload_from_local_to_upstream_mid_stream(front, daemon):
    """Near the end of this file: it makes the front daemon's local model an upstream one."""
    path = Path(request(front.port, "GET", "/health").json()["profile_path"])
    before = request(front.port, "GET", "/health").json()["revision"]
    began, result, reader = streaming(front, ask("anyclaude-local", "Tell me a long story about a cat.", max_tokens=24, stream=True))
    assert began.wait(60)
    data = tomllib.loads(path.read_text())
    data["models"]["local"] = {"upstream": daemon.url, "upstream_model": "anyclaude-smollm2", "max_tokens": 8}
    del data["models"]["down-fb"]  # its fallback is not local any more
    health = reloaded(front, path, data)
    reader.join(60)
    check(result["body"])  # the stream begun on the local engine ended on it, well-formed
    streamed = record(front, result["id"])
    assert streamed["revision"] == before and "upstream" not in streamed
    (swapped,) = [e for e in front.events() if e["event"] == "profile.reload"]
    ended = datetime.fromisoformat(streamed["ts"]) + timedelta(seconds=streamed["duration_s"])  # ts: when it began
    assert datetime.fromisoformat(swapped["ts"]) < ended, "the stream ended before the swap: it was not mid-stream"
    assert health["models"]["local"]["upstream"] == daemon.url
    after = post(front, ask("anyclaude-local", "Hi", max_tokens=4))
    assert after.status == 200 and record(front, after.headers["request-id"])["upstream"] == daemon.url


def test_a_hot_reload_from_upstream_to_local_mid_stream(front, fault):
    """Last in this file: the front daemon's `faulty` becomes a local model while a call
    streams from its upstream, which finishes the call only once the swap is done."""
    path = Path(request(front.port, "GET", "/health").json()["profile_path"])
    before = request(front.port, "GET", "/health").json()["revision"]
    began, result, reader = streaming(front, ask("anyclaude-faulty", "SCRIPT:held-tool", stream=True, tools=TOOLS))
    try:
        assert began.wait(60)
        data = tomllib.loads(path.read_text())
        data["models"]["faulty"] = tomllib.loads(profiles.find("tiny").read_text())["models"]["smollm2"]
        health = reloaded(front, path, data)
        assert "upstream" not in health["models"]["faulty"]
    finally:
        fault.released.set()
    reader.join(60)
    events = check(result["body"])  # the call begun on the upstream ended there, whole
    assert events[-2]["delta"]["stop_reason"] == "tool_use"
    json_text = "".join(e["delta"]["partial_json"] for e in events if e["type"] == "content_block_delta" and e["delta"]["type"] == "input_json_delta")
    assert json.loads(json_text) == {"file_path": "/tmp/x"}
    streamed = record(front, result["id"])
    assert streamed["revision"] == before and streamed["upstream"] == fault.url and streamed["outcome"] == "tool_use"
    after = post(front, ask("anyclaude-faulty", "Hi", max_tokens=4))
    assert after.status == 200 and "upstream" not in record(front, after.headers["request-id"])
