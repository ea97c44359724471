"""Soak: hundreds of streamed requests against the real daemon, with slow readers, readers
that hang up at random points, and more concurrent clients than the queue admits.

    uv run python bench/soak.py [--requests 300] [--clients 8] [--queue-size 2]

Starts its own daemon on the tiny profile (or use --url), and prints how every stream
ended, the truncation rate from `anyclaude logs stats`, and the time from a client
hanging up to the engine being free again (p50, p95), then one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import anthropic

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Daemon, profile_file  # noqa: E402

PROMPTS = ["Say hi.", "Name a colour.", "Count to five.", "What is 2+2?", "Write a haiku about rain.", "Describe the sea."]


def admitted(client: anthropic.Anthropic, rng: random.Random) -> dict:
    """One request, sent again after each 529 (as the SDKs would, with a shorter wait)."""
    refused = 0
    while True:
        result = one(client, random.Random(rng.random()))
        if result["end"] != "overloaded" or refused >= 1000:
            result["refused"] = refused
            return result
        refused += 1
        time.sleep(rng.uniform(0.1, 0.4))


def one(client: anthropic.Anthropic, rng: random.Random) -> dict:
    """One streamed request; its kind decided by `rng`. Returns what happened."""
    kind = rng.choices(["full", "slow", "hangup"], weights=[5, 2, 3])[0]
    body = dict(
        model=rng.choice(["claude-opus-4-8", "claude-haiku-4-5"]),
        # Hang-ups get room to generate, so that they really cut a generation short.
        max_tokens=200 if kind == "hangup" else rng.randint(1, 6),
        messages=[{"role": "user", "content": rng.choice(PROMPTS)}],
    )
    result = {"kind": kind, "request_id": None, "end": None}
    try:
        with client.messages.stream(**body) as stream:
            result["request_id"] = stream.response.headers.get("request-id")
            hangup_after = rng.randint(1, 6)
            for n, event in enumerate(stream):
                if kind == "slow":
                    time.sleep(rng.uniform(0.01, 0.08))
                if kind == "hangup" and n + 1 >= hangup_after:
                    result["end"] = "hangup"
                    return result  # leaving the `with` closes the connection mid-stream
                if event.type == "message_stop":
                    result["end"] = "message_stop"
            if result["end"] is None:
                result["end"] = "truncated"
            else:
                message = stream.get_final_message()  # the SDK's accumulator must accept the stream
                result["stop_reason"] = message.stop_reason
    except anthropic.APIStatusError as exc:
        # 529 before headers (queue full), or an `error` event in the stream.
        result["end"] = "overloaded" if exc.status_code == 529 else "error_event"
        result["error"] = str(exc)[:200]
    except anthropic.APIConnectionError as exc:
        result["end"] = "connection_error"
        result["error"] = str(exc)[:200]
    return result


def hangup_to_free(daemon: Daemon, client: anthropic.Anthropic, rounds: int) -> list[float]:
    """Seconds from a client hanging up mid-generation to the engine being idle."""
    times = []
    for _ in range(rounds):
        daemon.wait_idle()
        with client.messages.stream(model="claude-opus-4-8", max_tokens=400, messages=[{"role": "user", "content": "Write a long story."}]) as stream:
            for event in stream:
                if event.type == "content_block_delta":
                    break
        hung_up = time.monotonic()
        daemon.wait_idle()
        times.append(time.monotonic() - hung_up)
    return times


def run(daemon: Daemon, *, requests: int, clients: int, seed: int = 7, hangup_rounds: int = 10) -> dict:
    client = anthropic.Anthropic(base_url=daemon.url, api_key="soak", max_retries=0, timeout=120)
    rngs = [random.Random(seed * 100_003 + i) for i in range(requests)]
    started = time.monotonic()
    with ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(lambda rng: admitted(client, rng), rngs))
    elapsed = time.monotonic() - started
    idle_after = daemon.wait_idle()
    free = hangup_to_free(daemon, client, hangup_rounds)
    records = {r["request_id"]: r for r in daemon.records()}
    hangups = [r for r in results if r["end"] == "hangup"]
    # A hang-up after the server had already finished is a complete stream, not a cancel.
    hangups_logged = Counter(records.get(r["request_id"], {}).get("outcome", "missing") for r in hangups)
    from anyclaude import logs

    stats = logs.stats(list(records.values()))
    return {
        "requests": requests,
        "clients": clients,
        "seconds": round(elapsed, 1),
        "ends": dict(Counter(r["end"] for r in results)),
        "completed": sum(r["end"] == "message_stop" for r in results),
        "truncated_client_side": sum(r["end"] in ("truncated", "connection_error") for r in results),
        "cancelled": len(hangups),
        "refused_529": sum(r["refused"] for r in results),
        "hangups_in_log": dict(hangups_logged),
        "log_truncated": stats["truncated"],
        "log_truncation_rate": stats["truncation_rate"],
        "engine_idle_after_s": round(idle_after, 3),
        "hangup_to_free_p50_s": round(statistics.median(free), 3) if free else None,
        "hangup_to_free_p95_s": round(sorted(free)[max(0, round(0.95 * (len(free) - 1)))], 3) if free else None,
        "results": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=300)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--queue-size", type=int, default=2)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        profile = profile_file(tmp, "soak", engine={"queue_size": args.queue_size})
        daemon = Daemon(str(profile), Path(tempfile.gettempdir()) / "anyclaude-bench-cache", tmp / "daemon.log")
        try:
            daemon.wait_ready()
            figures = run(daemon, requests=args.requests, clients=args.clients)
        finally:
            daemon.stop()
    figures.pop("results")
    print(f"{'requests':<28}{figures['requests']} from {figures['clients']} clients in {figures['seconds']} s")
    for end, count in sorted(figures["ends"].items()):
        print(f"  {end:<26}{count}")
    print(f"{'truncated (client side)':<28}{figures['truncated_client_side']}")
    print(f"{'truncated (logs stats)':<28}{figures['log_truncated']} ({figures['log_truncation_rate']:.2%})")
    print(f"{'refused with 529, retried':<28}{figures['refused_529']}")
    print(f"{'cancelled (hang-ups)':<28}{figures['cancelled']}  logged as {figures['hangups_in_log']}")
    print(f"{'hang-up to free engine':<28}p50 {figures['hangup_to_free_p50_s']} s, p95 {figures['hangup_to_free_p95_s']} s")
    print(json.dumps(figures))
    return 0 if figures["truncated_client_side"] == 0 and figures["log_truncated"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
