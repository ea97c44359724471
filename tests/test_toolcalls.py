"""Tool calls and thinking cut out of generated text, piece by piece, per model family."""

from __future__ import annotations

import copy
import json
import random
from pathlib import Path

import pytest

from anyclaude.families import detect as format_for
from anyclaude.families.generic import FORMAT as GENERIC
from anyclaude.toolcalls import BadCall, Parser, Text, Thinking, ToolCall


def function(name: str, parameters: dict) -> dict:
    return {"type": "function", "function": {"name": name, "description": f"The {name}.", "parameters": parameters}}


def closed(properties: dict, required: list[str]) -> dict:
    return {"type": "object", "properties": properties, "required": required, "additionalProperties": False}


STRING = {"type": "string"}

# Shaped like the schemas Claude Code sends (with `$schema` already removed).
TOOLS = [
    function(
        "Read",
        closed(
            {
                "file_path": {"type": "string"},
                "offset": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991},
                "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991},
            },
            ["file_path"],
        ),
    ),
    function(
        "Bash",
        closed(
            {
                "command": {"type": "string"},
                "timeout": {"type": "number"},
                "run_in_background": {"type": "boolean"},
            },
            ["command"],
        ),
    ),
    function(
        "Write",
        closed(
            {"file_path": STRING, "content": STRING, "paths": {"type": "array", "items": STRING, "maxItems": 8}},
            ["file_path", "content"],
        ),
    ),
    function("WebFetch", closed({"url": {"type": "string", "format": "uri"}, "prompt": STRING}, ["url", "prompt"])),
    function(
        "TodoWrite",
        closed(
            {
                "todos": {
                    "type": "array",
                    "items": closed(
                        {
                            "content": {"type": "string", "minLength": 1},
                            "status": {"type": "string", "enum": ["pending", "in_progress", "completed"]},
                            "activeForm": {"type": "string"},
                        },
                        ["content", "status", "activeForm"],
                    ),
                }
            },
            ["todos"],
        ),
    ),
    function("ExitPlanMode", {"type": "object", "properties": {}}),
    function(
        "Config",
        closed(
            {
                "setting": {"type": "string"},
                "value": {"description": "no type: anything goes"},
                "scope": {"anyOf": [{"const": "user"}, {"const": "project"}]},
                "labels": {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}},
            },
            ["setting"],
        ),
    ),
]

READ = ("Read", {"file_path": "/tmp/a.py"})
BASH = ("Bash", {"command": "ls -la", "timeout": 30, "run_in_background": False})
TODOS = ("TodoWrite", {"todos": [{"content": "Fix it", "status": "in_progress", "activeForm": "Fixing it"}]})


# -- chat templates with the features mlx-lm's inference (and format_for) look at --

