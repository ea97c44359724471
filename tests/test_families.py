"""Family modules: detection by discovery, and what gpt-oss's harmony and GLM's calls need
beyond the round trips of tests/test_templates.py."""

from __future__ import annotations

import json

import pytest
from test_templates import BASH, GLM, HARMONY, family_tokenizer, grammar_writes, request

from anyclaude import constrain, families, prompt, toolcalls
from anyclaude.output import Output
from anyclaude.toolcalls import BadCall, Text, Thinking, ToolCall

TOOLS = [{"type": "function", "function": {"name": BASH["name"], "parameters": BASH["input_schema"]}}]


def test_every_module_with_a_family_is_found_in_order():
    names = [f.name for f in families.all_families()]
    assert set(names) == {"gpt_oss", "qwen3_coder", "glm", "hermes", "mistral", "llama3", "mlx", "generic"}
    assert names[-1] == "generic" and names.index("gpt_oss") < names.index("mlx")


@pytest.fixture(scope="module")
def gpt_oss(tiny_model):
    return family_tokenizer(tiny_model, "openai-gpt-oss-120b.jinja", HARMONY)


def segments(tok, text: str, thinking: bool = False) -> list:
    """`text` as the model's tokens, through the daemon's output path, runs merged."""
    fmt = families.detect(tok)
    output = Output(tok, toolcalls.Parser(fmt, TOOLS, thinking=thinking))
    out: list = []
    for s in [s for t in tok.encode(text, add_special_tokens=False) for s in output.add(t)] + output.finish():
        if out and type(s) is type(out[-1]) and isinstance(s, (Text, Thinking)):
            s = type(s)(out.pop().text + s.text)
        out.append(s)
    return out


CALL = '{"command": "ls"}'


@pytest.mark.parametrize(
    "text,expected",
    [
        ("<|channel|>analysis<|message|>Need to list.<|end|><|start|>assistant<|channel|>final<|message|>Two files.", [Thinking("Need to list."), Text("Two files.")]),
        (f"<|channel|>analysis<|message|>Plan.<|end|><|start|>assistant<|channel|>commentary to=functions.Bash <|constrain|>json<|message|>{CALL}", [Thinking("Plan."), ToolCall("Bash", {"command": "ls"})]),
        # The recipient in the role part, and no <|constrain|>.
        (f"<|channel|>analysis<|message|>Plan.<|end|><|start|>assistant to=functions.Bash<|channel|>commentary json<|message|>{CALL}", [Thinking("Plan."), ToolCall("Bash", {"command": "ls"})]),
        # A preamble on the commentary channel is text the user sees.
        (f"<|channel|>commentary<|message|>Listing.<|end|><|start|>assistant<|channel|>commentary to=functions.Bash<|constrain|>json<|message|>{CALL}", [Text("Listing."), ToolCall("Bash", {"command": "ls"})]),
        ("<|channel|>final<|message|>No markup: a `to=functions.x` in prose stays.", [Text("No markup: a `to=functions.x` in prose stays.")]),
    ],
)
def test_harmony_channels_become_reasoning_text_and_calls(gpt_oss, text, expected):
    assert families.detect(gpt_oss).name == "harmony"
    assert segments(gpt_oss, text) == expected


def test_a_harmony_call_to_an_unknown_recipient_or_cut_off_is_a_bad_call(gpt_oss):
    [bad] = segments(gpt_oss, '<|channel|>commentary to=browser.search <|constrain|>json<|message|>{"query": "x"}')
    assert isinstance(bad, BadCall) and "unknown tool 'browser.search'" in bad.reason
    [cut] = segments(gpt_oss, '<|channel|>commentary to=functions.Bash <|constrain|>json<|message|>{"command": "l')
    assert isinstance(cut, BadCall) and cut.reason == "truncated" and cut.raw.endswith('{"command": "l')


def test_parallel_calls_each_render_with_their_own_result(gpt_oss):
    """The template renders one call per message and names each result after the last
    call: each of Claude Code's parallel calls goes in a message of its own, its result after it."""
    calls = [{"type": "tool_use", "id": f"toolu_{i}", "name": "Bash", "input": {"command": c}} for i, c in enumerate(["ls", "pwd"])]
    results = [{"type": "tool_result", "tool_use_id": f"toolu_{i}", "content": out} for i, out in enumerate(["a.txt", "/tmp"])]
    messages = [{"role": "user", "content": "Look around."}, {"role": "assistant", "content": calls}, {"role": "user", "content": results}]
    text = prompt.render(request(messages), gpt_oss).text
    ls, pwd = (f'<|start|>assistant<|channel|>commentary to=functions.Bash <|constrain|>json<|message|>{{"command": "{c}"}}<|call|>' for c in ("ls", "pwd"))
    result = '<|start|>functions.Bash to=assistant<|channel|>commentary<|message|>"{}"<|end|>'
    assert ls + result.format("a.txt") + pwd + result.format("/tmp") in text


def test_effort_sets_gpt_oss_reasoning_level(gpt_oss):
    def text(effort):
        body = {"messages": [{"role": "user", "content": "Hi"}]} | ({"output_config": {"effort": effort}} if effort else {})
        return prompt.render(request(**body), gpt_oss).text

    assert "Reasoning: medium" in text(None)
    assert "Reasoning: low" in text("low") and "Reasoning: high" in text("max")


@pytest.mark.parametrize("template", ["GLM-4.6.jinja", "GLM-4.7-Flash.jinja"])
@pytest.mark.parametrize(
    "arguments",
    [{"command": "ls"}, {"command": "a\nb", "timeout": 5, "run_in_background": False}, {"command": "x", "options": {"cwd": "/"}, "paths": ["a", "b"]}],
)
def test_a_forced_glm_call_is_what_the_template_renders_and_the_parser_reads(tiny_model, template, arguments):
    tok = family_tokenizer(tiny_model, template, GLM)
    first = prompt.render(request([{"role": "user", "content": "Go."}]), tok)
    calls = constrain.format_for(tok, first.format)
    text = calls.render("Bash", arguments)
    assert grammar_writes(tok, first, text)
    assert segments(tok, text) == [ToolCall("Bash", arguments)]
    assert calls.parse(text) == ("Bash", arguments)


@pytest.mark.parametrize("value", [" padded", "trailing ", "has </arg_value> inside"])
def test_a_glm_string_the_parser_would_change_cannot_be_forced(tiny_model, value):
    # mlx-lm's glm47 parser strips a value and ends it at `</arg_value>`.
    tok = family_tokenizer(tiny_model, "GLM-4.7-Flash.jinja", GLM)
    first = prompt.render(request([{"role": "user", "content": "Go."}]), tok)
    text = constrain.format_for(tok, first.format).render("Bash", {"command": value})
    assert not grammar_writes(tok, first, text)


def test_a_forced_harmony_call(gpt_oss):
    first = prompt.render(request([{"role": "user", "content": "Go."}]), gpt_oss)
    text = constrain.format_for(gpt_oss, first.format).render("Bash", {"command": "ls", "timeout": 3})
    assert text == '<|channel|>commentary to=functions.Bash <|constrain|>json<|message|>{"command": "ls", "timeout": 3}'
    assert grammar_writes(gpt_oss, first, text)
    assert json.loads(text.partition("<|message|>")[2]) == {"command": "ls", "timeout": 3}
