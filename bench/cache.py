"""Prefix-cache benchmark: a Claude-Code-shaped agent loop against anyclaude, mlx_lm.server
and in-process mlx-lm with an ideally reused cache, all in one run on the tiny model;
and anyclaude's engine alone (no server) with the same ideal reuse: the floor of its ratios.

    uv run python bench/cache.py [--turns 6] [--max-tokens 24]
    uv run python bench/cache.py --claude-code [--budgets quick,deep-work,quick-4gb] [--rounds 4] [--layers 8]

`--claude-code` runs only the workload at Claude Code's scale: its captured 2.1.332
request (tests/fixtures, about 12K tokens rendered) as the main agent, an Explore
agent and a custom agent, each with its own system prompt (so its own system+tools
prefix), one turn each in turn; on a random-weight llama with the tiny model's widths
and a 32K window, with a shipped profile's default KV budget scaled to it (the same
number of tokens of KV). It prints per turn whether the conversation was reused.

Workloads (bench/agent_loop.py): the agent loop alone (one session, each turn appending
the answer, a tool_use/tool_result pair and a short user message), then the same loop
with a haiku side request and a turn of a second session between main turns. anyclaude
is also restarted, with its saved system+tools checkpoint, for a new session's first
request. Time to first token and decode tokens/s are measured on the client side
(streamed requests). Each request goes to the three in a row, in rotating order, so that
other work on a shared machine slows them alike. Decoding is greedy everywhere (the
bench's profile turns the tiny profile's repetition penalty off). Prints per-request
tables, PASS/FAIL per target and one JSON line; exits 0 whatever the verdicts.

On Linux with OpenBLAS installed, the command re-runs itself with OpenBLAS preloaded
(as `anyclaude serve` does), so that the in-process reference and mlx_lm.server run
dequantized float32 weights on the same BLAS as the daemon. The rest of anyclaude's CPU
path (attention's softmax and SwiGLU in NumPy, anyclaude.engine.cpu.fast) and its merged first
forward pass (anyclaude.engine.decode) are its own: the other two run plain mlx-lm.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import http.client
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench import agent_loop  # noqa: E402
from bench.harness import REPO, Daemon, free_port, profile_file, request  # noqa: E402

TARGETS = {"warm_loop": 0.10, "warm_interleaved": 0.15, "restart": 0.15, "decode": 0.95}

# mlx_lm.server with the model dequantized after loading, as anyclaude does it on a CPU
# with OpenBLAS: mlx_lm.server has no such option, so its `load` is wrapped.
_MLX_SERVER = """
import sys
import mlx_lm.server as server
from anyclaude.engine.cpu import blas
from anyclaude.engine.cpu.fast import dequantize
plain_load = server.load
wanted = sys.argv[1] == "dequantize"
def load(*args, **kwargs):
    loaded = plain_load(*args, **kwargs)
    if wanted and blas.loaded():
        dequantize(loaded[0])
    return loaded
server.load = load
sys.argv = ["mlx_lm.server", *sys.argv[2:]]
server.main()
"""


@dataclass
class Turn:
    """One request as the client saw it."""

    label: str
    ttft: float
    tokens: int  # content tokens streamed (the end-of-sequence token excluded)
    decode_s: float  # first to last content token
    prompt_tokens: int | None = None
    cached: int | None = None
    answer: list[dict] = field(default_factory=list)
    request_id: str | None = None
    # anyclaude's own view, from its request log: its time to first token and prefill.
    server_ttft: float | None = None
    prefill_s: float | None = None

    @property
    def tps(self) -> float | None:
        return (self.tokens - 1) / self.decode_s if self.tokens > 1 and self.decode_s > 0 else None


Send = Callable[[str, str, dict], Turn]  # (label, session, Anthropic body) -> Turn


# --- workloads -----------------------------------------------------------------


class Systems:
    """The systems under test in one phase. Each request goes to all of them in a row (the
    order rotating from one request to the next), so that a busy machine slows them alike;
    each system's conversation grows from its own answers."""

    def __init__(self, sends: dict[str, Send]):
        self.sends = sends
        self.turns: dict[str, list[Turn]] = {name: [] for name in sends}
        self._sent = 0

    def send(self, label: str, session: str, body: Callable[[str], dict]) -> dict[str, Turn]:
        """Send the request `body(system)` to every system; returns each one's Turn."""
        names = list(self.sends)
        first = self._sent % len(names)
        self._sent += 1
        out = {}
        for name in names[first:] + names[:first]:
            out[name] = self.sends[name](label, session, body(name))
            self.turns[name].append(out[name])
        return out


def agent_loop_run(systems: Systems, turns: int, max_tokens: int) -> None:
    """The main session alone, `turns` turns."""
    main = {name: agent_loop.Session("main", agent_loop.MAIN) for name in systems.sends}
    for k in range(turns):
        answers = systems.send(f"main {k + 1}", "main", lambda n: agent_loop.anthropic_body(main[n].messages, max_tokens=max_tokens))
        if k + 1 < turns:
            for name, turn in answers.items():
                main[name].advance(turn.answer)


def interleaved_run(systems: Systems, turns: int, max_tokens: int) -> None:
    """The main session with a haiku side request and a second session's turn after each main turn."""
    main = {name: agent_loop.Session("main", agent_loop.MAIN) for name in systems.sends}
    second = {name: agent_loop.Session("second", agent_loop.SECOND) for name in systems.sends}
    for k in range(turns):
        answers = systems.send(f"main {k + 1}", "main", lambda n: agent_loop.anthropic_body(main[n].messages, max_tokens=max_tokens))
        if k + 1 == turns:
            break
        for name, turn in answers.items():
            main[name].advance(turn.answer)
        side = [{"role": "user", "content": agent_loop.SIDE[k]}]
        systems.send(f"side {k + 1}", f"side-{k + 1}", lambda n: agent_loop.anthropic_body(side, model="claude-haiku-4-5", max_tokens=max_tokens))
        answers = systems.send(f"second {k + 1}", "second", lambda n: agent_loop.anthropic_body(second[n].messages, max_tokens=max_tokens))
        for name, turn in answers.items():
            second[name].advance(turn.answer)