QWEN25 = (
    "{%- if tools %}<|im_start|>system\n# Tools\n<tools>{% for tool in tools %}{{ tool | tojson }}{% endfor %}</tools>\n"
    "Return each call within <tool_call></tool_call> XML tags.<|im_end|>\n{%- endif %}"
    "{%- for message in messages %}{%- if message.tool_calls %}{%- for tool_call in message.tool_calls %}"
    '<tool_call>\n{"name": "{{ tool_call.name }}", "arguments": {{ tool_call.arguments | tojson }}}\n</tool_call>'
    "{%- endfor %}{%- else %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endif %}{%- endfor %}"
)
QWEN3_CODER = (
    "{%- for message in messages %}{%- for tool_call in message.tool_calls or [] %}"
    "<tool_call>\n<function={{ tool_call.name }}>\n{%- for k, v in tool_call.arguments.items() %}"
    "<parameter={{ k }}>\n{{ v }}\n</parameter>\n{%- endfor %}</function>\n</tool_call>"
    "{%- endfor %}<|im_start|>{{ message.role }}\n{{ message.content }}<|im_end|>\n{%- endfor %}"
)
LLAMA31 = (
    "<|begin_of_text|>{%- if tools %}<|start_header_id|>user<|end_header_id|>\n\n"
    'Respond in the format {"name": function name, "parameters": dictionary of argument name and its value}.'
    "{%- endif %}{%- for message in messages %}{%- if message.tool_calls %}"
    '{%- if builtin_tools %}<|python_tag|>{%- endif %}{"name": "{{ message.tool_calls[0].function.name }}", '
    '"parameters": {{ message.tool_calls[0].function.arguments | tojson }}}<|eom_id|>'
    "{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>\n\n{{ message.content }}<|eot_id|>"
    "{%- endif %}{%- endfor %}"
)
MISTRAL = (
    "{%- for message in messages %}{%- if message.tool_calls %}"
    "{%- for tc in message.tool_calls %}[TOOL_CALLS]{{ tc.function.name }}[ARGS]{{ tc.function.arguments | tojson }}"
    "{%- endfor %}</s>{%- else %}[INST]{{ message.content }}[/INST]{%- endif %}{%- endfor %}"
)
GLM47 = (
    "{%- for message in messages %}{%- for tc in message.tool_calls or [] %}<tool_call>{{ tc.name }}"
    "{%- for k, v in tc.arguments.items() %}<arg_key>{{ k }}</arg_key><arg_value>{{ v }}</arg_value>{%- endfor %}"
    "</tool_call>{%- endfor %}<|{{ message.role }}|>{{ message.content }}{%- endfor %}"
)
LFM2 = (
    "<|startoftext|>{%- if tools %}<|im_start|>system\nList of tools: <|tool_list_start|>{{ tools | tojson }}<|tool_list_end|>"
    "<|im_end|>\n{%- endif %}{%- for message in messages %}<|im_start|>{{ message.role }}\n"
    "{%- for tc in message.tool_calls or [] %}<|tool_call_start|>[{{ tc.function.name }}(...)]<|tool_call_end|>{%- endfor %}"
    "{{ message.content }}<|im_end|>\n{%- endfor %}"
)
TEMPLATES = {
    "generic": None,
    "hermes": QWEN25,
    "qwen3_coder": QWEN3_CODER,
    "llama3": LLAMA31,
    "mistral": MISTRAL,
    "glm47": GLM47,
    "pythonic": LFM2,
}
# The GLM tokenizer also gets think tokens of its own, to show they are used.
EXTRA_TOKENS = {"glm47": ["<longcat_think>", "</longcat_think>"]}
FAMILIES = list(TEMPLATES)

@pytest.fixture(scope="module")
def tokenizers(tokenizer, tiny_model):
    """Real mlx-lm TokenizerWrappers of the tiny model, one per family's template."""
    loaded = {"generic": tokenizer}

    def get(family: str):
        if family not in loaded:
            loaded[family] = _variant(tokenizer, tiny_model, family)
        return loaded[family]

    return get


def _variant(tokenizer, path: Path, family: str):
    from mlx_lm import tokenizer_utils
    from mlx_lm.utils import load_tokenizer

    if family in EXTRA_TOKENS:
        return load_tokenizer(path, {"chat_template": TEMPLATES[family], "extra_special_tokens": EXTRA_TOKENS[family]})
    # mlx-lm's own load() runs, inference included, on the same HF tokenizer with
    # another template; only parsing tokenizer.json again (most of a load) is spared.
    base = tokenizer._tokenizer
    twin = copy.copy(base)
    twin.chat_template = TEMPLATES[family]
    # load() records its choice in init_kwargs, which a shallow copy would share.
    twin.init_kwargs = {k: v for k, v in base.init_kwargs.items() if k != "tool_parser_type"}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(tokenizer_utils.AutoTokenizer, "from_pretrained", lambda *args, **kwargs: twin)
        return load_tokenizer(path)


@pytest.fixture(scope="module")
def fmt(tokenizers):
    return lambda family: format_for(tokenizers(family))


# -- how each family writes calls --


def _value(v) -> str:
    return v if isinstance(v, str) else json.dumps(v)


def call_text(family: str, name: str, args: dict) -> str:
    if family in ("generic", "hermes"):
        return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"
    if family == "qwen3_coder":
        params = "".join(f"<parameter={k}>\n{_value(v)}\n</parameter>\n" for k, v in args.items())
        return f"<tool_call>\n<function={name}>\n{params}</function>\n</tool_call>"
    if family == "llama3":
        return json.dumps({"name": name, "parameters": args})
    if family == "mistral":
        return f"[TOOL_CALLS]{name}[ARGS]{json.dumps(args)}"
    if family == "pythonic":
        params = ", ".join(f"{k}={json.dumps(v)}" for k, v in args.items())
        return f"<|tool_call_start|>[{name}({params})]<|tool_call_end|>"
    if family == "glm47":
        params = "".join(f"<arg_key>{k}</arg_key>\n<arg_value>{_value(v)}</arg_value>\n" for k, v in args.items())
        return f"<tool_call>{name}\n{params}</tool_call>"
    raise AssertionError(family)


