"""A long forced tool call, streamed: when its tool_use block starts, in one run.

    uv run python bench/streamed_call.py [--max-tokens 200] [--rounds 2]

A Write call forced with `tool_choice` on the tiny profile, greedy, `max_tokens` long:
the time to the first token (from the request log), to the `tool_use` block's start and
to the end of the response, and how many `input_json_delta` pieces the input came in.
The block should start once the tool's name is written (a dozen tokens), not at the end.
Ends with one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Daemon  # noqa: E402

WRITE = {
    "name": "Write",
    "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}}, "required": ["file_path", "content"]},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--max-tokens", type=int, default=200)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="anyclaude-streamed-call-"))
    daemon = Daemon("tiny", directory / "cache", directory / "daemon.log")
    body = {
        "model": "anyclaude-smollm2",
        "max_tokens": args.max_tokens,
        "temperature": 0,
        "stream": True,
        "tools": [WRITE],
        "tool_choice": {"type": "tool", "name": "Write"},
        "messages": [{"role": "user", "content": "Write a long poem about the sea to /tmp/sea.txt."}],
    }
    runs = []
    try:
        daemon.wait_ready()
        for _ in range(args.rounds):
            started = time.perf_counter()
            conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=600)
            conn.request("POST", "/v1/messages", json.dumps(body), {"content-type": "application/json"})
            response = conn.getresponse()
            block = None
            pieces = 0
            for line in response:
                if not line.startswith(b"data: "):
                    continue
                event = json.loads(line[6:])
                if event["type"] == "content_block_start" and event["content_block"]["type"] == "tool_use":
                    block = time.perf_counter() - started
                elif event["type"] == "content_block_delta" and event["delta"]["type"] == "input_json_delta":
                    pieces += 1
            total = time.perf_counter() - started
            request_id = response.getheader("request-id")
            conn.close()
            (logged,) = [r for r in daemon.records() if r["request_id"] == request_id]
            runs.append({"first_token_s": logged["ttft_s"], "tool_use_block_s": round(block, 3), "response_s": round(total, 3), "input_json_deltas": pieces, "output_tokens": logged["output_tokens"], "cached_tokens": logged["cached_tokens"]})
            r = runs[-1]
            print(f"first token {r['first_token_s']:.2f} s, tool_use block {r['tool_use_block_s']:.2f} s, response {r['response_s']:.2f} s, {pieces} input_json_delta pieces, {r['output_tokens']} tokens ({r['cached_tokens']} prompt tokens cached)")
    finally:
        daemon.stop()
    print(json.dumps({"max_tokens": args.max_tokens, "runs": runs}))


if __name__ == "__main__":
    main()
