"""Round trips against the real chat templates of the families people run.

tests/test_roundtrip.py checks the round trip (a generated call, rendered back as history
next turn, gives back the generated token ids: DESIGN principle 4) with templates written
"in the shape of" each family. Here the templates are the models' own, as data under
tests/templates/ (sources in tests/templates/SOURCES.md and on each file's first line),
so what those templates really do to a call (print a Python `True`, add an id the model
never wrote, drop an empty reasoning block) shows up.

Each case: render a request with the tiny model's tokenizer carrying the family's
template and markers (special tokens, as in the family's real vocabulary), take the call
as the model writes it (the forced-call grammar's canonical text, `constrain.format_for(
tokenizer, format).render(...)`; by hand for families without a grammar) with its
end-of-turn token, parse it as the daemon does, send it back as a tool_use with a
tool_result, and compare the next turn's prompt with the first prompt plus the
generated tokens.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from anyclaude import constrain, prompt, signature, toolcalls
from anyclaude.api import wire
from anyclaude.families import qwen3_coder
from anyclaude.output import Output

TEMPLATES = Path(__file__).parent / "templates"

# Claude Code's Bash tool, cut down, with one argument of each JSON type: a boolean
# (Bash's `run_in_background`, Edit's `replace_all`), an integer, a nested object, an array.
BASH = {
    "name": "Bash",
    "description": "Run a shell command",
    "input_schema": {
        "type": "object",
        "properties": {
            "command": {"type": "string"},
            "timeout": {"type": "integer"},
            "run_in_background": {"type": "boolean"},
            "options": {"type": "object", "properties": {"cwd": {"type": "string"}, "env": {"type": "object"}}},
            "paths": {"type": "array", "items": {"type": "string"}},
        },
        "required": ["command"],
    },
}
ARGS = {
    "command": "ls -la /tmp",
    "timeout": 120,
    "run_in_background": True,
    "options": {"cwd": "/tmp", "env": {"LANG": "C"}},
    "paths": ["a.txt", "b c.txt"],
}
ASK = [{"role": "user", "content": "List my files."}]

CHATML = ("<tool_call>", "</tool_call>")
QWEN_THINK = (*CHATML, "<think>", "</think>", "<tool_response>", "</tool_response>")
LLAMA3 = ("<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>")
MISTRAL = (
    "[INST]", "[/INST]", "[TOOL_CALLS]", "[ARGS]", "[CALL_ID]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]",
    "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "[TOOL_CONTENT]",
)
GLM = (
    "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>", "<think>", "</think>",
    "<tool_call>", "</tool_call>", "<arg_key>", "</arg_key>", "<arg_value>", "</arg_value>", "<tool_response>", "</tool_response>",
)
GEMMA = ("<start_of_turn>", "<end_of_turn>")
HARMONY = ("<|start|>", "<|end|>", "<|message|>", "<|channel|>", "<|constrain|>", "<|return|>", "<|call|>")
# Llama 3's pre-tokenizer (see tests/test_roundtrip.py): with the tiny model's GPT-2 rule
# "\n\n" before "{" would split differently from how Llama's own tokenizer splits it.
LLAMA3_PRE_TOKENIZER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _glm46(name: str, args: dict) -> str:
    # GLM-4.5/4.6 as their template teaches it (and renders it back): one key/value per
    # line, strings raw, everything else JSON.
    pairs = "".join(f"\n<arg_key>{k}</arg_key>\n<arg_value>{_raw_or_json(v)}</arg_value>" for k, v in args.items())
    return f"\n<tool_call>{name}{pairs}\n</tool_call>"


def _glm47(name: str, args: dict) -> str:
    # GLM-4.7: the same, with no newlines.
    pairs = "".join(f"<arg_key>{k}</arg_key><arg_value>{_raw_or_json(v)}</arg_value>" for k, v in args.items())
    return f"<tool_call>{name}{pairs}</tool_call>"


def _harmony(name: str, args: dict) -> str:
    return f"<|channel|>commentary to=functions.{name} <|constrain|>json<|message|>{json.dumps(args)}"


def _raw_or_json(value: object) -> str:
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


@dataclass(frozen=True)
class Case:
    template: str  # a file under tests/templates
    format: str  # the toolcalls.Format name anyclaude must choose for it
    special: tuple[str, ...] = ()  # the family's markers: special tokens in its real vocabulary
    end: str | None = None  # the token that ends the assistant's turn (None: the tokenizer's EOS)
    # The call as the model writes it, for families with no forced-call grammar.
    call: Callable[[str, dict], str] | None = None
    # Text at the end of the first prompt that the template leaves out of the same
    # turn in history (the prefix cache misses there, by the template's design).
    dropped: str = ""
    # For templates that render a call back with an id the model never wrote: the part
    # of the generated call the history keeps (None: all of it, and the end of turn).
    kept: Callable[[str], str] | None = None
    system: bool = True  # whether the request has a system prompt
    pre_tokenizer: str | None = None


def case(id: str, *args, xfail: str | None = None, **kwargs):
    marks = [pytest.mark.xfail(reason=xfail, strict=True)] if xfail else []
    return pytest.param(Case(*args, **kwargs), id=id, marks=marks)


CASES = [
    case("qwen3-coder", "Qwen3-Coder.jinja", "qwen3_coder", CHATML),
    case("qwen3.5", "Qwen3.5-4B.jinja", "qwen3_coder", QWEN_THINK),
    # Qwen3 renders an earlier turn's reasoning only when there was some: the empty
    # block its generation prompt opens with thinking off is gone next turn.
    case("qwen3", "Qwen-Qwen3-0.6B.jinja", "hermes", QWEN_THINK, dropped="<think>\n\n</think>\n\n"),
    case("qwen2.5", "Qwen-Qwen2.5-7B-Instruct.jinja", "hermes", CHATML),
    case("llama3.1", "meta-llama-Llama-3.1-8B-Instruct.jinja", "llama3", LLAMA3, end="<|eot_id|>", pre_tokenizer=LLAMA3_PRE_TOKENIZER),
    case("llama3.2", "meta-llama-Llama-3.2-3B-Instruct.jinja", "llama3", LLAMA3, end="<|eot_id|>", pre_tokenizer=LLAMA3_PRE_TOKENIZER),
    case("devstral", "unsloth-mistral-Devstral-Small-2507.jinja", "mistral", MISTRAL),
    # Mistral Small 3.2 renders `[CALL_ID]<id>` between the name and `[ARGS]`, and Nemo
    # an `"id"` after the arguments: ids the model does not write (and the templates
    # insist on, as 9 alphanumerics). The history agrees with the call up to there.
    case("mistral-small-3.2", "Mistral-Small-3.2-24B-Instruct-2506.jinja", "mistral", MISTRAL, kept=lambda call: call[: call.index("[ARGS]")]),
    # Nemo also renders the system prompt only into the user turn that is the last
    # message, so it is gone once a tool result follows: asked without one.
    case(
        "mistral-nemo", "mistralai-Mistral-Nemo-Instruct-2407.jinja", "mistral", MISTRAL,
        kept=lambda call: call[: call.rindex("}}")], system=False,
    ),
    case("glm-4.6", "GLM-4.6.jinja", "glm47", GLM, end="<|observation|>", call=_glm46),
    case("glm-4.7", "GLM-4.7-Flash.jinja", "glm47", GLM, end="<|observation|>", call=_glm47),
    # No tool syntax of its own: tools go in the system prompt in the generic format.
    case("gemma3", "google-gemma-3-it.jinja", "generic", GEMMA, end="<end_of_turn>"),
    # The template writes a call's recipient in the role part; the model (and harmony's
    # own renderer) in the channel part, with `<|constrain|>`: the family writes it back so.
    case("gpt-oss", "openai-gpt-oss-120b.jinja", "harmony", HARMONY, end="<|call|>", call=_harmony),
]


def family_tokenizer(tiny_model: Path, template: str, special: tuple[str, ...], pre_tokenizer: str | None = None):
    """The tiny model's tokenizer as mlx-lm loads it (so mlx-lm infers the tool parser
    from the template), with the family's template and markers."""
    from mlx_lm.utils import load_tokenizer

    config: dict = {"chat_template": (TEMPLATES / template).read_text()}
    if special:
        config["extra_special_tokens"] = list(special)
    made = load_tokenizer(tiny_model, config)
    if pre_tokenizer:
        from tokenizers import Regex, pre_tokenizers

        made._tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(pre_tokenizer), behavior="isolated"), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)]
        )
    return made