def restart_run(systems: Systems, max_tokens: int) -> None:
    """A new session's first request (same system prompt and tools)."""
    messages = [{"role": "user", "content": agent_loop.AFTER_RESTART}]
    systems.send("new session 1", "restart", lambda n: agent_loop.anthropic_body(messages, max_tokens=max_tokens))


WARMUP = {"model": "claude-opus-4-8", "max_tokens": 2, "temperature": 0, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}


# --- streamed HTTP clients -----------------------------------------------------------


def _stream(port: int, path: str, body: dict, headers: dict | None = None):
    """POST `body` and yield (seconds since sending, event name, data) per SSE message."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.connect()  # the TCP handshake is not the server's time to first token
    payload = json.dumps(body).encode()
    started = time.perf_counter()
    conn.request("POST", path, body=payload, headers={"content-type": "application/json", **(headers or {})})
    response = conn.getresponse()
    if response.status != 200:
        raise RuntimeError(f"{path}: HTTP {response.status}: {response.read()[:500]!r}")
    yield 0.0, "headers", {k.lower(): v for k, v in response.getheaders()}
    event = None
    try:
        while line := response.readline():
            line = line.rstrip(b"\r\n")
            if line.startswith(b"event:"):
                event = line[6:].strip().decode()
            elif line.startswith(b"data:"):
                data = line[5:].strip()
                yield time.perf_counter() - started, event, data if data == b"[DONE]" else json.loads(data)
                event = None
    finally:
        conn.close()


def anthropic_turn(port: int, label: str, session: str, body: dict) -> Turn:
    """One streamed Messages API request to anyclaude."""
    first = last = None
    end = 0.0
    blocks: list[dict] = []
    partial: dict[int, str] = {}
    usage: dict = {}
    request_id = None
    for t, event, data in _stream(port, "/v1/messages", body, {"x-claude-code-session-id": session, "anthropic-version": "2023-06-01"}):
        if event == "headers":
            request_id = data.get("request-id")
        elif event == "message_start":
            usage.update(data["message"]["usage"])
        elif event == "content_block_start":
            blocks.append(dict(data["content_block"]))
        elif event == "content_block_delta":
            first, last = first if first is not None else t, t
            delta, block = data["delta"], blocks[data["index"]]
            if delta["type"] == "text_delta":
                block["text"] += delta["text"]
            elif delta["type"] == "input_json_delta":
                partial[data["index"]] = partial.get(data["index"], "") + delta["partial_json"]
        elif event == "content_block_stop" and data["index"] in partial:
            blocks[data["index"]]["input"] = _json_or_empty(partial[data["index"]])
        elif event == "message_delta":
            usage.update(data["usage"], stop_reason=data["delta"]["stop_reason"])
        elif event == "error":
            raise RuntimeError(f"{label}: error event: {data}")
        elif event == "message_stop":
            end = t
    # The end-of-turn token counts as output but streams no text.
    tokens = usage.get("output_tokens", 0) - (usage.get("stop_reason") != "max_tokens")
    return Turn(
        label,
        ttft=first if first is not None else end,
        tokens=tokens,
        decode_s=(last - first) if first is not None else 0.0,
        prompt_tokens=usage.get("input_tokens", 0) + usage.get("cache_read_input_tokens", 0),
        cached=usage.get("cache_read_input_tokens"),
        answer=blocks,
        request_id=request_id,
    )


def _json_or_empty(text: str) -> dict:
    try:
        value = json.loads(text or "{}")
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def openai_turn(port: int, label: str, body: dict, tokenizer) -> Turn:
    """The same request as an OpenAI chat completion, streamed, to mlx_lm.server."""
    messages, tools = agent_loop.openai_messages(body, tokenizer)
    chat = {
        "messages": messages,
        "max_tokens": body["max_tokens"],
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if tools:
        chat["tools"] = tools
    first = last = None
    end = 0.0
    text, usage, finish = "", {}, None
    for t, _, data in _stream(port, "/v1/chat/completions", chat):
        if not isinstance(data, dict):
            continue
        if data.get("usage"):
            usage = data["usage"]
        for choice in data.get("choices", []):
            delta = choice.get("delta") or {}
            if delta.get("content") or delta.get("tool_calls"):
                first, last = first if first is not None else t, t
                text += delta.get("content") or ""
            finish = choice.get("finish_reason") or finish
            end = t
    tokens = usage.get("completion_tokens", 0) - (finish != "length")
    return Turn(
        label,
        ttft=first if first is not None else end,
        tokens=tokens,
        decode_s=(last - first) if first is not None else 0.0,
        prompt_tokens=usage.get("prompt_tokens"),
        cached=(usage.get("prompt_tokens_details") or {}).get("cached_tokens"),
        answer=agent_loop.text_answer(text),
    )


# --- the in-process reference ------------------------------------------------------


class Reference:
    """mlx-lm's stream_generate in this process, each request starting from the best KV
    cache any earlier request left (its own session's extended in place, another's copied),
    with the prompt already tokenized: the floor the servers are measured against."""

    def __init__(self, model_dir: str, prefill_step: int):
        from mlx_lm import load

        from anyclaude.engine.cpu import blas

        self.prefill_step = prefill_step
        self.model, self.tokenizer = load(model_dir)
        if blas.loaded():
            from anyclaude.engine.cpu.fast import dequantize

            dequantize(self.model)
        self.kept: dict[str, tuple[list[int], list]] = {}

    def ready(self) -> float:
        self.send("warm-up", "warm-up", WARMUP)
        self.kept.clear()
        return 0.0

    def stop(self, turns: list[Turn]) -> Phase:
        return Phase(turns)

    def send(self, label: str, session: str, body: dict) -> Turn:
        from mlx_lm.generate import stream_generate
        from mlx_lm.sample_utils import make_sampler

        ids = agent_loop.prompt_ids(body, self.tokenizer)
        kv, reused = self._best_cache(session, ids)
        times, generated, text = [], [], ""
        started = time.perf_counter()
        for r in stream_generate(self.model, self.tokenizer, ids[reused:], max_tokens=body["max_tokens"], sampler=make_sampler(temp=0.0), prompt_cache=kv, prefill_step_size=self.prefill_step):
            now = time.perf_counter() - started
            generated.append(r.token)
            if r.finish_reason != "stop":  # the final response of an eos carries no text
                times.append(now)
            text += r.text
        held = kv[0].offset
        self.kept[session] = ((ids + generated)[:held], kv)
        return Turn(label, ttft=times[0] if times else now, tokens=len(times), decode_s=times[-1] - times[0] if times else 0.0, prompt_tokens=len(ids), cached=reused, answer=agent_loop.text_answer(text))

    def _best_cache(self, session: str, ids: list[int]) -> tuple[list, int]:
        from mlx_lm.models.cache import make_prompt_cache

        def common(tokens: list[int]) -> int:
            n = next((i for i, (a, b) in enumerate(zip(tokens, ids)) if a != b), min(len(tokens), len(ids)))
            return min(n, len(ids) - 1)  # one prompt token is left to compute the first logits

        best = max(self.kept, key=lambda s: common(self.kept[s][0]), default=None)
        if best is None or common(self.kept[best][0]) == 0:
            return make_prompt_cache(self.model), 0
        tokens, kv = self.kept[best]
        reused = common(tokens)
        if best != session:
            kv = copy.deepcopy(kv)
        for layer in kv:
            layer.trim(layer.offset - reused)
        return kv, reused

    def close(self) -> None:
        import mlx.core as mx

        self.kept.clear()
        del self.model
        gc.collect()
        mx.clear_cache()


class Engine(Reference):
    """anyclaude's engine alone: its model load (and CPU path), its token loop, the same
    ideally reused caches as the reference, and no server, queue, rendering, tokenizing
    or cache bookkeeping. Its warm/cold ratios are the floor of anyclaude's.

    Its CPU kernels replace MLX's process-wide: it runs in a process of its own
    (`EngineProcess`), not beside the reference."""

    def __init__(self, model_dir: str, prefill_step: int):
        from anyclaude import models, profiles

        self.prefill_step = prefill_step
        settings = profiles.load("tiny").profile.engine
        loaded = models.loader(profiles.Model(path=model_dir), settings)()
        self.model, self.tokenizer, self.eos = loaded.model, loaded.tokenizer, loaded.eos_ids
        self.kept = {}

    def send(self, label: str, session: str, body: dict) -> Turn:
        import mlx.core as mx

        from anyclaude.engine import decode

        ids = agent_loop.prompt_ids(body, self.tokenizer)
        kv, reused = self._best_cache(session, ids)
        times, generated = [], []
        started = time.perf_counter()
        for token in decode.tokens(self.model, ids[reused:], kv, max_tokens=body["max_tokens"], sampler=lambda x: mx.argmax(x, axis=-1), prefill_step=self.prefill_step):
            times.append(time.perf_counter() - started)
            generated.append(token)
            if token in self.eos:
                times.pop()
                break
        self.kept[session] = ((ids + generated)[: kv[0].offset], kv)
        text = self.tokenizer.decode([t for t in generated if t not in self.eos])
        return Turn(label, ttft=times[0] if times else 0.0, tokens=len(times), decode_s=times[-1] - times[0] if times else 0.0, prompt_tokens=len(ids), cached=reused, answer=agent_loop.text_answer(text))


class EngineProcess:
    """`Engine` in a child process (this script with --engine-worker), one JSON line per request."""

    def __init__(self, model_dir: str, prefill_step: int):
        command = [sys.executable, str(Path(__file__).resolve()), "--engine-worker", model_dir, str(prefill_step)]
        self.process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def _call(self, message: dict) -> dict:
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the engine worker exited with {self.process.wait()}")
        return json.loads(line)

    def ready(self) -> float:
        self._call({"reset": True})
        return 0.0

    def stop(self, turns: list[Turn]) -> Phase:
        return Phase(turns)

    def send(self, label: str, session: str, body: dict) -> Turn:
        return Turn(**self._call({"label": label, "session": session, "body": body}))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def engine_worker(model_dir: str, prefill_step: int) -> None:
    replies = os.fdopen(os.dup(1), "w")
    os.dup2(2, 1)  # what the libraries print goes to stderr, not into the replies
    engine = Engine(model_dir, prefill_step)
    for line in sys.stdin:
        message = json.loads(line)
        if message.get("reset"):
            engine.ready()
            reply = {}
        else:
            reply = dataclasses.asdict(engine.send(message["label"], message["session"], message["body"]))
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# --- servers ---------------------------------------------------------------------------


@dataclass
class Phase:
    """What one system did in one phase: its requests, and what it said about itself."""

    turns: list[Turn]
    ready_s: float = 0.0
    health: dict | None = None
    peak_rss: int | None = None
    records: list[dict] = field(default_factory=list)


class Anyclaude:
    """`anyclaude serve` on the benchmark's profile, with `cache` as its ANYCLAUDE_CACHE."""

    def __init__(self, profile: Path, cache: Path, logs: Path):
        logs.mkdir(parents=True)
        self.started = time.monotonic()
        self.daemon = Daemon(str(profile), cache, logs / "daemon.log")

    def ready(self) -> float:
        self.daemon.wait_ready()
        ready = time.monotonic() - self.started
        self.send("warm-up", "warm-up", WARMUP)
        return ready

    def send(self, label: str, session: str, body: dict) -> Turn:
        return anthropic_turn(self.daemon.port, label, session, body)

    def stop(self, turns: list[Turn]) -> Phase:
        phase = Phase(turns)
        try:
            phase.health = request(self.daemon.port, "GET", "/health").json()
            phase.peak_rss = peak_rss(self.daemon.process.pid)
        finally:
            if (code := self.daemon.stop()) != 0:
                print(f"anyclaude exited with {code}:\n{self.daemon.output()[-2000:]}", file=sys.stderr)
        records = {r.get("request_id"): r for r in self.daemon.records()}
        for turn in turns:  # the log has the engine's figure; message_start's is an early peek
            record = records.get(turn.request_id, {})
            turn.cached = record.get("cached_tokens", turn.cached)
            turn.server_ttft, turn.prefill_s = record.get("ttft_s"), record.get("prefill_s")
        phase.records = [records[t.request_id] for t in turns if t.request_id in records]
        return phase


