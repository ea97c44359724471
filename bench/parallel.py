"""Parallel agents: many Claude-Code-shaped sessions on one model, in one run.

    uv run python bench/parallel.py [--sessions 1 2 4 8] [--max-tokens 48]

For each count N, N sessions that share Claude Code's system prompt and tools (as
subagents do) each send their first turn: one after another, then all together. It
prints the aggregate output tokens/s of both ways and their ratio, the time to first
token (p50/p95) of the requests sent together, and how many answers sent together
equal the same request's answer alone (greedy), and how much KV was copied per request
to merge it into the batch and out again. Then a main turn sent while three
subagents decode (with Claude Code's request-class header) against the same turn on
an idle daemon. Last, the ceiling on this machine: mlx-lm's own `batch_generate` on the
same model and prompts, against its `generate_step` one after another; and the
forward pass alone, N rows over N prompts' KV against one row, which bounds what any
batching can gain here, with the same pass over a 16-token KV beside it to show what
attention over the prompt costs (`--no-raw` skips both). The daemon runs the tiny profile with the repetition penalty off, so
that an answer depends on its own request only; each prompt is cached before it is
measured, so both ways start from the same cache. Ends with one JSON line.

Targets (issue #14): 4 together >= 2.5x one after another, 8 together >= 4x; the main
turn's first token within 4x of idle; answers together equal answers alone.
"""

from __future__ import annotations

import argparse
import http.client
import json
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.agent_loop import anthropic_body  # noqa: E402
from bench.harness import Daemon, profile_file  # noqa: E402

TASKS = [
    "Find where the config file is parsed.",
    "List the tests that touch the network.",
    "Explain what the scheduler module does.",
    "Which functions in src/util.py are unused?",
    "Look for TODO comments in the parser.",
    "Summarise the README in three lines.",
    "Find the slowest test in the suite.",
    "Check which dependencies are pinned.",
]
MAIN_TURN = "Now fix the failing test in tests/test_parser.py."


class Answer:
    def __init__(self, first_token: float | None, seconds: float, tokens: int, text: str):
        self.first_token, self.seconds, self.tokens, self.text = first_token, seconds, tokens, text


def ask(port: int, body: dict, request_class: str) -> Answer:
    """One streamed request: time to its first content delta, its output tokens and text."""
    started = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("POST", "/v1/messages", json.dumps(body), {"content-type": "application/json", "x-claude-code-request-class": request_class})
    response = conn.getresponse()
    first, tokens, text = None, 0, []
    for line in response:
        if not line.startswith(b"data: "):
            continue
        event = json.loads(line[6:])
        if event["type"] == "content_block_delta":
            first = first or time.perf_counter() - started
            delta = event["delta"]
            text.append(delta.get("text") or delta.get("thinking") or delta.get("partial_json") or "")
        elif event["type"] == "message_delta":
            tokens = event["usage"]["output_tokens"]
        elif event["type"] == "error":
            raise RuntimeError(event["error"]["message"])
    conn.close()
    return Answer(first, time.perf_counter() - started, tokens, "".join(text))


def together(port: int, bodies: list[dict], request_class: str) -> tuple[list[Answer], float]:
    answers: list[Answer | None] = [None] * len(bodies)

    def run(i: int) -> None:
        answers[i] = ask(port, bodies[i], request_class)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(bodies))]
    started = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return answers, time.perf_counter() - started


