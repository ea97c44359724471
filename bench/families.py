"""Prefix cache per model architecture: a Claude-Code-shaped agent loop through anyclaude's
real engine, in-process, on random-weight models of llama, qwen3_next, gemma3_text, lfm2,
nemotron_h and gpt_oss at the tiny model's widths. All ratios come from this one run.

    uv run python bench/families.py [--turns 6] [--repeat 2] [--only ARCH ...]

Each architecture is built from mlx-lm's own ModelArgs (tests/families.py, widened to
SmolLM2-135M's dimensions with 8 layers, the hybrids keeping their layer pattern) and
run with the tiny model's tokenizer. The workload: the system+tools prefix anyclaude
renders for bench/agent_loop.py's request (its checkpoint), then turns whose prompt is
the previous prompt, the previous answer, an end-of-turn marker and a new user message
of about 150 tokens; 24 tokens per answer, greedy. Every prompt goes to three:

- cache:    anyclaude.engine.Engine with an anyclaude.cache.PrefixCache (the system under test)
- no cache: the same Engine without a cache (the answers must be the same)
- ideal:    the floor, anyclaude's token loop (anyclaude.decode.tokens, what the engine
            runs) on the same model in this thread, given a KV cache that holds exactly
            what the previous turn ran through the model (its prompt and all of its
            answer but the last token, which no pass ever sees): only the new tokens are
            computed, with no queue, thread hand-off or cache bookkeeping.

Time to first token is from submitting the job to its first Token event (for ideal, to
its first token). The conversation is played `--repeat` times, each pass on a fresh
prefix cache and a fresh ideal cache, and each time reported is the fastest of the passes:
other work on a shared machine only ever adds time. The first pass builds the prompts
(from the cached engine's answers, as Claude Code re-sends what it got) and runs each
also without a cache; the later passes replay those prompts, and their answers are
checked against the no-cache ones too. Targets (issue 12), per architecture, PASS/FAIL:

- every warm turn's time to first token at most 0.25 of the cold (first) turn's;
- every warm turn within 1.2x of the same turn with ideal reuse;
- every answer equal with and without the cache.

On Linux with OpenBLAS installed the command re-runs itself with OpenBLAS preloaded, as
`anyclaude serve` does, and attention's softmax and SwiGLU go through NumPy
(anyclaude.engine.cpu.fast), as the engine's loader sets up on a CPU. Prints a table per
architecture, a summary, the verdicts and one JSON line; exits 0 whatever the verdicts.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import gc
import importlib
import importlib.util
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import agent_loop  # noqa: E402
from bench.harness import from_tests  # noqa: E402

families = from_tests("families")  # the architectures' arguments

TARGETS = {"warm_over_cold": 0.25, "warm_over_ideal": 1.2}
ANSWER = 24  # tokens per answer
KV_BUDGET = 2**30  # the prefix cache's bytes ([cache] max_gb = 1)

# SmolLM2-135M's widths (the tiny model's), 8 layers instead of its 30 so that a cold
# turn takes seconds on a CPU, not tens of seconds.
SIZE = {
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "head_dim": 64,
    "num_hidden_layers": 8,
}

# The mixture-of-experts ones have small experts (2 of 8 active, this wide): MLX's CPU
# gather_mm is about ten times slower than a dense matmul of the same size, and experts
# hold nothing in the cache.
EXPERT = 128

# Per architecture, what must grow with the width, and each hybrid's layer pattern at 8 layers.
WIDER: dict[str, dict] = {
    "llama": {},
    "qwen3_next": {
        # Three linear-attention (GatedDeltaNet) layers to one full-attention layer.
        "full_attention_interval": 4,
        "linear_num_key_heads": 9, "linear_num_value_heads": 18, "linear_key_head_dim": 64, "linear_value_head_dim": 64,
        "num_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": EXPERT, "shared_expert_intermediate_size": 512,
    },
    # Five sliding-window layers to one global; the window is shorter than every prompt,
    # so those layers' caches wrap and cannot be trimmed.
    "gemma3_text": {"query_pre_attn_scalar": 64, "sliding_window": 512, "sliding_window_pattern": 6},
    # Short-convolution layers with attention at LFM2's spacing.
    "lfm2": {"block_dim": 576, "block_ff_dim": 1536, "full_attn_idxs": [2, 5]},
    # Mamba-2 (M), attention (*) and MLP (-) layers, Nemotron-H's mix.
    "nemotron_h": {"hybrid_override_pattern": list("M-M*-M-M"), "mamba_num_heads": 18, "mamba_head_dim": 64, "ssm_state_size": 64},
    # Sliding-window (128) and full attention layers alternating, with attention sinks.
    "gpt_oss": {
        "num_local_experts": 8, "num_experts_per_tok": 2, "intermediate_size": EXPERT, "sliding_window": 128,
        "layer_types": ["sliding_attention", "full_attention"] * 4,
    },
}


def build(architecture: str, seed: int = 0):
    """A random-weight float32 model of `architecture` at the benchmark's size, evaluated."""
    import mlx.core as mx

    module = importlib.import_module(f"mlx_lm.models.{architecture}")
    config = {"model_type": architecture, **families.COMMON, **families.ARCHITECTURES[architecture], **SIZE, **WIDER[architecture]}
    args = module.ModelArgs.from_dict(config)
    mx.random.seed(seed)
    model = module.Model(args)
    mx.eval(model.parameters())
    return model


