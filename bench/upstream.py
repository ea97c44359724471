"""What anyclaude adds in front of an upstream: time to the first token, in one run.

    uv run python bench/upstream.py [--rounds 5]

Two upstreams with the tiny model: a second anyclaude daemon (Anthropic API) and
mlx_lm.server (OpenAI API). The same streamed request (greedy, 8 tokens) goes to each
upstream directly and through a front daemon whose profile names them, alternating, after
one warm-up each; the time to the first text is measured by the client, from sending the
request. Prints the medians and the difference (the overhead), then one JSON line.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.harness import Daemon, free_port, request  # noqa: E402

PROMPT = "Name three colours."


def first_text(port: int, path: str, body: dict) -> float:
    """Seconds from sending a streamed request to the first piece of text in its answer."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    data = json.dumps(body).encode()
    started = time.monotonic()
    conn.request("POST", path, data, {"content-type": "application/json"})
    response = conn.getresponse()
    assert response.status == 200, response.read()
    buffer = b""
    took = None
    while chunk := response.read1():
        buffer += chunk
        if took is None and (b'"text_delta"' in buffer or b'"content": "' in buffer.replace(b'"content": ""', b"")):
            took = time.monotonic() - started
    conn.close()
    assert took is not None, buffer[-500:]
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    directory = Path(tempfile.mkdtemp(prefix="anyclaude-upstream-"))
    cache = directory / "cache"
    back = Daemon("tiny", cache, directory / "back.log")
    mlx = None
    front = None
    try:
        back.wait_ready()
        from anyclaude import models, profiles

        (model,) = profiles.load("tiny").profile.models.values()
        import os

        os.environ["ANYCLAUDE_CACHE"] = str(cache)
        folder = models.prepare(model)
        mlx_port = free_port()
        mlx = subprocess.Popen([sys.executable, "-m", "mlx_lm", "server", "--model", folder, "--port", str(mlx_port)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        while True:
            try:
                if request(mlx_port, "GET", "/health").status == 200:
                    break
            except OSError:
                time.sleep(0.2)
        profile = directory / "front.toml"
        profile.write_text(
            f'[models.anth]\nupstream = "{back.url}"\nupstream_model = "anyclaude-smollm2"\n\n'
            f'[models.oai]\nupstream = "http://127.0.0.1:{mlx_port}"\napi = "openai"\nupstream_model = "default_model"\n'
        )
        front = Daemon(str(profile), cache, directory / "front.log")
        front.wait_ready()
        anthropic = {"max_tokens": 8, "temperature": 0, "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
        openai = {"model": "default_model", "max_tokens": 8, "temperature": 0, "stream": True, "messages": [{"role": "user", "content": PROMPT}]}
        cases = {
            "anthropic": [(back.port, "/v1/messages", {**anthropic, "model": "anyclaude-smollm2"}), (front.port, "/v1/messages", {**anthropic, "model": "anyclaude-anth"})],
            "openai": [(mlx_port, "/v1/chat/completions", openai), (front.port, "/v1/messages", {**anthropic, "model": "anyclaude-oai"})],
        }
        result = {}
        for name, (direct, through) in cases.items():
            first_text(*direct), first_text(*through)  # warm-up: caches, connections
            times: dict[str, list[float]] = {"direct": [], "through": []}
            for _ in range(args.rounds):
                times["direct"].append(first_text(*direct))
                times["through"].append(first_text(*through))
            d, t = statistics.median(times["direct"]), statistics.median(times["through"])
            result[name] = {"direct_s": round(d, 4), "through_s": round(t, 4), "overhead_ms": round((t - d) * 1000, 1)}
            print(f"{name:>9} upstream: first text {d * 1000:.1f} ms direct, {t * 1000:.1f} ms through anyclaude: +{(t - d) * 1000:.1f} ms (median of {args.rounds})")
        print(json.dumps(result))
    finally:
        if front:
            front.stop()
        if mlx:
            mlx.terminate()
            mlx.wait(30)
        back.stop()


if __name__ == "__main__":
    main()