def percentile(values: list[float], share: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(share * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sessions", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--no-raw", action="store_true", help="skip mlx-lm's own batching on the same model")
    args = parser.parse_args()
    from anyclaude.engine.cpu import blas

    blas.preload_and_reexec(sys.orig_argv[1:], module=None)  # as `anyclaude serve` does
    directory = Path(tempfile.mkdtemp(prefix="anyclaude-parallel-"))
    profile = profile_file(directory, "parallel", sampling={"repetition_penalty": 1.0}, engine={"queue_size": 32, "max_batch": max(args.sessions)})
    daemon = Daemon(str(profile), directory / "cache", directory / "daemon.log")
    report: dict = {"max_tokens": args.max_tokens, "runs": []}
    try:
        daemon.wait_ready()
        port = daemon.port
        body = lambda text: anthropic_body([{"role": "user", "content": text}], max_tokens=args.max_tokens)  # noqa: E731
        ask(port, body("Warm up."), "subagent")  # the shared prefix's checkpoint, once
        print(f"{'sessions':>8} {'alone tok/s':>12} {'together tok/s':>15} {'ratio':>6} {'TTFT p50':>9} {'TTFT p95':>9} {'equal':>6} {'copied MiB/req':>15}")
        for n in args.sessions:
            bodies = [body(TASKS[i % len(TASKS)] + ("" if i < len(TASKS) else f" (part {i // len(TASKS) + 1})")) for i in range(n)]
            for b in bodies:  # each prompt cached before either run, so both decode alike
                ask(port, b | {"max_tokens": 1}, "subagent")
            started = time.perf_counter()
            alone = [ask(port, b, "subagent") for b in bodies]
            alone_seconds = time.perf_counter() - started
            copied = health(daemon)["batch_copied_bytes"]
            both, together_seconds = together(port, bodies, "subagent")
            copied = health(daemon)["batch_copied_bytes"] - copied
            alone_rate = sum(a.tokens for a in alone) / alone_seconds
            together_rate = sum(a.tokens for a in both) / together_seconds
            firsts = [a.first_token for a in both if a.first_token is not None]
            run = {
                "sessions": n,
                "alone_tokens_per_s": round(alone_rate, 2),
                "together_tokens_per_s": round(together_rate, 2),
                "ratio": round(together_rate / alone_rate, 3),
                "first_token_p50_s": round(statistics.median(firsts), 3),
                "first_token_p95_s": round(percentile(firsts, 0.95), 3),
                "equal_answers": sum(a.text == b.text for a, b in zip(alone, both)),
                # KV copied to merge the requests into one batch and out again.
                "batch_copied_mib_per_request": round(copied / n / 2**20, 1),
            }
            report["runs"].append(run)
            print(
                f"{n:>8} {run['alone_tokens_per_s']:>12.2f} {run['together_tokens_per_s']:>15.2f} {run['ratio']:>6.2f} "
                f"{run['first_token_p50_s']:>9.2f} {run['first_token_p95_s']:>9.2f} {run['equal_answers']:>4}/{n} {run['batch_copied_mib_per_request']:>15.1f}"
            )
        # A main turn on an idle daemon, then the same turn while three subagents decode.
        idle = ask(port, body(MAIN_TURN), "main").first_token
        subagents: list = []
        background = threading.Thread(target=lambda: subagents.append(together(port, [body(t) for t in TASKS[:3]], "subagent")))
        background.start()
        while not daemon_busy(daemon):
            time.sleep(0.05)
        time.sleep(1.0)  # until they are past their prefill and decoding
        busy = ask(port, body(MAIN_TURN), "main").first_token
        background.join()
        report["main_first_token_idle_s"] = round(idle, 3)
        report["main_first_token_busy_s"] = round(busy, 3)
        report["main_first_token_ratio"] = round(busy / idle, 2)
        print(f"main turn, time to first token: idle {idle:.2f} s, while 3 subagents decode {busy:.2f} s ({busy / idle:.1f}x)")
    finally:
        daemon.stop()
    if not args.no_raw:
        report["raw_mlx_lm"] = raw_ratios(args.sessions, args.max_tokens)
        report["forward_pass"] = pass_ratios(args.sessions)
    print(json.dumps(report))


def raw_ratios(sessions: list[int], max_tokens: int) -> list[dict]:
    """mlx-lm alone, in this process: `batch_generate` of N prompts against `generate_step`
    on each in turn, every prompt prefilled beforehand (as the daemon's are cached), greedy."""
    import copy

    import mlx.core as mx
    from mlx_lm.generate import batch_generate, generate_step
    from mlx_lm.models.cache import make_prompt_cache

    from anyclaude import models, profiles
    from bench.agent_loop import openai_messages

    loaded = profiles.load("tiny")
    model = models.loader(loaded.profile.models["smollm2"], loaded.profile.engine, loaded.path.parent)()
    net, tokenizer = model.model, model.tokenizer
    eos = set(tokenizer.eos_token_ids)
    results = []
    print(f"{'sessions':>8} {'mlx-lm one by one tok/s':>24} {'batch_generate tok/s':>21} {'ratio':>6}")
    for n in sessions:
        prompts = []
        for i in range(n):
            messages, tools = openai_messages(anthropic_body([{"role": "user", "content": TASKS[i % len(TASKS)]}]), tokenizer)
            prompts.append(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))
        caches = []
        for p in prompts:
            kv = make_prompt_cache(net)
            for start in range(0, len(p) - 1, 512):
                net(mx.array(p[start : min(start + 512, len(p) - 1)])[None], cache=kv)
                mx.eval([c.state for c in kv])
            caches.append(kv)
        started, produced = time.perf_counter(), 0
        for p, kv in zip(prompts, caches):
            for token, _ in generate_step(mx.array(p[-1:]), net, max_tokens=max_tokens, prompt_cache=copy.deepcopy(kv)):
                produced += 1
                if token in eos:
                    break
        alone = produced / (time.perf_counter() - started)
        started = time.perf_counter()
        response = batch_generate(net, tokenizer, [p[-1:] for p in prompts], prompt_caches=[copy.deepcopy(kv) for kv in caches], max_tokens=max_tokens, return_token_ids=True)
        together = sum(len(t) for t in response.token_ids) / (time.perf_counter() - started)
        results.append({"sessions": n, "alone_tokens_per_s": round(alone, 2), "together_tokens_per_s": round(together, 2), "ratio": round(together / alone, 3)})
        print(f"{n:>8} {alone:>24.2f} {together:>21.2f} {together / alone:>6.2f}")
    return results