# --- the workload ---------------------------------------------------------------------


@dataclass
class Workload:
    prefix: list[int]  # the system+tools prefix: the checkpoint
    users: list[list[int]]  # each turn's user message, rendered up to the assistant's header
    end: list[int]  # what closes an answer in the next turn's prompt


def workload(tokenizer, turns: int) -> Workload:
    from anyclaude import prompt
    from anyclaude.api import wire

    body = agent_loop.anthropic_body([{"role": "user", "content": agent_loop.MAIN[0]}])
    rendered = prompt.render(wire.decode_request(json.dumps(body).encode()), tokenizer)
    prefix = rendered.ids[: rendered.checkpoint]

    def ids(text: str) -> list[int]:
        return tokenizer.encode(text, add_special_tokens=False)

    users = [ids(f"<|im_start|>user\n{_user_text(k)}<|im_end|>\n<|im_start|>assistant\n") for k in range(turns)]
    return Workload(prefix, users, ids("<|im_end|>\n"))


def _user_text(turn: int) -> str:
    # A tool result the size of a short Read, a system reminder and the user's request,
    # as Claude Code sends a turn: about 150 tokens, different each turn.
    listing = "\n".join(
        f"     {i + 1}\tdef step_{turn}_{i}(value):" if i % 3 == 0 else f"     {i + 1}\t    return value + {turn * 10 + i}" for i in range(9)
    )
    reminder = "<system-reminder>\nThe TodoWrite tool hasn't been used recently.\n</system-reminder>"
    return f"{listing}\n{reminder}\n{agent_loop.MAIN[turn % len(agent_loop.MAIN)]}"


# --- the three systems ------------------------------------------------------------------


def start_engine(model, tokenizer, prefill_step: int, cached: bool):
    from anyclaude.engine.cache import PrefixCache
    from anyclaude.engine.engine import Engine, Loaded

    # No end-of-sequence ids: a random-weight model would otherwise stop at random, and
    # every answer is the full 24 tokens.
    loaded = Loaded(model=model, tokenizer=tokenizer, context_length=8192, eos_ids=frozenset())
    engine = Engine(lambda: loaded, prefill_step=prefill_step, cache=PrefixCache(KV_BUDGET) if cached else None)
    engine.start()
    engine.wait_ready()
    return engine


def ask(engine, prompt: list[int], checkpoint: int = 0, max_tokens: int = ANSWER) -> tuple[list[int], int, float]:
    """One request: its answer, the prompt tokens the cache gave, and the seconds from
    submitting it to its first Token event."""
    from anyclaude.engine.events import Done, Failed, Generation, Job, Prefilled, Sampling, Token

    greedy = Sampling(temperature=0.0, top_p=1.0, top_k=0)

    async def run() -> tuple[list[int], int, float]:
        generation = Generation(asyncio.get_running_loop())
        tokens, cached, ttft = [], 0, 0.0
        started = time.perf_counter()
        engine.submit(Job(prompt=prompt, max_tokens=max_tokens, sampling=greedy, checkpoint=checkpoint), generation)
        while True:
            event = await generation.next()
            if isinstance(event, Prefilled):
                cached = event.cached
            elif isinstance(event, Token):
                if not tokens:
                    ttft = time.perf_counter() - started
                tokens.append(event.id)
            elif isinstance(event, Failed):
                raise RuntimeError(event.message)
            elif isinstance(event, Done):
                return tokens, cached, ttft

    return asyncio.run(run())


