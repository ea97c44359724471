"""Prompt caching through the real daemon: usage accounting, session turns, miss diagnostics."""

from __future__ import annotations

import uuid

import anthropic
import pytest

from bench.harness import request, serving  # noqa: F401

MODEL = "claude-opus-4-8"
GREEDY = {"extra_body": {"temperature": 0}}


def record(daemon, request_id: str) -> dict:
    (found,) = [r for r in daemon.records() if r["request_id"] == request_id]
    return found


def test_usage_agrees_between_count_tokens_message_start_the_body_and_the_log(client, daemon):
    body = dict(model=MODEL, system="You answer in one word.", messages=[{"role": "user", "content": "Name a fruit."}])
    total = client.messages.count_tokens(**body).input_tokens
    plain = client.messages.create(max_tokens=4, **body, **GREEDY)
    with client.messages.stream(max_tokens=4, **body, **GREEDY) as stream:
        request_id = stream.response.headers["request-id"]
        for event in stream:
            if event.type == "message_start":
                start = event.message.usage
        final = stream.get_final_message()
    for usage in (plain.usage, start, final.usage):
        assert usage.input_tokens + usage.cache_read_input_tokens + usage.cache_creation_input_tokens == total
        assert usage.input_tokens >= 1
    # The second time, all but the last prompt token came from the cache.
    assert start.cache_read_input_tokens == final.usage.cache_read_input_tokens == total - 1
    logged = record(daemon, request_id)
    assert logged["prompt_tokens"] == total and logged["cached_tokens"] == total - 1
    assert logged["cache_source"] == "conversation" and logged["cache_lookup"] == "hit"
    assert logged["cache_store"] == "stored"


def test_a_session_turn_reuses_the_last_one_and_a_changed_system_prompt_is_named(client, daemon):
    session = {"x-claude-code-session-id": str(uuid.uuid4())}
    system = "You are a helpful assistant for a small software project. Keep answers short."
    turn = [{"role": "user", "content": "Say hello."}]
    first = client.messages.create(model=MODEL, max_tokens=8, system=system, messages=turn, extra_headers=session, **GREEDY)
    turn += [{"role": "assistant", "content": [b.model_dump() for b in first.content]}, {"role": "user", "content": "Now say goodbye."}]
    second = client.messages.create(model=MODEL, max_tokens=8, system=system, messages=turn, extra_headers=session, **GREEDY)
    one, two = record(daemon, first._request_id), record(daemon, second._request_id)
    # Everything of the first turn but what the template re-renders differently is reused.
    assert two["cached_tokens"] >= one["prompt_tokens"]
    assert "cache_miss" not in two and two["cache_source"] == "conversation"
    third = client.messages.create(model=MODEL, max_tokens=4, system=system + " Today is Tuesday.", messages=turn, extra_headers=session, **GREEDY)
    miss = record(daemon, third._request_id)["cache_miss"]
    assert miss["part"] == "system" and 0 < miss["position"] < one["prompt_tokens"]
    turn[1]["content"][0]["text"] += " (edited)"
    fourth = client.messages.create(model=MODEL, max_tokens=4, system=system + " Today is Tuesday.", messages=turn, extra_headers=session, **GREEDY)
    assert record(daemon, fourth._request_id)["cache_miss"]["part"] == "message 1"


def test_claude_code_s_request_class_decides_what_is_a_side_request(client, daemon):
    def logged(model: str, headers: dict) -> dict:
        reply = client.messages.create(model=model, max_tokens=2, messages=[{"role": "user", "content": "Hi"}], extra_headers=headers, **GREEDY)
        return record(daemon, reply._request_id)

    agent = {"x-claude-code-agent-id": "a1", "x-claude-code-parent-agent-id": "a0"}
    title = logged("anyclaude-smollm2", {"x-claude-code-request-class": "auxiliary"} | agent)
    assert (title["side"], title["request_class"], title["agent_id"], title["parent_agent_id"]) == (True, "auxiliary", "a1", "a0")
    assert "side" not in logged("claude-haiku-4-5", {"x-claude-code-request-class": "main"})
    assert logged("claude-haiku-4-5", {})["side"] is True  # no hint: the haiku model is for side requests
    assert "side" not in logged("anyclaude-smollm2", {})


def test_images_a_model_cannot_see_are_counted_and_warned_of_once(client, daemon):
    image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}}
    for _ in range(2):
        reply = client.messages.create(model=MODEL, max_tokens=2, messages=[{"role": "user", "content": [image, image, {"type": "text", "text": "What is this?"}]}], **GREEDY)
        assert record(daemon, reply._request_id)["images_unseen"] == 2
    assert daemon.output().count("cannot see images") == 1