class MlxServer:
    """mlx_lm.server, default options, on the same model directory."""

    def __init__(self, model_dir: str, logs: Path, tokenizer, *, dequantize: bool):
        logs.mkdir(parents=True)
        self.port = free_port()
        self.tokenizer = tokenizer
        self._out = open(logs / "mlx_lm.server.log", "wb")
        command = [sys.executable, "-c", _MLX_SERVER, "dequantize" if dequantize else "as-is", "--model", model_dir, "--port", str(self.port)]
        self.started = time.monotonic()
        self.process = subprocess.Popen(command, cwd=REPO, stdout=self._out, stderr=subprocess.STDOUT)

    def ready(self) -> float:
        # It listens before its model is loaded: the first completion is the signal.
        warm_up = {k: v for k, v in agent_loop.anthropic_body(WARMUP["messages"], max_tokens=2).items() if k not in ("system", "tools")}
        deadline = self.started + 300
        while True:
            if self.process.poll() is not None:
                raise RuntimeError(f"mlx_lm.server exited with {self.process.returncode}")
            try:
                self.send("warm-up", "warm-up", warm_up)
                return time.monotonic() - self.started
            except (OSError, http.client.HTTPException):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def send(self, label: str, session: str, body: dict) -> Turn:
        return openai_turn(self.port, label, body, self.tokenizer)

    def stop(self, turns: list[Turn]) -> Phase:
        phase = Phase(turns, peak_rss=peak_rss(self.process.pid))
        self.process.send_signal(signal.SIGINT)  # its serve_forever stops on KeyboardInterrupt
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self._out.close()
        return phase