class Ideal:
    """The floor: anyclaude's token loop on the model in this thread, extending one KV
    cache that holds exactly what the previous turns ran through the model, so that each
    turn computes only its new tokens. No queue, no engine thread, no prefix-cache
    lookups, copies or stores."""

    def __init__(self, model, prefill_step: int):
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        self.model, self.prefill_step = model, prefill_step
        self.kv = make_prompt_cache(model)
        self.held: list[int] = []
        self.sampler = make_sampler(temp=0.0, top_p=0.0, top_k=0)  # the engine's, greedy

    def first_token(self, prompt: list[int]) -> float:
        """Seconds to the first token of `prompt`, which must start with what the cache holds."""
        from anyclaude.engine import decode

        assert prompt[: len(self.held)] == self.held, "the ideal cache is not a prefix of the prompt"
        started = time.perf_counter()
        steps = decode.tokens(self.model, prompt[len(self.held) :], self.kv, max_tokens=1, sampler=self.sampler, prefill_step=self.prefill_step)
        next(steps)
        seconds = time.perf_counter() - started
        steps.close()
        self.held = list(prompt)  # the first token was sampled, not fed: the cache holds the prompt
        return seconds

    def feed(self, tokens: list[int]) -> None:
        """Run `tokens` through the model (not timed): the answer, as decoding would have."""
        import mlx.core as mx

        if tokens:
            self.model(mx.array(tokens)[None], cache=self.kv)
            mx.eval([c.state for c in self.kv])
            self.held += tokens


# --- one architecture -----------------------------------------------------------------------


@dataclass
class Script:
    """The conversation as the first pass played it: its prompts (built from the cached
    engine's answers, as Claude Code re-sends what it got) and, per prompt, the no-cache
    engine's answer and time to first token."""

    prompts: list[list[int]] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)  # the cached engine's
    reference: list[list[int]] = field(default_factory=list)  # the no-cache engine's
    plain_ttft: list[float] = field(default_factory=list)


@dataclass
class Pass:
    """One play of the conversation on a fresh prefix cache and a fresh ideal cache."""

    ttft: list[float] = field(default_factory=list)
    ideal_ttft: list[float] = field(default_factory=list)
    cached: list[int] = field(default_factory=list)
    answers: list[list[int]] = field(default_factory=list)


@dataclass
class Turn:
    prompt: int  # tokens
    previous: int  # the previous turn's prompt, all of which is reusable (0 on the first turn)
    reusable: int  # what the previous turn ran through the model and this prompt starts with
    cached: int  # what the prefix cache gave (Prefilled.cached), the least of the passes
    ttft: float  # with the cache; times are the fastest of the passes
    plain_ttft: float  # without a cache (first pass only)
    ideal_ttft: float
    same: int  # passes whose answer equals the no-cache engine's
    passes: int


@dataclass
class Result:
    architecture: str
    cache_types: list[str]
    turns: list[Turn]

    @property
    def cold(self) -> float:
        return self.turns[0].ttft

    @property
    def warm(self) -> list[Turn]:
        return self.turns[1:]

    def same(self) -> str:
        return f"{sum(t.same for t in self.turns)}/{sum(t.passes for t in self.turns)}"

    def warm_over_cold(self) -> float:
        return max(t.ttft for t in self.warm) / self.cold

    def warm_over_ideal(self) -> float:
        return max(t.ttft / t.ideal_ttft for t in self.warm)

    def verdicts(self) -> dict[str, bool]:
        return {
            "warm_over_cold": self.warm_over_cold() <= TARGETS["warm_over_cold"],
            "warm_over_ideal": self.warm_over_ideal() <= TARGETS["warm_over_ideal"],
            "same_answers": all(t.same == t.passes for t in self.turns),
        }


def run_architecture(architecture: str, tokenizer, work: Workload, prefill_step: int, repeat: int) -> Result:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    from anyclaude.engine.cpu import fast as cpu
    from anyclaude.engine.cache import kinds

    model = build(architecture)
    if not mx.metal.is_available():
        cpu.use_numpy_exp()  # after the build: it patches the model modules imported so far
    cache_types = kinds(make_prompt_cache(model))
    plain = start_engine(model, tokenizer, prefill_step, cached=False)
    try:
        _warm_up(work, plain)
        Ideal(model, prefill_step).first_token(_warm_up_prompt(work))  # this thread's
        first, script = play(architecture, model, tokenizer, work, prefill_step, plain=plain)
        passes = [first] + [play(architecture, model, tokenizer, work, prefill_step, script=script)[0] for _ in range(repeat - 1)]
    finally:
        plain.stop()
        plain.wait_stopped()
        del plain, model
        gc.collect()
        mx.clear_cache()
    return Result(architecture, cache_types, [_turn(k, script, passes) for k in range(len(script.prompts))])