@pytest.fixture(scope="module")
def small_cache(tmp_path_factory, model_cache, tiny_model):
    # About 100 KB: less than the KV cache of the shortest prompt.
    yield from serving(tmp_path_factory.mktemp("small-cache"), model_cache, "small-cache", cache={"max_gb": 0.0001})


def test_an_entry_larger_than_the_budget_is_logged_as_such_and_the_next_turn_as_finding_none(small_cache):
    client = anthropic.Anthropic(base_url=small_cache.url, api_key="sk-local-test", max_retries=0, timeout=300)
    body = dict(model=MODEL, max_tokens=4, system="You answer in one word.", messages=[{"role": "user", "content": "Name a fruit."}], **GREEDY)
    first, second = client.messages.create(**body), client.messages.create(**body)
    one, two = record(small_cache, first._request_id), record(small_cache, second._request_id)
    assert one["cache_store"] == two["cache_store"] == "too_large"
    assert one["cache_lookup"] == two["cache_lookup"] == "no_entries"
    assert two["cached_tokens"] == 0 and "cache_source" not in two
    assert second.usage.cache_read_input_tokens == 0


def test_after_a_compaction_the_old_conversation_is_marked_to_go_first(client, daemon):
    session = {"x-claude-code-session-id": str(uuid.uuid4())}
    system = "You are a helpful assistant for a small software project. Keep answers short."
    turn = [{"role": "user", "content": "Say hello to the whole team, please."}]
    client.messages.create(model=MODEL, max_tokens=4, system=system, messages=turn, extra_headers=session, **GREEDY)
    summary = [{"role": "user", "content": "This session continues from a summary: we said hello."}]
    compacted = client.messages.create(
        model=MODEL, max_tokens=4, system=system, messages=summary, extra_headers=session | {"x-claude-code-context-compacted": "true"}, **GREEDY
    )
    assert record(daemon, compacted._request_id)["cache_demoted"] >= 1


@pytest.fixture(scope="module")
def one_entry(tmp_path_factory, model_cache, tiny_model):
    # About 21 MB: one conversation's KV (its buffer grows 256 tokens at a time, 11.8 MB
    # on the tiny model), the live request's and a checkpoint or two, not two conversations.
    yield from serving(tmp_path_factory.mktemp("one-entry"), model_cache, "one-entry", cache={"max_gb": 0.02})


def test_an_evicted_conversation_leaves_its_checkpoint_and_the_logs_say_how_each_request_was_served(one_entry):
    import subprocess
    import sys

    from bench.harness import REPO

    client = anthropic.Anthropic(base_url=one_entry.url, api_key="sk-local-test", max_retries=0, timeout=300)
    systems = ["You are a helpful assistant for a small software project. Keep answers short.", "You are a file search specialist. Report paths only, one per line."]
    turns = {s: [{"role": "user", "content": "Say hello."}] for s in systems}
    replies = []
    for system in (systems[0], systems[1], systems[1], systems[0]):
        reply = client.messages.create(model=MODEL, max_tokens=4, system=system, messages=turns[system], **GREEDY)
        replies.append(record(one_entry, reply._request_id))
        turns[system] += [{"role": "assistant", "content": [b.model_dump() for b in reply.content]}, {"role": "user", "content": "And goodbye."}]
    # The second conversation's entry did not fit beside the first: the first was cut
    # back to its system prompt's checkpoint (which its next turn reused), the second
    # conversation's next turn reused all of it.
    evicted = [e for e in one_entry.events() if e["event"] == "cache.evict"]
    # (An answer cut at max_tokens: its last token was never given to the model.)
    assert [e["entry"]["tokens"] for e in evicted] == [replies[0]["prompt_tokens"] + 3, replies[2]["prompt_tokens"] + 3]
    assert evicted[0]["model"] == "smollm2" and evicted[0]["entry"]["kind"] == "conversation" and evicted[0]["entry"]["reason"] == "budget"
    assert evicted[0]["entry"]["kept"] == replies[0]["checkpoint_tokens"] > 0
    assert one_entry.output().count("cache.evict") == 2
    assert [r["cache_source"] for r in replies[2:]] == ["conversation", "checkpoint"]
    assert [r["cached_tokens"] for r in replies[2:]] == [replies[1]["prompt_tokens"] + 3, replies[0]["checkpoint_tokens"]]
    out = subprocess.run([sys.executable, "-m", "anyclaude", "logs", "stats", "--file", str(one_entry.requests)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert "  conversation reused   1 (25% of requests)" in out.stdout, out.stdout
    assert "  checkpoint only       1 (25% of requests)" in out.stdout
    assert "  cold                  2 (50% of requests)" in out.stdout