def calls_text(family: str, *calls: tuple[str, dict]) -> str:
    return ("; " if family == "llama3" else "\n").join(call_text(family, *c) for c in calls)


def after_text(family: str, name: str, args: dict) -> str:
    """A call that follows text: Llama needs its python tag there."""
    return ("<|python_tag|>" if family == "llama3" else "") + call_text(family, name, args)


def think_markers(family: str) -> tuple[str, str]:
    return ("<longcat_think>", "</longcat_think>") if family == "glm47" else ("<think>", "</think>")


# -- feeding --


def splits(text: str):
    """Cut at every character boundary at once, not at all, once at many places, and at random (empty pieces too)."""
    yield list(text)
    yield [text]
    for k in range(1, len(text), 4):
        yield [text[:k], text[k:]]
    rng = random.Random(20250101)
    for _ in range(8):
        pieces, i = [], 0
        while i < len(text):
            n = rng.randint(0, 7)
            pieces.append(text[i : i + n])
            i += n
        yield pieces


def merged(segments: list) -> list:
    out: list = []
    for s in segments:
        if out and type(s) in (Text, Thinking) and type(out[-1]) is type(s):
            out[-1] = type(s)(out[-1].text + s.text)
        else:
            out.append(s)
    return out


def run(fmt, pieces, tools=TOOLS, thinking=False) -> tuple[list, bool]:
    parser = Parser(fmt, tools, thinking=thinking)
    segments = [s for p in pieces for s in parser.feed(p)]
    in_call = parser.in_call
    return segments + parser.finish(), in_call


def check(fmt, text: str, expected: list, *, tools=TOOLS, thinking=False, in_call=False) -> None:
    markers = [m for m in (*fmt.call_start, fmt.call_end, fmt.think_start, fmt.think_end) if m]
    for pieces in splits(text):
        segments, was_in_call = run(fmt, pieces, tools, thinking)
        # What becomes a block (adjacent pieces of one kind) is never empty or blank.
        for s in merged(segments):
            if isinstance(s, (Text, Thinking)):
                assert s.text.strip(), f"empty or blank segment from {pieces!r}"
        for s in segments:
            if isinstance(s, Text):
                assert not any(m in s.text for m in markers), f"marker in {s!r} from {pieces!r}"
        assert merged(segments) == expected, f"pieces {pieces!r}"
        assert was_in_call == in_call, f"pieces {pieces!r}"


# -- every family --


@pytest.mark.parametrize("family", FAMILIES)
def test_one_call(fmt, family):
    check(fmt(family), calls_text(family, READ), [ToolCall(*READ)])


@pytest.mark.parametrize("family", FAMILIES)
def test_text_before_and_after_a_call(fmt, family):
    text = "I'll read the file first.\n\n" + after_text(family, *BASH) + "\n\nThat lists the folder."
    check(fmt(family), text, [Text("I'll read the file first."), ToolCall(*BASH), Text("That lists the folder.")])


@pytest.mark.parametrize("family", FAMILIES)
def test_several_calls_in_order_without_blank_text(fmt, family):
    text = "\n" + calls_text(family, READ, BASH, TODOS) + "\n\n"
    check(fmt(family), text, [ToolCall(*READ), ToolCall(*BASH), ToolCall(*TODOS)])


@pytest.mark.parametrize("family", FAMILIES)
def test_thinking_then_text_then_call(fmt, family):
    start, end = think_markers(family)
    text = f"{start}\nThe user wants the file.\nRead it.\n{end}\n\nLet me look.\n" + after_text(family, *READ)
    expected = [Thinking("The user wants the file.\nRead it."), Text("Let me look."), ToolCall(*READ)]
    check(fmt(family), text, expected)


