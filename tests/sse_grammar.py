"""A byte-level checker for the SSE grammar of reference §1 (used by several tests)."""

from __future__ import annotations

import json

DELTA_FOR_BLOCK = {
    "text": {"text_delta"},
    "thinking": {"thinking_delta", "signature_delta"},
    "tool_use": {"input_json_delta"},
}


def parse(body: bytes) -> list[tuple[str, dict]]:
    """Split an SSE body into (event name, data) pairs, insisting on the framing we promise."""
    text = body.decode()
    assert text.endswith("\n\n"), f"stream does not end with a blank line: {text[-80:]!r}"
    events = []
    for chunk in text[:-2].split("\n\n"):
        lines = chunk.split("\n")
        assert len(lines) == 2, f"an event is exactly `event:` then one `data:` line: {chunk!r}"
        assert lines[0].startswith("event: ") and lines[1].startswith("data: "), chunk
        name, data = lines[0][len("event: ") :], json.loads(lines[1][len("data: ") :])
        assert data["type"] == name, f"event name {name!r} != data.type {data['type']!r}"
        events.append((name, data))
    return events


def check(body: bytes) -> list[dict]:
    """Assert the whole grammar; returns the events' data without pings."""
    events = [data for name, data in parse(body) if name != "ping"]
    assert events, "empty stream"
    first = events[0]
    assert first["type"] == "message_start", f"first event is {first['type']}"
    message = first["message"]
    assert message["content"] == [] and message["stop_reason"] is None and message["stop_sequence"] is None
    assert message["id"].startswith("msg_")
    assert isinstance(message["usage"]["input_tokens"], int) and message["usage"]["input_tokens"] > 0
    assert isinstance(message["usage"]["output_tokens"], int)

    if events[-1]["type"] == "error":
        assert events[-1]["error"]["type"] and events[-1]["error"]["message"]
        assert not any(e["type"] in ("message_stop",) for e in events)
        rest, end = events[1:-1], None
    else:
        assert events[-1]["type"] == "message_stop", f"last event is {events[-1]['type']}"
        assert events[-2]["type"] == "message_delta", "message_delta must come right before message_stop"
        end = events[-2]
        rest = events[1:-2]

    started, open_block = 0, None
    for event in rest:
        kind = event["type"]
        assert kind not in ("message_start", "message_delta", "message_stop"), f"{kind} in the middle of the stream"
        if kind == "content_block_start":
            assert open_block is None, "a block started while another is open"
            assert event["index"] == started, f"index {event['index']} != {started}"
            block = event["content_block"]
            if block["type"] in ("text", "thinking"):
                assert block[block["type"]] == ""
            if block["type"] == "tool_use":
                assert block["input"] == {} and block["id"].startswith("toolu_")
            open_block = block["type"]
            started += 1
        elif kind == "content_block_delta":
            assert open_block is not None and event["index"] == started - 1, "delta for a block that is not open"
            assert event["delta"]["type"] in DELTA_FOR_BLOCK[open_block], f"{event['delta']['type']} in a {open_block} block"
        elif kind == "content_block_stop":
            assert open_block is not None and event["index"] == started - 1, "stop for a block that is not open"
            open_block = None
    # An error event may cut a block short (reference §1.2 error_tail); anything else closes it.
    assert open_block is None or end is None, "a block was never stopped"
    if end is not None:
        assert end["delta"]["stop_reason"] in ("end_turn", "max_tokens", "stop_sequence", "tool_use")
        assert isinstance(end["usage"]["output_tokens"], int)
    return events