def pass_ratios(sessions: list[int], steps: int = 8) -> list[dict]:
    """The model's forward pass alone, one token for each of N rows over N prompts' KV
    (mlx-lm's BatchKVCache, as the engine merges them): N x the one-row pass's time over
    the N-row pass's is the most that batching N sessions can gain on this machine."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from anyclaude import models, profiles
    from bench.agent_loop import openai_messages

    loaded = profiles.load("tiny")
    model = models.loader(loaded.profile.models["smollm2"], loaded.profile.engine, loaded.path.parent)()
    net, tokenizer = model.model, model.tokenizer
    messages, tools = openai_messages(anthropic_body([{"role": "user", "content": TASKS[0]}]), tokenizer)
    prompt_length = len(tokenizer.apply_chat_template(messages, tools=tools, add_generation_prompt=True))

    def kv(length: int) -> list:
        cache = make_prompt_cache(net)
        for start in range(0, length, 512):
            net(mx.array([[1] * min(512, length - start)]), cache=cache)
            mx.eval([c.state for c in cache])
        return cache

    def seconds(rows: int, length: int) -> float:
        caches = [kv(length) for _ in range(rows)]
        cache = caches[0] if rows == 1 else [type(layers[0]).merge(list(layers)) for layers in zip(*caches)]
        inputs = mx.array([[1]] * rows)
        mx.eval(net(inputs, cache=cache))  # warm
        started = time.perf_counter()
        for _ in range(steps):
            mx.eval(net(inputs, cache=cache))
        return (time.perf_counter() - started) / steps

    results = []
    print(f"{'rows':>8} {'pass ms, ' + str(prompt_length) + '-token KV':>24} {'ceiling':>8} {'pass ms, 16-token KV':>21} {'ceiling':>8}")
    one = {length: seconds(1, length) for length in (prompt_length, 16)}
    for n in sessions:
        row = {"rows": n, "kv_tokens": prompt_length}
        for length, name in ((prompt_length, "prompt"), (16, "short")):
            t = one[length] if n == 1 else seconds(n, length)
            row[f"{name}_pass_ms"] = round(t * 1000, 1)
            row[f"{name}_ceiling"] = round(n * one[length] / t, 2)
        results.append(row)
        print(f"{n:>8} {row['prompt_pass_ms']:>24.1f} {row['prompt_ceiling']:>8.2f} {row['short_pass_ms']:>21.1f} {row['short_ceiling']:>8.2f}")
    return results


def health(daemon: Daemon) -> dict:
    from bench.harness import request

    (model,) = request(daemon.port, "GET", "/health").json()["models"].values()
    return model


def daemon_busy(daemon: Daemon) -> bool:
    return bool(health(daemon)["running"])


if __name__ == "__main__":
    main()