@pytest.mark.parametrize("family", FAMILIES)
def test_thinking_opened_by_the_prompt(fmt, family):
    _, end = think_markers(family)
    text = f"Just answer.\n{end}\n\n" + calls_text(family, READ)
    check(fmt(family), text, [Thinking("Just answer."), ToolCall(*READ)], thinking=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_unknown_tool_is_a_bad_call_with_the_exact_text(fmt, family):
    raw = call_text(family, "Delete", {"path": "/"})
    [bad] = run(fmt(family), [raw])[0]
    assert isinstance(bad, BadCall) and bad.raw == raw and "unknown tool 'Delete'" in bad.reason
    check(fmt(family), "\n" + raw + "\n", [bad])


@pytest.mark.parametrize("family", FAMILIES)
def test_strings_become_schema_types_and_unknown_keys_go(fmt, family):
    args = {"file_path": "/a.py", "offset": "10", "limit": "20", "mode": "fast"}
    expected = ToolCall("Read", {"file_path": "/a.py", "offset": 10, "limit": 20})
    check(fmt(family), call_text(family, "Read", args), [expected])


@pytest.mark.parametrize("family", FAMILIES)
def test_arguments_invalid_after_repair_are_a_bad_call(fmt, family):
    raw = call_text(family, "Read", {"file_path": "/a.py", "limit": 0})
    [bad] = run(fmt(family), [raw])[0]
    assert isinstance(bad, BadCall) and bad.raw == raw and "limit" in bad.reason
    [missing] = run(fmt(family), [call_text(family, "Read", {"limit": 5})])[0]
    assert isinstance(missing, BadCall) and "file_path" in missing.reason
    after = after_text(family, "Read", {"file_path": "/a.py", "limit": 0})
    check(fmt(family), "Reading.\n" + after, [Text("Reading."), BadCall(after, bad.reason)])


@pytest.mark.parametrize("family", FAMILIES)
def test_a_call_cut_short_is_truncated(fmt, family):
    text = "Running it.\n" + after_text(family, *BASH)
    cut = text[: len(text) - 20]
    raw = cut[len("Running it.\n") :]
    check(fmt(family), cut, [Text("Running it."), BadCall(raw, "truncated")], in_call=True)


@pytest.mark.parametrize("family", FAMILIES)
def test_plain_text_passes_through(fmt, family):
    # The reply's leading and trailing whitespace stays, as generated, so that the
    # next turn renders it back token for token.
    text = "  Here is the plan:\n\n1. read <b>the</b> file;\n2. {fix} it.  \n"
    check(fmt(family), text, [Text(text)])


@pytest.mark.parametrize("family", FAMILIES)
def test_leading_whitespace_stays_only_before_the_replys_text(fmt, family):
    start, end = think_markers(family)
    check(fmt(family), "\nicense and more", [Text("\nicense and more")])
    check(fmt(family), " Sure.\n" + after_text(family, *READ), [Text(" Sure."), ToolCall(*READ)])
    # Before a marker or a call, and after one, whitespace is the template's.
    check(fmt(family), " \n" + calls_text(family, READ) + "\n Done.", [ToolCall(*READ), Text("Done.")])
    check(fmt(family), f"\n{start}\nPlan.{end}\n\n Done.", [Thinking("Plan."), Text("Done.")])
    check(fmt(family), f"\n Plan.{end}\n\n Done.", [Thinking("Plan."), Text("Done.")], thinking=True)
    check(fmt(family), " \n ", [])


@pytest.mark.parametrize("family", FAMILIES)
def test_schema_shapes_claude_code_sends(fmt, family):
    config = {"setting": "theme", "value": [1, "x"], "scope": "project", "labels": {"team": "core", "n": 2}}
    calls = [("ExitPlanMode", {}), ("WebFetch", {"url": "https://x.dev", "prompt": "Sum up"}), ("Config", config)]
    check(fmt(family), calls_text(family, *calls), [ToolCall(*c) for c in calls])
    [bad] = run(fmt(family), [call_text(family, "Config", {"setting": "x", "scope": "global"})])[0]
    assert isinstance(bad, BadCall) and "scope" in bad.reason


# -- Hermes / generic JSON --


@pytest.mark.parametrize(
    "body",
    [
        '{"name": "Bash", "arguments": {"command": "ls -la", "timeout": 30, "run_in_background": false,},}',
        "{'name': 'Bash', 'arguments': {'command': 'ls -la', 'timeout': 30, 'run_in_background': False}}",
        '{"name": "Bash", "arguments": {"command": "ls -la", "timeout": 30, "run_in_background": false}',
        '{"name": "Bash", "arguments": '
        '"{\\"command\\": \\"ls -la\\", \\"timeout\\": 30, \\"run_in_background\\": false}"}',
        '{"name": "Bash", "parameters": {"command": "ls -la", "timeout": "30", "run_in_background": "false"}}',
        '```json\n{"name": "Bash", "arguments": {command: "ls -la", timeout: 3e1, run_in_background: false}}\n```',
        '{"type": "function", "function": {"name": "Bash", "arguments": '
        '{"command": "ls -la", "timeout": 30.0, "run_in_background": false}}}}',
    ],
)
def test_malformed_json_is_repaired(body):
    check(GENERIC, f"<tool_call>\n{body}\n</tool_call>", [ToolCall(*BASH)])


def test_an_end_marker_inside_a_json_string_does_not_end_the_call():
    content = 'print("<tool_call>")\nprint("</tool_call>")\n'
    args = {"file_path": "/t.py", "content": content}
    check(GENERIC, call_text("generic", "Write", args) + "\nWritten.", [ToolCall("Write", args), Text("Written.")])


def test_a_forgotten_end_marker_is_ended_by_the_next_call():
    first = '<tool_call>\n{"name": "Read", "arguments": {"file_path": "/tmp/a.py"}}\n'
    check(GENERIC, first + call_text("generic", *BASH), [ToolCall(*READ), ToolCall(*BASH)])


def test_stray_thinking_markers_are_dropped():
    check(GENERIC, "<think>a <think>b</think> c </think>d", [Thinking("a b"), Text("c d")])


def test_wrong_value_types_are_converted_by_the_schema():
    args = {"file_path": "/p.json", "content": {"name": "demo", "private": True}}
    expected = ToolCall("Write", {"file_path": "/p.json", "content": '{\n  "name": "demo",\n  "private": true\n}'})
    check(GENERIC, call_text("generic", "Write", args), [expected])
    todos = {"todos": json.dumps(TODOS[1]["todos"])}
    check(GENERIC, call_text("generic", "TodoWrite", todos), [ToolCall(*TODOS)])
    args = {"file_path": "/a", "content": 7, "paths": "a.py"}
    fixed = {"file_path": "/a", "content": "7", "paths": ["a.py"]}
    check(GENERIC, call_text("generic", "Write", args), [ToolCall("Write", fixed)])
    big = {"file_path": "/a", "limit": "9007199254740991"}
    exact = ToolCall("Read", {"file_path": "/a", "limit": 9007199254740991})
    check(GENERIC, call_text("generic", "Read", big), [exact])
    [bad] = run(GENERIC, [call_text("generic", "Read", {"file_path": "/a", "limit": "9007199254740993"})])[0]
    assert isinstance(bad, BadCall) and "maximum" in bad.reason


def test_unparseable_body_is_a_bad_call():
    raw = "<tool_call>\nRead the file /a.py please\n</tool_call>"
    [bad] = run(GENERIC, [raw])[0]
    assert isinstance(bad, BadCall) and bad.raw == raw and bad.reason.startswith("unparseable")
    check(GENERIC, raw + "\nok", [bad, Text("ok")])


def test_without_tools_every_call_is_a_bad_call():
    raw = call_text("generic", *READ)
    check(GENERIC, raw, [BadCall(raw, "unknown tool 'Read'")], tools=None)


def test_pieces_from_the_real_detokenizer(tokenizers):
    tokenizer = tokenizers("generic")
    text = "<think>Plan.</think>Sure, über-quick.\n" + calls_text("generic", READ, BASH) + "\nDone ✓"
    detokenizer = tokenizer.detokenizer
    pieces = []
    for token in tokenizer.encode(text, add_special_tokens=False):
        detokenizer.add_token(token)
        pieces.append(detokenizer.last_segment)
    detokenizer.finalize()
    pieces.append(detokenizer.last_segment)
    assert "".join(pieces) == text
    expected = [Thinking("Plan."), Text("Sure, über-quick."), ToolCall(*READ), ToolCall(*BASH), Text("Done ✓")]
    assert merged(run(format_for(tokenizer), pieces)[0]) == expected


# -- Qwen3-Coder XML --


def test_qwen3_coder_values_are_typed_by_the_schema(fmt):
    code = "def f():\n    return {'a': 1}\n"
    text = (
        "<tool_call>\n<function=Bash>\n<parameter=command>\nls -la\n</parameter>\n"
        "<parameter=timeout>\n30\n</parameter>\n<parameter=run_in_background>\nfalse\n</parameter>\n"
        "</function>\n</tool_call>"
        + call_text("qwen3_coder", "Write", {"file_path": "/f.py", "content": code})
    )
    check(fmt("qwen3_coder"), text, [ToolCall(*BASH), ToolCall("Write", {"file_path": "/f.py", "content": code})])


def test_qwen3_coder_value_that_fits_no_type_is_a_bad_call(fmt):
    raw = call_text("qwen3_coder", "Read", {"file_path": "/a", "limit": "ten"})
    [bad] = run(fmt("qwen3_coder"), [raw])[0]
    assert isinstance(bad, BadCall) and bad.raw == raw and "limit" in bad.reason


# -- Llama 3.x --


def test_llama_python_tag_and_semicolons(fmt):
    text = "<|python_tag|>" + calls_text("llama3", READ, BASH)
    check(fmt("llama3"), text, [ToolCall(*READ), ToolCall(*BASH)])


def test_llama_json_reply_without_tools_is_text(fmt):
    text = '{"answer": 42}'
    check(fmt("llama3"), text, [Text(text)], tools=None)


def test_llama_json_mid_text_is_text(fmt):
    text = 'The call looks like {"name": "Read", "parameters": {}} in Llama.'
    check(fmt("llama3"), text, [Text(text)])


# -- Mistral --


def test_mistral_json_list(fmt):
    calls = [{"name": n, "arguments": a} for n, a in (READ, BASH)]
    text = "Checking.[TOOL_CALLS] " + json.dumps(calls)
    check(fmt("mistral"), text, [Text("Checking."), ToolCall(*READ), ToolCall(*BASH)])


def test_mistral_call_ids_and_truncation(fmt):
    text = '[TOOL_CALLS]Read[CALL_ID]a1B2c3D4e[ARGS]{"file_path": "/tmp/a.py"}[TOOL_CALLS]Bash[ARGS]{"command": "ls'
    truncated = BadCall('[TOOL_CALLS]Bash[ARGS]{"command": "ls', "truncated")
    check(fmt("mistral"), text, [ToolCall(*READ), truncated], in_call=True)


def test_mistral_list_with_one_bad_call(fmt):
    body = json.dumps([{"name": "Read", "arguments": READ[1]}, {"name": "Nope", "arguments": {}}])
    segments, _ = run(fmt("mistral"), ["[TOOL_CALLS]" + body])
    assert segments == [ToolCall(*READ), BadCall("[TOOL_CALLS]" + body, "unknown tool 'Nope'")]


# -- detection --


def test_format_for_follows_mlx_lm(tokenizers):
    chosen = {family: format_for(tokenizers(family)) for family in FAMILIES}
    assert chosen["generic"] == GENERIC
    assert chosen["hermes"].name == "hermes" and chosen["hermes"].call_start == ("<tool_call>",)
    assert chosen["qwen3_coder"].name == "qwen3_coder" and not chosen["qwen3_coder"].json_body and chosen["qwen3_coder"].call_end == "</tool_call>"
    assert chosen["llama3"].name == "llama3" and chosen["llama3"].bare_json
    assert chosen["mistral"].name == "mistral" and chosen["mistral"].call_start == ("[TOOL_CALLS]",)
    assert (chosen["glm47"].name, chosen["glm47"].family) == ("glm47", "glm")
    pythonic = chosen["pythonic"]
    assert pythonic.call_start == ("<|tool_call_start|>",) and pythonic.call_end == "<|tool_call_end|>"
    assert (chosen["glm47"].think_start, chosen["glm47"].think_end) == ("<longcat_think>", "</longcat_think>")
    assert all((f.think_start, f.think_end) == ("<think>", "</think>") for n, f in chosen.items() if n != "glm47")


@pytest.mark.parametrize("family", ["generic", "llama3", "mistral"])
def test_a_streamed_call_sends_its_name_then_its_arguments_as_written(fmt, family):
    from anyclaude.toolcalls import CallDelta, CallStart

    args = {"file_path": "/tmp/{a}.txt", "offset": 3}
    text = ("<|python_tag|>" if family == "llama3" else "") + call_text(family, "Read", args) + "\nDone."
    parser = Parser(fmt(family), TOOLS, stream_calls=True)
    out = [s for c in text for s in parser.feed(c)] + parser.finish()
    call = out.index(ToolCall("Read", args))
    assert out[0] == CallStart("Read") and all(isinstance(s, CallDelta) for s in out[1:call])
    assert "".join(s.text for s in out[call + 1 :]) == "Done."
    deltas = [s.json for s in out[1:call]]
    assert len(deltas) > 5 and json.loads("".join(deltas)) == args