def play(architecture: str, model, tokenizer, work: Workload, prefill_step: int, *, plain=None, script: Script | None = None) -> tuple[Pass, Script]:
    """One pass of the conversation on a fresh prefix cache and a fresh ideal cache. The
    first (`plain` given) builds the script, running each prompt also without a cache;
    the others replay its prompts."""
    cached = start_engine(model, tokenizer, prefill_step, cached=True)
    ideal = Ideal(model, prefill_step)
    played, building = Pass(), script is None
    script = Script() if building else script
    try:
        _warm_up(work, cached)
        prompt = work.prefix + work.users[0] if building else script.prompts[0]
        for k in range(len(work.users)):
            # Each prompt goes to all of them in a row, the order rotating from turn to
            # turn, so that other work on the machine slows them alike.
            runs = {"cache": lambda: ask(cached, prompt, checkpoint=len(work.prefix)), "ideal": lambda: ideal.first_token(prompt)}
            if plain is not None:
                runs["plain"] = lambda: ask(plain, prompt)
            names = list(runs)
            out = {name: runs[name]() for name in names[k % len(names) :] + names[: k % len(names)]}
            (answer, got, ttft), ideal_ttft = out["cache"], out["ideal"]
            played.ttft.append(ttft)
            played.ideal_ttft.append(ideal_ttft)
            played.cached.append(got)
            played.answers.append(answer)
            if building:
                script.prompts.append(prompt)
                script.answers.append(answer)
                script.reference.append(out["plain"][0])
                script.plain_ttft.append(out["plain"][2])
            _note(f"{architecture} turn {k + 1}: cached {got}, TTFT {ttft:.2f} s (ideal {ideal_ttft:.2f}"
                  + (f", no cache {out['plain'][2]:.2f})" if plain is not None else ")"))
            if k + 1 < len(work.users):
                said = script.answers[k]  # what the client sends back
                # Its last token was sampled but never run through the model.
                ideal.feed(said[:-1])
                prompt = prompt + said + work.end + work.users[k + 1] if building else script.prompts[k + 1]
    finally:
        cached.stop()
        cached.wait_stopped()
    return played, script


def _turn(k: int, script: Script, passes: list[Pass]) -> Turn:
    previous = len(script.prompts[k - 1]) if k else 0
    return Turn(
        prompt=len(script.prompts[k]),
        previous=previous,
        reusable=previous + len(script.answers[k - 1]) - 1 if k else 0,
        cached=min(p.cached[k] for p in passes),
        # The fastest of the passes: other work on a shared machine only ever adds time.
        ttft=min(p.ttft[k] for p in passes),
        plain_ttft=script.plain_ttft[k],
        ideal_ttft=min(p.ideal_ttft[k] for p in passes),
        same=sum(p.answers[k] == script.reference[k] for p in passes),
        passes=len(passes),
    )


def _warm_up_prompt(work: Workload) -> list[int]:
    # A user message without its first token: it shares no first token with the
    # conversation, so the cache cannot reuse it.
    return work.users[0][1:]


def _warm_up(work: Workload, engine) -> None:
    """A short request (a prompt pass, then decoding) on a new engine's thread, so that
    no measured request pays for one-time setup."""
    ask(engine, _warm_up_prompt(work), max_tokens=4)


# --- printing ---------------------------------------------------------------------------------


def print_architecture(r: Result) -> None:
    print(f"{r.architecture}  (cache types: {', '.join(r.cache_types)})")
    print(f"{'turn':>4}{'prompt':>8}{'cached':>8}{'prev':>7}{'reusable':>9} | {'TTFT s: cache':>13}{'no cache':>9}{'ideal':>7} | "
          f"{'cache/cold':>10}{'cache/ideal':>12} | same")
    for k, t in enumerate(r.turns, 1):
        ratios = f"{t.ttft / r.cold:>10.3f}{t.ttft / t.ideal_ttft:>12.2f}" if k > 1 else f"{'':>10}{'':>12}"
        print(f"{k:>4}{t.prompt:>8}{t.cached:>8}{t.previous or '-':>7}{t.reusable or '-':>9} | {t.ttft:>13.2f}{t.plain_ttft:>9.2f}{t.ideal_ttft:>7.2f} | "
              f"{ratios} | {t.same}/{t.passes}")
    print()