def request(messages: list[dict], *, system: bool = True, **fields) -> wire.MessagesRequest:
    body = {"model": "m", "max_tokens": 64, "tools": [BASH], "messages": messages} | fields
    if system:
        body["system"] = "You run commands."
    return wire.decode_request(json.dumps(body).encode())


def history(arguments: dict, tool_use_id: str = "toolu_01") -> list[dict]:
    # The tool result alone, as Claude Code sends it in an agent loop: no new user query.
    return ASK + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": tool_use_id, "name": "Bash", "input": arguments}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": tool_use_id, "content": "a.txt"}]},
    ]


def generated_call(tok, fmt: toolcalls.Format, c: Case) -> str:
    if c.call is not None:
        return c.call("Bash", ARGS)
    return constrain.format_for(tok, fmt).render("Bash", ARGS)


def parsed(tok, first: prompt.Rendered, ids: list[int]) -> list:
    output = Output(tok, toolcalls.Parser(first.format, first.tools))
    return [s for t in ids for s in output.add(t)] + output.finish()


def grammar_writes(tok, first: prompt.Rendered, text: str, name: str = "Bash") -> bool:
    """Whether the forced-call grammar lets the model write `text`, token by token as
    generate_step feeds it, and then only end the generation."""
    import mlx.core as mx
    import numpy as np

    processor = constrain.forced_call(tok, first.tools, name, first.format)
    logits = mx.zeros((1, len(tok.vocab)))
    seen = list(first.ids)
    for token in tok.encode(text, add_special_tokens=False):
        if processor(mx.array(seen), logits)[0, token].item() == float("-inf"):
            return False
        seen.append(token)
    final = np.array(processor(mx.array(seen), logits)[0])
    return set(np.flatnonzero(final != -np.inf).tolist()) == set(tok.eos_token_ids)