def run_phase(systems: dict, workload: Callable[[Systems], None]) -> dict[str, Phase]:
    """Wait for every system to be ready, run `workload` on all of them, stop them."""
    ready: dict[str, float] = {}
    out: dict[str, Phase] = {}
    group = Systems({name: s.send for name, s in systems.items()})
    try:
        for name, system in systems.items():
            ready[name] = system.ready()
        workload(group)
    finally:
        for name, system in systems.items():
            out[name] = system.stop(group.turns[name])
            out[name].ready_s = ready.get(name, 0.0)
    return out


def peak_rss(pid: int) -> int | None:
    """The largest peak resident memory (VmHWM, bytes) in the process tree under `pid`:
    Granian serves from a worker process, and that is where the model and its cache live."""
    peaks = [p for p in map(_vm_hwm, [pid, *_descendants(pid)]) if p is not None]
    return max(peaks) if peaks else None


def _vm_hwm(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _descendants(pid: int) -> list[int]:
    parents = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            # The parent pid is the second field after the parenthesised command name.
            parents[int(stat.parent.name)] = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
    found, frontier = [], [pid]
    while frontier:
        children = [child for child, parent in parents.items() if parent in frontier]
        found += children
        frontier = children
    return found


# --- the run ------------------------------------------------------------------------------


def model_directory() -> str:
    from anyclaude import models, profiles

    (model,) = profiles.load("tiny").profile.models.values()
    return models.prepare(model)


def run(turns: int, max_tokens: int, max_gb: float) -> dict:
    from mlx_lm.utils import load_tokenizer

    from anyclaude import profiles
    from anyclaude.engine.cpu import blas
    from anyclaude.engine import metal

    model_dir = model_directory()
    # The reference prefills in the same chunks as the daemon, so that the ratio shows what
    # the daemon adds; mlx_lm.server keeps its own default (2048).
    prefill_step = profiles.load("tiny").profile.engine.prefill_step or metal.default_prefill_step()
    tokenizer = load_tokenizer(Path(model_dir))
    dequantize = blas.loaded()
    reference = Reference(model_dir, prefill_step)
    engine = EngineProcess(model_dir, prefill_step)
    phases: dict[str, Phase] = {}
    with tempfile.TemporaryDirectory(prefix="anyclaude-bench-") as tmp:
        tmp = Path(tmp)
        profile = profile_file(
            tmp,
            "bench",
            cache={"persist": True, "max_gb": max_gb},
            # The imported directory itself, so that each daemon's own ANYCLAUDE_CACHE
            # holds only its saved checkpoints, not a second GGUF import.
            models={"smollm2": {"path": model_dir, "max_tokens": 1024}},
            # Plain greedy decoding, as the other two do: the tiny profile's repetition
            # penalty would give anyclaude different answers, hence different prompts.
            sampling={"repetition_penalty": 1.0},
        )

        def systems(name: str, cache: str) -> dict:
            reference.kept.clear()  # each phase starts cold for all of them
            return {
                "any": Anyclaude(profile, tmp / cache, tmp / f"any-{name}"),
                "mlx": MlxServer(model_dir, tmp / f"mlx-{name}", tokenizer, dequantize=dequantize),
                "raw": reference,
                "engine": engine,
            }

        _note("agent loop")
        for name, phase in run_phase(systems("loop", "cache-a"), lambda s: agent_loop_run(s, turns, max_tokens)).items():
            phases[f"{name}_loop"] = phase
        _note("restart (anyclaude, same cache directory)")
        phases["any_restart"] = run_phase({"any": Anyclaude(profile, tmp / "cache-a", tmp / "any-restart")}, lambda s: restart_run(s, max_tokens))["any"]
        _note("interleaved")
        for name, phase in run_phase(systems("mixed", "cache-b"), lambda s: interleaved_run(s, turns, max_tokens)).items():
            phases[f"{name}_mixed"] = phase
    reference.close()
    engine.close()
    return figures(phases, tokenizer, model_dir, turns, max_tokens, max_gb, dequantize, prefill_step)


def _note(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


# --- figures and verdicts ------------------------------------------------------------------


def figures(phases: dict[str, Phase], tokenizer, model_dir: str, turns: int, max_tokens: int, max_gb: float, dequantized: bool, prefill_step: int) -> dict:
    loop, mixed = phases["any_loop"].turns, phases["any_mixed"].turns
    cold, mixed_cold = loop[0].ttft, mixed[0].ttft
    restart = phases["any_restart"].turns[0]
    mlx_mixed = phases["mlx_mixed"].turns
    warm_main = [t for t in mixed[1:] if t.label.startswith("main")]
    slower = [a.label for a, m in zip(mixed, mlx_mixed) if a.ttft > m.ttft]
    decode = {name: _decode_rate(phases[f"{name}_loop"].turns + phases[f"{name}_mixed"].turns) for name in ("any", "mlx", "raw")}
    kv_peaks = [p for p in (_kv_peak(phases[k].health or {}) for k in ("any_loop", "any_restart", "any_mixed")) if p is not None]
    kv_peak = max(kv_peaks) if kv_peaks else None
    budget = int(max_gb * 2**30)
    out = {
        "model": model_dir,
        "dequantized_openblas": dequantized,
        "metal": _metal(),
        "turns": turns,
        "max_tokens": max_tokens,
        "prefill_step": prefill_step,
        "prefix_tokens": _checkpoint(tokenizer),
        "cold_ttft_s": round(cold, 3),
        "warm_over_cold_loop_max": round(max(t.ttft for t in loop[1:]) / cold, 4),
        "warm_over_cold_loop_mean": round(sum(t.ttft for t in loop[1:]) / (len(loop) - 1) / cold, 4),
        "warm_over_cold_interleaved_main_max": round(max(t.ttft for t in warm_main) / mixed_cold, 4),
        "warm_over_cold_interleaved_all_max": round(max(t.ttft for t in mixed[1:]) / mixed_cold, 4),
        # The share of the cold turn's work a warm turn cannot skip: its uncached tokens.
        "warm_uncached_share_loop_max": round(max(_uncached(t) for t in loop[1:]) / _uncached(loop[0]), 4),
        # The same ratios for the other two: what this CPU allows, and what mlx_lm.server does.
        "warm_over_cold_loop_max_raw": _warm_over_cold(phases["raw_loop"].turns),
        "warm_over_cold_loop_max_mlx": _warm_over_cold(phases["mlx_loop"].turns),
        "warm_over_cold_interleaved_main_max_raw": _warm_over_cold([t for t in phases["raw_mixed"].turns if t.label.startswith("main")]),
        "warm_over_cold_interleaved_main_max_mlx": _warm_over_cold([t for t in mlx_mixed if t.label.startswith("main")]),
        # anyclaude's engine with no server around it: how low anyclaude's own ratios can go.
        "warm_over_cold_loop_max_engine": _warm_over_cold(phases["engine_loop"].turns),
        "warm_over_cold_interleaved_main_max_engine": _warm_over_cold([t for t in phases["engine_mixed"].turns if t.label.startswith("main")]),
        "engine_same_answers": sum(_text(a) == _text(e) for a, e in zip(loop + mixed, phases["engine_loop"].turns + phases["engine_mixed"].turns)),
        "restart_ttft_s": round(restart.ttft, 3),
        "restart_over_cold": round(restart.ttft / cold, 4),
        "restart_cached_tokens": restart.cached,
        "restart_ready_s": round(phases["any_restart"].ready_s, 2),
        "decode_tps": {k: _round(v) for k, v in decode.items()},
        "decode_any_over_raw": _round(decode["any"] / decode["raw"]) if decode["any"] and decode["raw"] else None,
        "decode_any_over_mlx": _round(decode["any"] / decode["mlx"]) if decode["any"] and decode["mlx"] else None,
        "ttft_slower_than_mlx_server": slower,
        # Greedy decoding everywhere: different answers mean different numerics (prefill
        # chunking, batching), and from then on different prompts.
        "same_answers": {
            phase: sum(_text(a) == _text(m) == _text(w) for a, m, w in zip(*(phases[f"{n}_{phase}"].turns for n in ("any", "mlx", "raw"))))
            for phase in ("loop", "mixed")
        },
        "kv_peak_bytes": kv_peak,
        "kv_budget_bytes": budget,
        "peak_rss_bytes": {name: p.peak_rss for name, p in phases.items() if p.peak_rss},
        "cache_misses_logged": [r for p in ("any_loop", "any_restart", "any_mixed") for r in phases[p].records if r.get("cache_miss")],
        "requests": {name: [_turn_json(t) for t in p.turns] for name, p in phases.items()},
    }
    out["verdicts"] = {
        "warm_loop": out["warm_over_cold_loop_max"] <= TARGETS["warm_loop"],
        "warm_interleaved": out["warm_over_cold_interleaved_main_max"] <= TARGETS["warm_interleaved"],
        "restart": out["restart_over_cold"] <= TARGETS["restart"],
        "decode": out["decode_any_over_raw"] is not None and out["decode_any_over_raw"] >= TARGETS["decode"],
        "ttft_vs_mlx_server": not slower,
        "kv_budget": None if kv_peak is None else kv_peak <= budget,
    }
    return out


def _metal() -> bool:
    import mlx.core as mx

    return mx.metal.is_available()


def _uncached(turn: Turn) -> int:
    return turn.prompt_tokens - (turn.cached or 0)


def _warm_over_cold(turns: list[Turn]) -> float:
    return round(max(t.ttft for t in turns[1:]) / turns[0].ttft, 4)


def _decode_rate(turns: list[Turn]) -> float | None:
    # All requests together: a 24-token answer decodes in about two seconds, too short to judge alone.
    measured = [t for t in turns if t.tps is not None]
    seconds = sum(t.decode_s for t in measured)
    return sum(t.tokens - 1 for t in measured) / seconds if seconds else None


def _kv_peak(health: dict) -> int | None:
    # /health may report the prefix cache's bytes per model; take the peak if it does.
    peaks = []
    for model in (health.get("models") or {}).values():
        for key in ("cache_peak_bytes", "cache_bytes"):
            if isinstance(model.get(key), int):
                peaks.append(model[key])
                break
    return max(peaks) if peaks else None


def _checkpoint(tokenizer) -> int:
    from anyclaude import prompt
    from anyclaude.api import wire

    body = agent_loop.anthropic_body(agent_loop.Session("main", agent_loop.MAIN).messages)
    return prompt.render(wire.decode_request(json.dumps(body).encode()), tokenizer).checkpoint


def _turn_json(t: Turn) -> dict:
    return {"label": t.label, "ttft_s": round(t.ttft, 3), "tps": _round(t.tps), "tokens": t.tokens, "prompt": t.prompt_tokens, "cached": t.cached, "answer": _text(t)} | (
        {"server_ttft_s": t.server_ttft, "prefill_s": t.prefill_s} if t.server_ttft is not None else {}
    )


def _text(t: Turn) -> str:
    return "".join(b.get("text", "") for b in t.answer if b.get("type") == "text")


def _round(x: float | None, digits: int = 3) -> float | None:
    return None if x is None else round(x, digits)


# --- printing ------------------------------------------------------------------------------


def print_report(f: dict) -> None:
    r = f["requests"]
    print(f"model {f['model']} ({'dequantized, OpenBLAS' if f['dequantized_openblas'] else 'as loaded'}); "
          f"system+tools prefix {f['prefix_tokens']} tokens; max_tokens {f['max_tokens']}; temperature 0")
    print("mlx_lm.server: default options (prompt cache of 10 sequences, no byte limit, prefill step 2048, batched decoding)"
          + (", model dequantized after load as anyclaude does" if f["dequantized_openblas"] else ""))
    print(f"anyclaude: profile tiny with [cache] persist = true, max_gb = {f['kv_budget_bytes'] / 2**30:g}, repetition_penalty = 1.0; prefill step {f['prefill_step']}"
          + ("; NumPy softmax and SwiGLU (the other two use MLX's)" if not f["metal"] else ""))
    print(f"raw: mlx-lm stream_generate in-process, prefill step {f['prefill_step']}, the best earlier KV cache reused "
          "(copied across sessions), prompt tokenized before the clock starts")
    print("engine: anyclaude's model load and token loop in a process of its own, the caches reused as raw's\n")
    _table("Agent loop", r["any_loop"], r["mlx_loop"], r["raw_loop"], r["engine_loop"], f["cold_ttft_s"])
    _table("Interleaved (haiku side requests, second session)", r["any_mixed"], r["mlx_mixed"], r["raw_mixed"], r["engine_mixed"], r["any_mixed"][0]["ttft_s"])
    restart = r["any_restart"][0]
    print(f"Restart (persist on): new session's first request  TTFT {restart['ttft_s']:.2f} s, "
          f"{restart['cached']}/{restart['prompt']} tokens cached, daemon ready in {f['restart_ready_s']} s\n")
    d = f["decode_tps"]
    same = f["same_answers"]
    print(f"Identical answers from all three (greedy): agent loop {same['loop']}/{len(r['any_loop'])}, interleaved {same['mixed']}/{len(r['any_mixed'])}")
    print(f"Decode tok/s over all requests: anyclaude {_fmt(d['any'], 1)}, mlx_lm.server {_fmt(d['mlx'], 1)}, raw {_fmt(d['raw'], 1)}")
    rss = ", ".join(f"{k} {v / 2**20:.0f} MiB" for k, v in f["peak_rss_bytes"].items())
    print(f"Peak RSS, largest process of each server (model weights included): {rss}\n")
    _targets(f)


def _table(title: str, anyc: list[dict], mlx: list[dict], raw: list[dict], engine: list[dict], cold: float) -> None:
    print(title + "  ((log): anyclaude's own time to first token, from its request log; eng: its engine alone)")
    print(f"{'request':<10}{'prompt':>7}{'cached any/mlx/raw':>21} | {'TTFT s: any':>11}{'(log)':>7}{'mlx':>7}{'raw':>7}{'eng':>7} | "
          f"{'any/cold':>8}{'any/mlx':>8}{'any/raw':>8} | {'tok/s: any':>10}{'mlx':>6}{'raw':>6}")
    for a, m, w, e in zip(anyc, mlx, raw, engine):
        cached = f"{_fmt(a['cached'])}/{_fmt(m['cached'])}/{_fmt(w['cached'])}"
        print(f"{a['label']:<10}{_fmt(a['prompt']):>7}{cached:>21} | {a['ttft_s']:>11.2f}{_fmt(a.get('server_ttft_s'), 2):>7}{m['ttft_s']:>7.2f}{w['ttft_s']:>7.2f}{e['ttft_s']:>7.2f} | "
              f"{a['ttft_s'] / cold:>8.3f}{a['ttft_s'] / m['ttft_s']:>8.2f}{a['ttft_s'] / w['ttft_s']:>8.2f} | "
              f"{_fmt(a['tps'], 1):>10}{_fmt(m['tps'], 1):>6}{_fmt(w['tps'], 1):>6}")
    print()


def _targets(f: dict) -> None:
    v = f["verdicts"]
    rows = [
        ("warm/cold TTFT, agent loop (worst of turns 2+)", f"{f['warm_over_cold_loop_max']:.3f}", f"<= {TARGETS['warm_loop']}", v["warm_loop"]),
        ("warm/cold TTFT, interleaved (worst main turn 2+)", f"{f['warm_over_cold_interleaved_main_max']:.3f}", f"<= {TARGETS['warm_interleaved']}", v["warm_interleaved"]),
        ("first request after restart / cold", f"{f['restart_over_cold']:.3f}", f"<= {TARGETS['restart']}", v["restart"]),
        ("decode tok/s anyclaude / raw", _fmt(f["decode_any_over_raw"], 3), f">= {TARGETS['decode']}", v["decode"]),
        ("TTFT anyclaude <= mlx_lm.server, every interleaved request",
         "all" if not f["ttft_slower_than_mlx_server"] else "slower: " + ", ".join(f["ttft_slower_than_mlx_server"]), "all", v["ttft_vs_mlx_server"]),
        ("peak KV cache bytes within [cache] max_gb", "n/a (not in /health)" if f["kv_peak_bytes"] is None else f"{f['kv_peak_bytes'] / 2**20:.0f} MiB",
         f"<= {f['kv_budget_bytes'] / 2**20:.0f} MiB", v["kv_budget"]),
    ]
    print("Targets")
    for name, value, target, ok in rows:
        verdict = "n/a" if ok is None else "PASS" if ok else "FAIL"
        print(f"  {name:<60}{value:>24}  {target:<12}{verdict}")
    print(f"  (info) mean warm/cold TTFT, agent loop: {f['warm_over_cold_loop_mean']:.3f}")
    print(f"  (info) uncached prompt tokens, warm turn / cold turn, agent loop (worst): {f['warm_uncached_share_loop_max']:.3f}"
          " (a warm turn computes at least this share of the cold turn's tokens)")
    print(f"  (info) worst interleaved request of any kind / cold: {f['warm_over_cold_interleaved_all_max']:.3f}")
    print(f"  (info) same warm/cold ratios for raw: loop {f['warm_over_cold_loop_max_raw']:.3f}, interleaved {f['warm_over_cold_interleaved_main_max_raw']:.3f}; "
          f"mlx_lm.server: loop {f['warm_over_cold_loop_max_mlx']:.3f}, interleaved {f['warm_over_cold_interleaved_main_max_mlx']:.3f}")
    print(f"  (info) the floor, anyclaude's engine alone (no server): warm/cold loop {f['warm_over_cold_loop_max_engine']:.3f}, "
          f"interleaved {f['warm_over_cold_interleaved_main_max_engine']:.3f} (same answers as the daemon on {f['engine_same_answers']}/{len(f['requests']['any_loop']) + len(f['requests']['any_mixed'])} requests)")
    for miss in f["cache_misses_logged"]:
        print(f"  (info) logged cache miss: {miss.get('request_id')} {miss.get('cache_miss')}")


# --- Claude Code's real scale --------------------------------------------------------

# The shipped profiles' models and the Macs they are for: Metal's recommended working
# set there, the weights' size, and the KV bytes per token (layers x KV heads x head
# size x keys and values x 2 bytes). The default budget (anyclaude.cache.default_budget)
# in tokens of each model's KV is what the benchmark model gets, in its own bytes.
SHIPPED = {
    # Qwen3-4B-Instruct-2507-4bit on a 16 GB Mac: 36 layers x 8 KV heads x 128.
    "quick": {"working_set": 16 * 2**30 * 2 // 3, "weights": int(2.26e9), "kv_per_token": 36 * 8 * 128 * 2 * 2},
    # Qwen3-Coder-30B-A3B-Instruct-4bit on a 64 GB Mac: 48 layers x 4 KV heads x 128.
    "deep-work": {"working_set": 64 * 2**30 * 3 // 4, "weights": int(17.2e9), "kv_per_token": 48 * 4 * 128 * 2 * 2},
    # quick's fixed budget before budgets came from memory (max_gb = 4), for comparison.
    "quick-4gb": {"budget": 4 * 2**30, "kv_per_token": 36 * 8 * 128 * 2 * 2},
}
FIXTURE = REPO / "tests" / "fixtures" / "claude_code_2.1.332.json"
AGENTS = ("main", "explore", "reviewer")
# Subagents' system prompts (written for this benchmark, in the manner of Claude Code's):
# each agent's system+tools prefix is its own, about as long as the main one's.
_EXPLORE = """You are a file search specialist working inside Claude Code. You excel at navigating \
codebases quickly: finding files by pattern, searching their contents, and reading the parts \
that answer the question you were given. You do not edit files, run builds or change anything.

Guidelines:
- Use Glob-style searches for broad file patterns and Grep for contents.
- Read a file when you know its path; read only the lines you need.
- Adapt how thoroughly you search to what the caller asked for.
- Report absolute paths, and quote the few lines that matter.
- Finish with a short summary of what you found and where."""
_REVIEWER = """You are code-reviewer, a custom agent defined in .claude/agents/code-reviewer.md. \
You review the changes in the working tree for correctness, readability and test coverage, and \
you report findings in order of severity, each with the file, the line and a concrete fix. You \
never rewrite the code yourself; you suggest, the main agent decides."""
USERS = {
    "main": agent_loop.MAIN,
    "explore": ["Find where the parser is defined.", "Which tests cover it?", "Where is the tokenizer used?", "List the error types.", "Find the CLI entry point.", "Summarise the layout."],
    "reviewer": ["Review the change to the parser.", "Check the error handling.", "Are the tests enough?", "Look at the naming.", "Check the docstrings.", "Give your verdict."],
}


def claude_code_body(agent: str, messages: list[dict], max_tokens: int) -> dict:
    """The captured 2.1.332 request, with the agent's own system prompt and `messages`."""
    body = json.loads(FIXTURE.read_text())["body"]
    if agent != "main":
        intro, _, _ = body["system"][1]["text"].partition("\n\n")  # "You are a Claude agent, built on ..."
        body["system"][1]["text"] = f"{intro}\n\n{_EXPLORE if agent == 'explore' else _REVIEWER}"
    return body | {"messages": messages, "max_tokens": max_tokens, "temperature": 0, "stream": True}


def claude_code_session(agent: str) -> agent_loop.Session:
    session = agent_loop.Session(agent, USERS[agent])
    first = json.loads(FIXTURE.read_text())["body"]["messages"]  # the reminders, "say hi", the environment
    first[0]["content"][-1]["text"] = USERS[agent][0]
    session.messages = first
    return session


def random_model(directory: Path, layers: int, window: int) -> Path:
    """A random-weight llama with the tiny model's widths, `layers` layers and a
    `window`-token context, saved as an MLX model directory with the tiny model's tokenizer."""
    import shutil

    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama

    tiny = Path(model_directory())
    config = {k: v for k, v in json.loads((tiny / "config.json").read_text()).items() if k != "quantization"}
    config |= {"num_hidden_layers": layers, "max_position_embeddings": window}
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(config))
    directory.mkdir(parents=True)
    mx.save_safetensors(str(directory / "model.safetensors"), dict(tree_flatten(model.parameters())))
    (directory / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, directory / name)
    return directory


def scaled_budget(name: str, kv_per_token: int) -> tuple[int, int]:
    """A shipped profile's default KV budget, as tokens of its model, and in bytes of a model
    with `kv_per_token`."""
    from anyclaude.engine.cache import default_budget

    shipped = SHIPPED[name]
    budget = shipped.get("budget") or default_budget(shipped["working_set"], shipped["weights"])
    tokens = budget // shipped["kv_per_token"]
    return tokens, tokens * kv_per_token


def claude_code_run(budgets: list[str], rounds: int, max_tokens: int, layers: int) -> dict:
    """Main, Explore and a custom agent in turn, `rounds` turns each, on each budget."""
    out: dict = {"layers": layers, "rounds": rounds, "max_tokens": max_tokens, "runs": {}}
    with tempfile.TemporaryDirectory(prefix="anyclaude-bench-cc-") as tmp:
        tmp = Path(tmp)
        model_dir = random_model(tmp / "model", layers, 32768)
        kv_per_token = layers * 2 * 3 * 64 * 4  # 3 KV heads of 64, keys and values, float32
        for name in budgets:
            tokens, budget = scaled_budget(name, kv_per_token)
            _note(f"Claude Code scale, budget {name}: {tokens} tokens, {budget / 2**20:.0f} MiB")
            profile = profile_file(
                tmp,
                f"cc-{name}",
                cache={"persist": True, "max_gb": budget / 2**30},
                models={"smollm2": {"path": str(model_dir), "context_length": 32768, "max_tokens": 1024}},
                sampling={"repetition_penalty": 1.0},
                # A cold 12K-token prefill takes minutes on a CPU: what is measured is what is reused.
                timeouts={"first_token": 1800, "idle": 600, "total": 3600},
            )
            daemon = Anyclaude(profile, tmp / f"cache-{name}", tmp / f"logs-{name}")
            sessions = {agent: claude_code_session(agent) for agent in AGENTS}
            turns: list[Turn] = []
            try:
                daemon.ready()
                for r in range(rounds):
                    for agent in AGENTS:
                        turn = daemon.send(f"{agent} {r + 1}", agent, claude_code_body(agent, sessions[agent].messages, max_tokens))
                        turns.append(turn)
                        _note(f"  {turn.label}: {turn.prompt_tokens} tokens, {turn.cached} cached, TTFT {turn.ttft:.2f} s")
                        if r + 1 < rounds:
                            sessions[agent].advance(turn.answer)
            finally:
                phase = daemon.stop(turns)
            out["runs"][name] = claude_code_figures(name, tokens, budget, phase, daemon)
    return out


def claude_code_figures(name: str, tokens: int, budget: int, phase: Phase, daemon: Anyclaude) -> dict:
    records = {r.get("request_id"): r for r in phase.records}
    evictions = [r["entry"] for r in daemon.daemon.events() if r["event"] == "cache.evict"]
    from anyclaude import logs

    rows, previous = [], {}
    for turn in phase.turns:
        agent = turn.label.split()[0]
        record = records.get(turn.request_id, {})
        # Its conversation reused: all its previous turn's prompt came from the cache.
        reused = agent in previous and record.get("cache_source") == "conversation" and (turn.cached or 0) >= previous[agent] - 1
        rows.append({"label": turn.label, "prompt": turn.prompt_tokens, "cached": turn.cached, "prefix": record.get("checkpoint_tokens"), "served": logs.served(record),
                     "conversation_reused": reused, "ttft_s": round(turn.ttft, 2), "store": record.get("cache_store")})
        previous[agent] = turn.prompt_tokens
    peak = _kv_peak(phase.health or {})
    warm_main = [r for r in rows if r["label"].startswith("main") and not r["label"].endswith(" 1")]
    return {
        "budget": name,
        "budget_tokens": tokens,
        "budget_bytes": budget,
        "turns": rows,
        "warm_main_reused": sum(r["conversation_reused"] for r in warm_main),
        "warm_main": len(warm_main),
        "warm_reused_all": sum(r["conversation_reused"] for r in rows if not r["label"].endswith(" 1")),
        "warm_all": sum(1 for r in rows if not r["label"].endswith(" 1")),
        "evictions": len(evictions),
        "evicted_cut_back": sum(1 for e in evictions if e.get("kept")),
        "kv_peak_bytes": peak,
        "within_budget": peak is not None and peak <= budget,
    }


def print_claude_code(f: dict) -> None:
    print(f"Claude Code's scale: its 2.1.332 request (tests/fixtures), main, Explore and a custom agent in turn, {f['rounds']} turns each, "
          f"{f['max_tokens']} tokens per answer; random-weight llama at the tiny model's widths, {f['layers']} layers, 32K window\n")
    for name, run in f["runs"].items():
        print(f"Budget {name}: {run['budget_tokens']} tokens of KV ({run['budget_bytes'] / 2**20:.0f} MiB here), stored entries and the live request together")
        print(f"{'request':<12}{'prompt':>8}{'prefix':>8}{'cached':>8}  {'served':<14}{'conversation reused':<21}{'TTFT s':>8}")
        for row in run["turns"]:
            reused = "-" if row["label"].endswith(" 1") else "yes" if row["conversation_reused"] else "NO"
            print(f"{row['label']:<12}{row['prompt']:>8}{_fmt(row['prefix']):>8}{_fmt(row['cached']):>8}  {row['served']:<14}{reused:<21}{row['ttft_s']:>8.2f}")
        peak = "-" if run["kv_peak_bytes"] is None else f"{run['kv_peak_bytes'] / 2**20:.0f} MiB"
        ok = run["warm_main_reused"] == run["warm_main"] and run["within_budget"]
        print(f"warm main turns that reused their conversation: {run['warm_main_reused']}/{run['warm_main']} "
              f"(all warm turns: {run['warm_reused_all']}/{run['warm_all']}); evictions {run['evictions']} "
              f"({run['evicted_cut_back']} cut back to their checkpoint); peak KV {peak} of {run['budget_bytes'] / 2**20:.0f} MiB: {'PASS' if ok else 'FAIL'}\n")


def _fmt(x, digits: int = 0) -> str:
    if x is None:
        return "-"
    return f"{x:.{digits}f}" if digits else str(x)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--max-gb", type=float, default=1.0, help="anyclaude's [cache] max_gb")
    parser.add_argument("--claude-code", action="store_true", help="only the workload at Claude Code's scale (12K-token prompts, 3 agents)")
    parser.add_argument("--budgets", default="quick", help=f"for --claude-code: shipped budgets to scale, of {', '.join(SHIPPED)}")
    parser.add_argument("--rounds", type=int, default=4, help="for --claude-code: turns per agent")
    parser.add_argument("--layers", type=int, default=8, help="for --claude-code: the random model's layers (the tiny model has 30)")
    parser.add_argument("--engine-worker", nargs=2, metavar=("MODEL_DIR", "PREFILL_STEP"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    from anyclaude.engine.cpu import blas

    blas.preload_and_reexec(sys.orig_argv[1:], module=None)  # as `anyclaude serve` does
    if args.engine_worker:
        engine_worker(args.engine_worker[0], int(args.engine_worker[1]))
        return 0
    started = time.monotonic()
    if args.claude_code:
        f = claude_code_run(args.budgets.split(","), args.rounds, args.max_tokens, args.layers)
        f["seconds"] = round(time.monotonic() - started, 1)
        print_claude_code(f)
        print(json.dumps(f))
        return 0
    f = run(args.turns, args.max_tokens, args.max_gb)
    f["seconds"] = round(time.monotonic() - started, 1)
    print_report(f)
    print(json.dumps(f))
    return 0


if __name__ == "__main__":
    sys.exit(main())
