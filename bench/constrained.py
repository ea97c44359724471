"""Forced tool calls: what the grammar costs, on the tiny model, in one run.

    uv run python bench/constrained.py [--rounds 5]

Decode speed with and without the `anyclaude.constrain` logits processor, on the same
prompt (prefilled once; each run continues a copy of its KV cache) and the same number
of decode steps: the forced run goes until the call is complete and EOS is sampled, the
plain run then decodes exactly as many tokens. Runs alternate, and the median of the
rounds is kept, since other work on the machine moves single runs. Then the grammar's
compile times for 24 Claude-Code-like tools. Prints a table and one JSON line; the
`ratio` is the constrained cost per token over the unconstrained one.

As `anyclaude serve` does on a CPU, the command re-runs itself with OpenBLAS preloaded
when it is installed, and then decodes dequantized float32 weights: the fastest decode
step the daemon has, so the processor's share of it is the largest.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from importlib.metadata import version
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from anyclaude import constrain, models, profiles
from anyclaude.engine.cpu import blas  # noqa: E402

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about autumn leaves."},
]
MAX_TOKENS = 120

_SCHEMA = "https://json-schema.org/draft/2020-12/schema"
_STR = {"type": "string"}
_BOOL = {"type": "boolean"}
_POSITIVE = {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991}
_METADATA = {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}}


def _object(properties: dict, required: tuple[str, ...] = (), closed: bool = True) -> dict:
    schema: dict = {"$schema": _SCHEMA, "type": "object", "properties": properties}
    if required:
        schema["required"] = list(required)
    if closed:
        schema["additionalProperties"] = False
    return schema


# Shaped after Claude Code 2.1's 24 tools: the same names and the schema features they
# use (reference/anthropic-messages-api.md, section 0), with plausible properties.
CLAUDE_CODE_SCHEMAS = {
    "Agent": _object({"description": _STR, "prompt": _STR, "subagent_type": _STR, "model": {"type": "string", "enum": ["sonnet", "opus", "haiku"]}}, ("description", "prompt", "subagent_type")),
    "Bash": _object({"command": _STR, "timeout": {"type": "number"}, "description": _STR, "run_in_background": _BOOL, "dangerouslyDisableSandbox": _BOOL}, ("command",)),
    "CronCreate": _object(
        {
            "schedule": {"type": "string", "pattern": "^[0-9*/,-]+( [0-9*/,-]+){4}$"},
            "prompt": {"type": "string", "minLength": 1},
            "recurring": {"type": "boolean", "default": True},
        },
        ("schedule", "prompt"),
    ),
    "CronDelete": _object({"id": _STR}, ("id",)),
    "CronList": _object({}),
    "Edit": _object({"file_path": _STR, "old_string": _STR, "new_string": _STR, "replace_all": {"type": "boolean", "default": False}}, ("file_path", "old_string", "new_string")),
    "EnterWorktree": _object({"name": {"type": "string", "pattern": "^[A-Za-z0-9._-]+$", "maxLength": 64}}),
    "ExitWorktree": _object({"action": {"type": "string", "enum": ["keep", "remove"]}}, ("action",)),
    "NotebookEdit": _object(
        {
            "notebook_path": _STR,
            "cell_id": _STR,
            "new_source": _STR,
            "cell_type": {"type": "string", "enum": ["code", "markdown"]},
            "edit_mode": {"type": "string", "enum": ["replace", "insert", "delete"]},
        },
        ("notebook_path", "new_source"),
    ),
    "Read": _object({"file_path": {"type": "string", "description": "The absolute path to the file to read"}, "offset": _POSITIVE, "limit": _POSITIVE}, ("file_path",)),
    "ReportFindings": _object(
        {
            "findings": {
                "type": "array",
                "maxItems": 50,
                "items": _object(
                    {
                        "title": _STR,
                        "severity": {"anyOf": [{"const": "low"}, {"const": "medium"}, {"const": "high"}]},
                        "file": _STR,
                        "line": {"type": "integer", "minimum": 1},
                    },
                    ("title", "severity"),
                ),
            }
        },
        ("findings",),
    ),
    "ScheduleWakeup": _object({"delay_seconds": _POSITIVE, "reason": _STR}, ("delay_seconds",)),
    "SendMessage": _object({"to": _STR, "message": _STR, "summary": {"type": "string", "maxLength": 200}}, ("to", "message")),
    "Skill": _object({"skill": _STR, "args": _STR}, ("skill",)),
    "TaskCreate": _object({"subject": _STR, "description": _STR, "activeForm": _STR, "metadata": _METADATA}, ("subject", "description")),
    "TaskGet": _object({"taskId": _STR}, ("taskId",)),
    "TaskList": _object({}, closed=False),
    "TaskOutput": _object({"task_id": _STR, "block": {"type": "boolean", "default": True}, "timeout": {"type": "number", "minimum": 0, "maximum": 600000, "default": 30000}}, ("task_id",)),
    "TaskStop": _object({"task_id": _STR}, ("task_id",)),
    "TaskUpdate": _object(
        {
            "taskId": _STR,
            "status": {"anyOf": [{"const": s} for s in ("pending", "in_progress", "completed", "deleted")]},
            "subject": _STR,
            "owner": _STR,
            "metadata": _METADATA,
            "addBlocks": {"type": "array", "items": _STR},
        },
        ("taskId",),
    ),
    "WebFetch": _object({"url": {"type": "string", "format": "uri"}, "prompt": {"type": "string", "minLength": 1}}, ("url", "prompt")),
    "WebSearch": _object({"query": {"type": "string", "minLength": 2}, "allowed_domains": {"type": "array", "items": _STR}, "blocked_domains": {"type": "array", "items": _STR}}, ("query",)),
    "Workflow": _object({"name": {"type": "string", "pattern": "^[a-z-]+$"}, "args": {"description": "Anything: passed to the workflow as is."}}, ("name",)),
    "Write": _object({"file_path": _STR, "content": {"type": "string", "maxLength": 524288}}, ("file_path", "content")),
}


def claude_code_tools() -> list[dict]:
    return [
        {"type": "function", "function": {"name": name, "description": f"The {name} tool.", "parameters": schema}}
        for name, schema in CLAUDE_CODE_SCHEMAS.items()
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()
    blas.preload_and_reexec(sys.orig_argv[1:], module=None)  # as `anyclaude serve` does

    import mlx.core as mx
    from mlx_lm import load

    (spec,) = profiles.load("tiny").profile.models.values()
    model, tokenizer = load(models.prepare(spec))
    device = "Metal" if mx.metal.is_available() else "CPU, quantized, bundled BLAS"
    if not mx.metal.is_available() and blas.loaded():
        from anyclaude.engine.cpu.fast import dequantize

        dequantize(model)
        device = "CPU, dequantized, OpenBLAS"

    tools = claude_code_tools()
    compile_figures = _compile_times(tokenizer, tools)
    decode = _decode(model, tokenizer, tools, args.rounds)
    report = {
        "engine": f"llguidance {version('llguidance')}",
        "device": device,
        "decode_tokens": decode["tokens"],
        "rounds": args.rounds,
        "plain_tok_s": round(decode["plain_tok_s"], 2),
        "forced_tok_s": round(decode["forced_tok_s"], 2),
        "processor_ms_per_token": round(decode["processor_ms"], 3),
        # The processor's own work as a share of an unconstrained decode step.
        "processor_share": round(decode["processor_ms"] * decode["plain_tok_s"] / 1e3, 4),
        "ratio": round(decode["plain_tok_s"] / decode["forced_tok_s"], 4),
        **compile_figures,
    }
    _print(report, decode["text"])


def _compile_times(tokenizer, tools: list[dict]) -> dict:
    import mlx.core as mx

    started = time.perf_counter()
    constrain.prepare(tokenizer)
    prepare_s = time.perf_counter() - started

    started = time.perf_counter()
    processor = constrain.forced_call(tokenizer, tools, None)
    compile_any_ms = (time.perf_counter() - started) * 1e3
    # llguidance builds its lexer lazily: the first mask finishes the compile.
    logits = mx.zeros((1, len(tokenizer.vocab)))
    started = time.perf_counter()
    mx.eval(processor(mx.array([0]), logits))
    first_mask_ms = (time.perf_counter() - started) * 1e3

    started = time.perf_counter()
    for tool in tools:
        constrain.forced_call(tokenizer, tools, tool["function"]["name"])
    compile_each_ms = (time.perf_counter() - started) * 1e3

    cached = []
    for _ in range(20):
        started = time.perf_counter()
        constrain.forced_call(tokenizer, tools, None)
        cached.append(time.perf_counter() - started)
    return {
        "tools": len(tools),
        "tokenizer_prepare_s": round(prepare_s, 3),
        "compile_any_ms": round(compile_any_ms, 2),
        "first_mask_ms": round(first_mask_ms, 2),
        "compile_each_total_ms": round(compile_each_ms, 2),
        "cached_forced_call_us": round(statistics.median(cached) * 1e6, 1),
    }


class _Timed:
    """The processor, with the time spent in it counted."""

    def __init__(self, processor):
        self.processor, self.seconds = processor, 0.0

    def __call__(self, tokens, logits):
        import mlx.core as mx

        # The processor reads the token just sampled, so it waits for the step that
        # samples it; count only its own work, after that wait.
        mx.eval(tokens)
        started = time.perf_counter()
        out = self.processor(tokens, logits)
        self.seconds += time.perf_counter() - started
        return out


def _decode(model, tokenizer, tools: list[dict], rounds: int) -> dict:
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    prompt = tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True)
    cache = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])

    def run(processor, max_tokens: int, stop_at_eos: bool) -> tuple[list[int], float]:
        from mlx_lm.generate import generate_step

        steps = generate_step(
            mx.array(prompt[-1:]),
            model,
            max_tokens=max_tokens,
            logits_processors=[processor] if processor else None,
            prompt_cache=copy.deepcopy(cache),
        )
        out, first = [], 0.0
        for token, _ in steps:
            out.append(token)
            if len(out) == 1:
                first = time.perf_counter()  # decode time: from the first token on
            if stop_at_eos and token in tokenizer.eos_token_ids:
                break
        return out, time.perf_counter() - first

    # The forced call's length sets the plain runs' length (greedy: the same every round).
    timed = _Timed(constrain.forced_call(tokenizer, tools, "Bash"))
    out, _ = run(timed, MAX_TOKENS, stop_at_eos=True)
    tokens = len(out)
    text = tokenizer.decode([t for t in out if t not in tokenizer.eos_token_ids])

    forced_rates, plain_rates, processor_ms = [], [], []
    for i in range(rounds):
        for kind in ("plain", "forced") if i % 2 else ("forced", "plain"):  # no fixed order
            if kind == "plain":
                out, seconds = run(None, tokens, stop_at_eos=False)
                plain_rates.append((len(out) - 1) / seconds)
                continue
            timed = _Timed(constrain.forced_call(tokenizer, tools, "Bash"))
            out, seconds = run(timed, MAX_TOKENS, stop_at_eos=True)
            forced_rates.append((len(out) - 1) / seconds)
            processor_ms.append(timed.seconds * 1e3 / len(out))
    return {
        "tokens": tokens,
        "forced_tok_s": statistics.median(forced_rates),
        "plain_tok_s": statistics.median(plain_rates),
        "processor_ms": statistics.median(processor_ms),
        "text": text,
    }


def _print(report: dict, text: str) -> None:
    print(f"{report['engine']}; tiny model on {report['device']}; {report['rounds']} rounds, medians\n")
    print(f"{'decode, same prompt and length':<44}{'tok/s':>10}")
    print(f"{'  unconstrained':<44}{report['plain_tok_s']:>10.2f}")
    print(f"{'  forced call (Bash, of 24 tools)':<44}{report['forced_tok_s']:>10.2f}")
    print(f"{'  processor time per token (ms)':<44}{report['processor_ms_per_token']:>10.3f}")
    print(f"{'  processor time / unconstrained step':<44}{report['processor_share']:>10.4f}")
    print(f"{'  cost per token, forced / unconstrained':<44}{report['ratio']:>10.3f}")
    print(f"  ({report['decode_tokens']} tokens: {text!r})\n")
    print(f"grammar for {report['tools']} Claude-Code-like tools")
    print(f"{'  tokenizer prepared, once per model (s)':<44}{report['tokenizer_prepare_s']:>10.3f}")
    print(f"{'  compile, tool_choice any (ms)':<44}{report['compile_any_ms']:>10.2f}")
    print(f"{'  first mask after compile (ms)':<44}{report['first_mask_ms']:>10.2f}")
    print(f"{'  compile, each tool named, all 24 (ms)':<44}{report['compile_each_total_ms']:>10.2f}")
    print(f"{'  cached forced_call (us)':<44}{report['cached_forced_call_us']:>10.1f}\n")
    print(json.dumps(report))


if __name__ == "__main__":
    main()