def where_they_part(tok, got: list[int], want: list[int]) -> str:
    i = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), min(len(got), len(want)))
    return f"token {i}: next turn has {tok.decode(got[i : i + 12])!r}, generated {tok.decode(want[i : i + 12])!r}"


@pytest.mark.parametrize("c", CASES)
def test_a_generated_call_renders_back_to_the_generated_tokens(tiny_model, c: Case):
    tok = family_tokenizer(tiny_model, c.template, c.special, c.pre_tokenizer)
    first = prompt.render(request(ASK, system=c.system), tok)
    assert first.format.name == c.format
    call = generated_call(tok, first.format, c)
    if constrain.supports(first.format, tok):
        assert grammar_writes(tok, first, call)
    out_ids = tok.encode(call, add_special_tokens=False)
    out_ids.append(tok.convert_tokens_to_ids(c.end) if c.end else tok.eos_token_id)
    assert parsed(tok, first, out_ids[:-1]) == [toolcalls.ToolCall("Bash", ARGS)]
    second = prompt.render(request(history(ARGS), system=c.system), tok)
    assert first.text.endswith(c.dropped)
    before = tok.encode(first.text.removesuffix(c.dropped), add_special_tokens=False) if c.dropped else first.ids
    if c.kept is not None:
        out_ids = tok.encode(c.kept(call), add_special_tokens=False)
    want = before + out_ids
    assert second.ids[: len(want)] == want, where_they_part(tok, second.ids, want)


@pytest.mark.parametrize("c", [pytest.param(p.values[0], id=p.id) for p in CASES])
def test_the_checkpoint_covers_the_system_prompt_and_tools(tiny_model, c: Case):
    """The checkpoint (the shared system+tools prefix kept for Claude Code's side requests
    and subagents) must hold the tools wherever the template puts them: in the system turn,
    before it (Qwen3.5), or in the first user turn (Llama 3.x, Gemma 3's system prompt)."""
    tok = family_tokenizer(tiny_model, c.template, c.special, c.pre_tokenizer)
    main = prompt.render(request(ASK), tok)
    side = prompt.render(request([{"role": "user", "content": "Write a title for this chat."}]), tok)
    shared = tok.decode(main.ids[: main.checkpoint])
    assert "You run commands." in shared and "Run a shell command" in shared, shared[-200:]
    assert side.checkpoint == main.checkpoint and side.ids[: side.checkpoint] == main.ids[: main.checkpoint]