def print_summary(results: list[Result]) -> None:
    print("Summary (warm: turns 2+; cached / prev: prompt tokens from the cache / the previous prompt's, per warm turn)")
    print(f"{'architecture':<13}{'cache types':<40}{'cold s':>7}{'warm s':>12}{'warm/cold':>10}{'ideal s':>12}{'warm/ideal':>11}  {'same':>5}  cached / prev")
    for r in results:
        warm = [t.ttft for t in r.warm]
        ideal = [t.ideal_ttft for t in r.warm]
        reuse = " ".join(f"{t.cached}/{t.previous}" for t in r.warm)
        print(f"{r.architecture:<13}{', '.join(r.cache_types):<40}{r.cold:>7.2f}{_span(warm):>12}{r.warm_over_cold():>10.3f}"
              f"{_span(ideal):>12}{r.warm_over_ideal():>11.2f}  {r.same():>5}  {reuse}")
    print()


def print_targets(results: list[Result]) -> None:
    print(f"Targets: warm/cold <= {TARGETS['warm_over_cold']} (worst warm turn), warm/ideal <= {TARGETS['warm_over_ideal']} "
          "(worst warm turn against the same turn's ideal), every answer equal with and without the cache")
    print(f"{'architecture':<13}{'warm/cold':>18}{'warm/ideal':>18}{'same answers':>18}")
    for r in results:
        v = r.verdicts()
        print(f"{r.architecture:<13}{_verdict(f'{r.warm_over_cold():.3f}', v['warm_over_cold']):>18}"
              f"{_verdict(f'{r.warm_over_ideal():.2f}', v['warm_over_ideal']):>18}{_verdict(r.same(), v['same_answers']):>18}")


def _span(values: list[float]) -> str:
    return f"{min(values):.2f}-{max(values):.2f}"


def _verdict(value: str, ok: bool) -> str:
    return f"{value} {'PASS' if ok else 'FAIL'}"


def _note(what: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {what}", file=sys.stderr, flush=True)


# --- main -------------------------------------------------------------------------------------


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--turns", type=int, default=6, help="turns of the agent loop (at least 2)")
    parser.add_argument("--repeat", type=int, default=2, help="passes with the cache and the ideal; each time is the fastest")
    parser.add_argument("--only", action="append", choices=list(WIDER), metavar="ARCH", help=f"one of {', '.join(WIDER)}; repeatable")
    args = parser.parse_args()
    if args.turns < 2:
        parser.error("--turns must be at least 2: the first turn is the cold one")
    if args.repeat < 1:
        parser.error("--repeat must be at least 1")
    from anyclaude.engine.cpu import blas

    blas.preload_and_reexec(sys.orig_argv[1:], module=None)  # as `anyclaude serve` does
    import mlx.core as mx
    from mlx_lm.utils import load_tokenizer

    from anyclaude import models, profiles
    from anyclaude.engine import metal

    started = time.monotonic()
    profile = profiles.load("tiny").profile
    (model,) = profile.models.values()
    tokenizer = load_tokenizer(Path(models.prepare(model)))
    prefill_step = profile.engine.prefill_step or metal.default_prefill_step()  # the daemon's chunks
    work = workload(tokenizer, args.turns)
    results = [run_architecture(a, tokenizer, work, prefill_step, args.repeat) for a in args.only or WIDER]

    device = "Metal" if mx.metal.is_available() else f"CPU, {'OpenBLAS' if blas.loaded() else 'bundled BLAS'}, NumPy softmax and SwiGLU"
    print(f"\nrandom-weight models: hidden {SIZE['hidden_size']}, intermediate {SIZE['intermediate_size']} (experts: 2 of 8, {EXPERT} wide), {SIZE['num_attention_heads']} heads "
          f"({SIZE['num_key_value_heads']} kv), head_dim {SIZE['head_dim']}, {SIZE['num_hidden_layers']} layers, float32; {device}")
    print(f"system+tools prefix {len(work.prefix)} tokens (the checkpoint); user messages {min(map(len, work.users))}-{max(map(len, work.users))} tokens; "
          f"{ANSWER} tokens per answer, greedy; prefill step {prefill_step}; prefix cache {KV_BUDGET / 2**30:g} GiB")
    print(f"times: the fastest of {args.repeat} pass(es) with the cache and the ideal (fresh caches each); no cache: the first pass's")
    print("prev: the previous turn's prompt; reusable: what the previous turn ran through the model (its prompt and its answer but "
          "the last token), which the ideal reuses\n")
    for r in results:
        print_architecture(r)
    print_summary(results)
    print_targets(results)
    print(f"\n({time.monotonic() - started:.0f} s)")
    print(json.dumps({"results": [{"architecture": r.architecture, "cache_types": r.cache_types, "verdicts": r.verdicts(),
                                   "warm_over_cold": round(r.warm_over_cold(), 4), "warm_over_ideal": round(r.warm_over_ideal(), 4),
                                   "turns": [dataclasses.asdict(t) for t in r.turns]} for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