@pytest.mark.parametrize("template", ["Qwen3-Coder.jinja", "Qwen3.5-4B.jinja"])
def test_qwen3_coder_history_writes_every_value_as_the_model_does(tiny_model, template):
    """Qwen3-Coder's template prints non-containers with `| string` (Python's `True`,
    `None`): every value must come back as the call was generated, JSON for non-strings."""
    tok = family_tokenizer(tiny_model, template, QWEN_THINK)
    values = {
        "off": False, "none": None, "ratio": 0.25, "big": 10**20, "nested": {"é": [1, True, None]},
        "empty": [], "text": "true", "spaced": " two\nlines ",
    }
    second = prompt.render(request(history(values)), tok)
    assert qwen3_coder.CALLS.render("Bash", values) in second.text


# The reasoning before a call, as each family writes it (from the start of the reply;
# the part the generation prompt already opened is left out below).
REASONING = {
    "qwen3": lambda r: f"<think>\n{r}\n</think>\n\n",
    "qwen3.5": lambda r: f"<think>\n{r}\n</think>\n\n",
    "glm-4.6": lambda r: f"\n<think>{r}</think>",
    "glm-4.7": lambda r: f"<think>{r}</think>",
    "gpt-oss": lambda r: f"<|channel|>analysis<|message|>{r}<|end|><|start|>assistant",
}


@pytest.mark.parametrize("omitted", [False, True], ids=["shown", "omitted"])
@pytest.mark.parametrize("family,c", [pytest.param(p.id, p.values[0], id=p.id) for p in CASES if p.id in REASONING])
def test_reasoning_within_a_tool_loop_renders_back_to_the_generated_tokens(tiny_model, family: str, c: Case, omitted: bool):
    """Families whose templates keep the reasoning of the current tool loop get it back
    as generated, so the next turn's prompt is still the first prompt and the reply; with
    display "omitted" (Claude Code's default) the text comes back in the signature."""
    tok = family_tokenizer(tiny_model, c.template, c.special, c.pre_tokenizer)
    thinking = {"thinking": {"type": "enabled", "budget_tokens": 1024}, "max_tokens": 2048}
    first = prompt.render(request(ASK, system=c.system, **thinking), tok)
    full = REASONING[family]("I should list the files.")
    # What the generation prompt already opened (Qwen3.5's and GLM-4.7's `<think>`).
    reply = full[max((n for n in range(len(full) + 1) if first.text.endswith(full[:n])), default=0) :]
    reply += generated_call(tok, first.format, c)
    out_ids = tok.encode(reply, add_special_tokens=False)
    out_ids.append(tok.convert_tokens_to_ids(c.end) if c.end else tok.eos_token_id)
    output = Output(tok, toolcalls.Parser(first.format, first.tools, thinking=first.thinking_open))
    segments: list = []
    for s in [s for t in out_ids[:-1] for s in output.add(t)] + output.finish():
        if segments and type(s) is type(segments[-1]) and isinstance(s, (toolcalls.Text, toolcalls.Thinking)):
            s = type(s)(segments.pop().text + s.text)  # the pieces of one streamed run
        segments.append(s)
    assert segments == [toolcalls.Thinking("I should list the files."), toolcalls.ToolCall("Bash", ARGS)]
    thought = {"thinking": "", "signature": signature.seal("I should list the files.")} if omitted else {"thinking": "I should list the files.", "signature": "s"}
    turn = [{"type": "thinking"} | thought, {"type": "tool_use", "id": "toolu_01", "name": "Bash", "input": ARGS}]
    messages = ASK + [{"role": "assistant", "content": turn}, {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "a.txt"}]}]
    second = prompt.render(request(messages, system=c.system, **thinking), tok)
    want = first.ids + (tok.encode(c.kept(reply), add_special_tokens=False) if c.kept else out_ids)
    assert second.ids[: len(want)] == want, where_they_part(tok, second.ids, want)


def test_claude_code_s_own_request_knows_where_its_generation_prompt_begins(tiny_model):
    # Claude Code 2.1.332's default request carries system reminders after the first
    # message, which Qwen3.5's template refuses as system turns: they are folded into the
    # user's, and the generation prompt is found in the prompt as the template took it.
    captured = json.loads((Path(__file__).parent / "fixtures" / "claude_code_2.1.332.json").read_text())["body"]
    tok = family_tokenizer(tiny_model, "Qwen3.5-4B.jinja", QWEN_THINK)
    rendered = prompt.render(wire.decode_request(json.dumps(captured).encode()), tok)
    assert 0 < rendered.checkpoint < rendered.reply_start < len(rendered.ids) and rendered.user_turn
    assert tok.decode(rendered.ids[rendered.reply_start :]).startswith("<|im_start|>assistant\n")
