"""Forced tool calls (anyclaude.constrain): the grammar, its JSON layout, and real generation
with the tiny model, which on its own would never call a tool for this prompt."""

from __future__ import annotations

import copy

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from claude_code import READ_SCHEMA
from claude_code import tools as claude_code_tools
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from test_roundtrip import LLAMA3, MISTRAL, MISTRAL_V3, QWEN3_CODER, family_tokenizer

from anyclaude import constrain, toolcalls
from anyclaude.families import all_families, detect, hermes, qwen3_coder
from anyclaude.families.base import Format

HERMES = hermes.CALLS


def function(name: str, parameters: dict, description: str = "") -> dict:
    return {"type": "function", "function": {"name": name, "description": description, "parameters": parameters}}


BASH = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {"command": {"type": "string"}, "timeout": {"type": "number"}},
    "required": ["command"],
    "additionalProperties": False,
}
WEB_FETCH = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "type": "object",
    "properties": {"url": {"type": "string", "format": "uri"}, "prompt": {"type": "string", "minLength": 1}},
    "required": ["url", "prompt"],
    "additionalProperties": False,
}
TOOLS = [
    function("Read", READ_SCHEMA, "Reads a file from the local filesystem."),
    function("Bash", BASH, "Runs a shell command."),
    function("WebFetch", WEB_FETCH, "Fetches a web page."),
]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}


@pytest.fixture(scope="module")
def tiny(tiny_net):
    return tiny_net


# --- the grammar, driven token by token without the model ----------------------------


def fed(processor, tokenizer, text: str) -> bool:
    """Feed `text`'s tokens through `processor` as generate_step would (a prompt first,
    then one token per call); True if every token was allowed and only EOS may follow."""
    width = len(tokenizer.vocab)
    logits = mx.zeros((1, width))
    seen = [1, 2, 3]  # a short prompt: the processor must not read it as output
    for token in tokenizer.encode(text, add_special_tokens=False):
        if processor(mx.array(seen), logits)[0, token].item() == float("-inf"):
            return False
        seen.append(token)
    final = np.array(processor(mx.array(seen), logits)[0])
    return set(np.flatnonzero(final != -np.inf).tolist()) == set(tokenizer.eos_token_ids)


def call(name: str, arguments: dict) -> str:
    return HERMES.render(name, arguments)


@pytest.mark.parametrize(
    "text",
    [
        call("Read", {"file_path": "/tmp/a.txt"}),
        call("Read", {"file_path": "/tmp/é ü.txt", "offset": 3, "limit": 9007199254740991}),
        call("Read", {"file_path": 'a "quoted"\\ name\twith\nbreaks'}),
    ],
)
def test_canonical_calls_are_accepted_and_round_trip(tiny, text):
    _, tokenizer = tiny
    assert fed(constrain.forced_call(tokenizer, TOOLS, "Read"), tokenizer, text)
    assert HERMES.render(*HERMES.parse(text)) == text


@pytest.mark.parametrize(
    "text",
    [
        '<tool_call>\n{"name": "Read", "arguments": {"file_path":"/a"}}\n</tool_call>',  # compact JSON
        '<tool_call>\n{"name": "Read", "arguments": {"file_path": "/a" }}\n</tool_call>',  # extra space
        '<tool_call>\n{"name": "Read",\n"arguments": {"file_path": "/a"}}\n</tool_call>',  # newline
        '<tool_call>\n{"name": "Read", "arguments": {"file_path": "\\u0041"}}\n</tool_call>',  # \\u escape
        '<tool_call>\n{"name": "Read", "arguments": {"file_path": "a\\/b"}}\n</tool_call>',  # \\/ escape
        'Sure! <tool_call>\n{"name": "Read", "arguments": {"file_path": "/a"}}\n</tool_call>',  # text first
        call("Bash", {"command": "ls"}),  # another tool
        call("Read", {"file_path": "/a", "offset": 0}),  # exclusiveMinimum
        call("Read", {"file_path": "/a", "mode": "r"}),  # additionalProperties: false
        call("Read", {"offset": 1}),  # required
        call("Read", {"file_path": "/a"}) + "\n",  # anything after the call
    ],
)
def test_other_texts_are_refused(tiny, text):
    _, tokenizer = tiny
    assert not fed(constrain.forced_call(tokenizer, TOOLS, "Read"), tokenizer, text)


def test_any_allows_each_tool_and_only_those(tiny):
    _, tokenizer = tiny
    for text in (
        call("Read", {"file_path": "/a"}),
        call("Bash", {"command": "ls -la", "timeout": 1.5}),
        call("WebFetch", {"url": "https://example.com/", "prompt": "summarise"}),
    ):
        assert fed(constrain.forced_call(tokenizer, TOOLS, None), tokenizer, text)
    assert not fed(constrain.forced_call(tokenizer, TOOLS, None), tokenizer, call("Write", {"file_path": "/a"}))
    assert not fed(constrain.forced_call(tokenizer, TOOLS, None), tokenizer, call("WebFetch", {"url": "x y", "prompt": "p"}))


# Each schema feature Claude Code's tools use: (schema, instances it allows, instances it refuses).
FEATURES = {
    "$schema": ({"$schema": "https://json-schema.org/draft/2020-12/schema", "type": "object", "properties": {"a": {"type": "string"}}}, [{"a": "x"}], [{"a": 1}]),
    "additionalProperties false": ({"type": "object", "properties": {"a": {"type": "string"}}, "additionalProperties": False}, [{"a": "x"}], [{"a": "x", "b": 1}]),
    "additionalProperties {}": ({"type": "object", "properties": {"m": {"type": "object", "additionalProperties": {}}}, "required": ["m"]}, [{"m": {"k": [1, {"x": None}], "s": "t"}}], [{"m": 3}]),
    "propertyNames": ({"type": "object", "properties": {"m": {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}}}, "required": ["m"]}, [{"m": {"k": 1}}], [{"m": []}]),
    "exclusiveMinimum": ({"type": "object", "properties": {"n": {"type": "integer", "exclusiveMinimum": 0}}, "required": ["n"]}, [{"n": 1}], [{"n": 0}, {"n": -4}]),
    "maximum 2^53-1": ({"type": "object", "properties": {"n": {"type": "integer", "maximum": 9007199254740991}}, "required": ["n"]}, [{"n": 9007199254740991}], [{"n": 9007199254740992}]),
    "anyOf + const": ({"type": "object", "properties": {"s": {"anyOf": [{"const": "pending"}, {"const": "done"}]}}, "required": ["s"]}, [{"s": "done"}], [{"s": "other"}]),
    "format uri": ({"type": "object", "properties": {"u": {"type": "string", "format": "uri"}}, "required": ["u"]}, [{"u": "https://example.com/a?b=1"}], [{"u": "not a uri"}]),
    "pattern": ({"type": "object", "properties": {"p": {"type": "string", "pattern": "^[a-z-]+$"}}, "required": ["p"]}, [{"p": "ab-c"}], [{"p": "AB"}]),
    "minLength": ({"type": "object", "properties": {"p": {"type": "string", "minLength": 1}}, "required": ["p"]}, [{"p": "a"}], [{"p": ""}]),
    "maxLength 524288": ({"type": "object", "properties": {"c": {"type": "string", "maxLength": 524288}}, "required": ["c"]}, [{"c": "hello world"}], [{"c": 1}]),
    "maxItems": ({"type": "object", "properties": {"l": {"type": "array", "items": {"type": "string"}, "maxItems": 2}}, "required": ["l"]}, [{"l": ["a", "b"]}, {"l": []}], [{"l": ["a", "b", "c"]}]),
    "default": ({"type": "object", "properties": {"b": {"type": "boolean", "default": True}}}, [{"b": False}, {}], [{"b": "yes"}]),
    "enum": ({"type": "object", "properties": {"e": {"type": "string", "enum": ["x", "y"]}}, "required": ["e"]}, [{"e": "y"}], [{"e": "z"}]),
    "no type": ({"type": "object", "properties": {"a": {"description": "Anything"}}, "required": ["a"]}, [{"a": [1, "x", {"k": None}]}, {"a": "s"}], [{}]),
    "properties {} no required": ({"type": "object", "properties": {}}, [{}, {"x": 1}], []),
    "properties {} closed": ({"type": "object", "properties": {}, "additionalProperties": False}, [{}], [{"x": 1}]),
}


@pytest.mark.parametrize("feature", list(FEATURES))
def test_schema_features_compile_and_hold(tiny, feature):
    _, tokenizer = tiny
    schema, good, bad = FEATURES[feature]
    tools = [function("T", schema)]
    for arguments in good:
        jsonschema.Draft202012Validator(schema).validate(arguments)  # the table itself is right
        assert fed(constrain.forced_call(tokenizer, tools, "T"), tokenizer, call("T", arguments)), arguments
    for arguments in bad:
        assert not fed(constrain.forced_call(tokenizer, tools, "T"), tokenizer, call("T", arguments)), arguments


def test_claude_code_tools_compile_once(tiny):
    _, tokenizer = tiny
    tools = [function(t["name"], t["input_schema"], t["description"]) for t in claude_code_tools()]
    constrain.forced_call(tokenizer, tools, None)
    for t in tools:
        constrain.forced_call(tokenizer, tools, t["function"]["name"])
    grammars = constrain._states[tokenizer].grammars
    before = len(grammars)
    # Same names and schemas, other descriptions: the cached grammars serve.
    reworded = [function(t["name"], t["input_schema"], "reworded") for t in claude_code_tools()]
    constrain.forced_call(tokenizer, reworded, None)
    constrain.forced_call(tokenizer, reworded, "Read")
    assert len(grammars) == before


def test_unsupported_keyword_is_ignored_not_fatal(tiny):
    _, tokenizer = tiny
    schema = {"type": "object", "properties": {"m": {"type": "object", "propertyNames": {"pattern": "^[a-z]+$"}}}}
    assert fed(constrain.forced_call(tokenizer, [function("T", schema)], "T"), tokenizer, call("T", {"m": {"ab": 1}}))


def test_unknown_tool_is_an_error(tiny):
    _, tokenizer = tiny
    with pytest.raises(constrain.ConstraintError):
        constrain.forced_call(tokenizer, TOOLS, "Write")
    with pytest.raises(constrain.ConstraintError):
        constrain.forced_call(tokenizer, [], None)


# --- real generation with the tiny model ---------------------------------------------

PROMPT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Write a haiku about autumn leaves."},
]
# The grammar guarantees what is written, not that the model stops writing: a 135M model
# can loop inside a free string (it does, greedily, on a task-id string). These tools and
# this prompt finish in about 40 tokens on this model.
MAX_TOKENS = 80


def _prefill(model, tokenizer, messages):
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    cache = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache, prompt[-1]


@pytest.fixture(scope="module")
def prefilled(tiny):
    """The prompt's KV cache, computed once; each generation continues a copy of it, so
    the processor's first call sees only the last prompt token (as with a cache hit)."""
    model, tokenizer = tiny
    return _prefill(model, tokenizer, PROMPT)


def generate(tiny, prefilled, processor, temperature: float) -> tuple[str, bool]:
    model, tokenizer = tiny
    cache, last = prefilled
    mx.random.seed(7)
    steps = generate_step(
        mx.array([last]),
        model,
        max_tokens=MAX_TOKENS,
        sampler=make_sampler(temp=temperature),
        logits_processors=[processor],
        prompt_cache=copy.deepcopy(cache),
    )
    out = []
    for token, _ in steps:
        if token in tokenizer.eos_token_ids:
            return tokenizer.decode(out), True
        out.append(token)
    return tokenizer.decode(out), False


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_forced_read_from_an_unrelated_prompt(tiny, prefilled, temperature):
    _, tokenizer = tiny
    processor = constrain.forced_call(tokenizer, TOOLS, "Read")
    text, ended = generate(tiny, prefilled, processor, temperature)
    assert ended and processor.done, text
    name, arguments = HERMES.parse(text)
    assert name == "Read"
    jsonschema.Draft202012Validator(READ_SCHEMA).validate(arguments)
    assert HERMES.render(name, arguments) == text  # the prefix cache sees the same text


def test_forced_any_calls_one_of_the_tools(tiny, prefilled):
    _, tokenizer = tiny
    text, ended = generate(tiny, prefilled, constrain.forced_call(tokenizer, TOOLS, None), 0.0)
    assert ended, text
    name, arguments = HERMES.parse(text)
    assert name in SCHEMAS
    jsonschema.Draft202012Validator(SCHEMAS[name]).validate(arguments)
    assert HERMES.render(name, arguments) == text


# --- Qwen3-Coder's XML calls -----------------------------------------------------------

XML = qwen3_coder.CALLS
OPEN_READ = "<tool_call>\n<function=Read>\n"
CLOSE_CALL = "</function>\n</tool_call>"


def xml(name: str, arguments: dict) -> str:
    return XML.render(name, arguments)


@pytest.fixture(scope="module")
def qwen3_coder(tiny_model):
    """The tiny model's tokenizer with the Qwen3-Coder template, as test_roundtrip makes it."""
    tokenizer = family_tokenizer(tiny_model, "qwen3_coder", QWEN3_CODER)
    assert detect(tokenizer).name == "qwen3_coder"
    return tokenizer


def parsed(tokenizer, text: str) -> list:
    """`text` through the daemon's own parser for the tokenizer's format."""
    parser = toolcalls.Parser(detect(tokenizer), TOOLS)
    return parser.feed(text) + parser.finish()


def test_every_family_but_mlx_lm_s_other_parsers_can_force_a_call():
    assert {f.name for f in all_families() if f.call_format(Format(name=""), "") is None} == {"mlx"}


@pytest.mark.parametrize(
    "name,arguments",
    [
        ("Read", {"file_path": "/tmp/a.txt"}),
        ("Read", {"file_path": "/tmp/é ü.txt", "offset": 3, "limit": 9007199254740991}),
        ("Read", {"file_path": "/tmp/a.txt", "limit": 20}),  # an optional one skipped
        ("Read", {"file_path": 'a "quoted"\\ name\twith\nbreaks</parameter'}),  # raw, not JSON
        ("Read", {"file_path": "\n\nnull\n"}),
        ("Read", {"file_path": ""}),
        ("Bash", {"command": "ls -la", "timeout": 1.5}),
        ("WebFetch", {"url": "https://example.com/", "prompt": "summarise"}),
    ],
)
def test_xml_canonical_calls_are_accepted_and_round_trip(qwen3_coder, name, arguments):
    text = xml(name, arguments)
    assert fed(constrain.forced_call(qwen3_coder, TOOLS, None, detect(qwen3_coder)), qwen3_coder, text)
    assert parsed(qwen3_coder, text) == [toolcalls.ToolCall(name, arguments)]
    assert XML.parse(text, TOOLS) == (name, arguments)
    assert XML.render(name, arguments) == text


@pytest.mark.parametrize(
    "text",
    [
        call("Read", {"file_path": "/a"}),  # Hermes JSON
        OPEN_READ + "<parameter=file_path>\n/a\n</parameter>\n</function>\n</tool_call>\n",  # text after
        OPEN_READ + "<parameter=file_path>/a</parameter>\n" + CLOSE_CALL,  # no newlines
        OPEN_READ + "<parameter=file_path>\n/a\n</parameter>" + CLOSE_CALL,  # none after either
        OPEN_READ + "<parameter=file_path>\na</parameter>b\n</parameter>\n" + CLOSE_CALL,  # its end inside
        OPEN_READ + "<parameter=file_path>\nNULL\n</parameter>\n" + CLOSE_CALL,  # read as None
        OPEN_READ + "<parameter=file_path>\n/a\n</parameter>\n<parameter=offset>\n 3\n</parameter>\n" + CLOSE_CALL,
        OPEN_READ + "<parameter=file_path>\n/a\n</parameter>\n<parameter=offset>\n0\n</parameter>\n" + CLOSE_CALL,
        OPEN_READ + "<parameter=file_path>\n/a\n</parameter>\n<parameter=offset>\n\"3\"\n</parameter>\n" + CLOSE_CALL,
        OPEN_READ + "<parameter=limit>\n3\n</parameter>\n<parameter=file_path>\n/a\n</parameter>\n" + CLOSE_CALL,  # order
        OPEN_READ + "<parameter=file_path>\n/a\n</parameter>\n<parameter=mode>\nr\n</parameter>\n" + CLOSE_CALL,
        OPEN_READ + "<parameter=offset>\n3\n</parameter>\n" + CLOSE_CALL,  # required
        OPEN_READ + "<parameter=file_path>\n/a\n</parameter>\n<parameter=file_path>\n/b\n</parameter>\n" + CLOSE_CALL,
        xml("Bash", {"command": "ls"}),  # another tool
        "Sure! " + xml("Read", {"file_path": "/a"}),
    ],
)
def test_xml_other_texts_are_refused(qwen3_coder, text):
    assert not fed(constrain.forced_call(qwen3_coder, TOOLS, "Read", detect(qwen3_coder)), qwen3_coder, text)


def test_xml_literal_strings_and_json_values(qwen3_coder):
    schema = {
        "type": "object",
        "properties": {
            "s": {"anyOf": [{"const": "pending"}, {"const": "done"}]},
            "e": {"type": "string", "enum": ["x", "y"]},
            "l": {"type": "array", "items": {"type": "string"}, "maxItems": 2},
            "b": {"type": "boolean"},
            "p": {"type": "string", "minLength": 1},
        },
        "required": ["s", "e", "l", "b", "p"],
    }
    tools = [function("T", schema)]
    good = {"s": "done", "e": "y", "l": ["a", "b"], "b": False, "p": "x"}
    forced = lambda: constrain.forced_call(qwen3_coder, tools, "T", detect(qwen3_coder))  # noqa: E731
    assert fed(forced(), qwen3_coder, xml("T", good))
    parser = toolcalls.Parser(detect(qwen3_coder), tools)
    assert parser.feed(xml("T", good)) + parser.finish() == [toolcalls.ToolCall("T", good)]
    for bad in ({"s": "other"}, {"e": "z"}, {"l": ["a", "b", "c"]}, {"l": "a"}, {"b": "yes"}, {"p": ""}):
        assert not fed(forced(), qwen3_coder, xml("T", good | bad)), bad


# A raw string value ends only at "\n</parameter>", which a 135M model does not write on
# its own after a free-text prompt: one earlier call in the history shows it the layout.
XML_PROMPT = [
    {"role": "user", "content": "Show me /etc/hosts."},
    {"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": {"name": "Read", "arguments": {"file_path": "/etc/hosts"}}}]},
    {"role": "tool", "content": "localhost"},
    {"role": "user", "content": "Now show me /tmp/notes.txt."},
]


@pytest.fixture(scope="module")
def xml_prefilled(tiny, qwen3_coder):
    """XML_PROMPT's KV cache under the Qwen3-Coder template (see `prefilled`)."""
    return _prefill(tiny[0], qwen3_coder, XML_PROMPT)


def test_xml_forced_read_from_a_prompt(tiny, qwen3_coder, xml_prefilled):
    model, _ = tiny
    processor = constrain.forced_call(qwen3_coder, TOOLS, "Read", detect(qwen3_coder))
    text, ended = generate((model, qwen3_coder), xml_prefilled, processor, 0.0)
    assert ended and processor.done, text
    assert parsed(qwen3_coder, text) == [toolcalls.ToolCall("Read", {"file_path": "/tmp/notes.txt"})]
    (call,) = parsed(qwen3_coder, text)
    jsonschema.Draft202012Validator(READ_SCHEMA).validate(call.arguments)
    assert XML.render(call.name, call.arguments) == text  # the prefix cache sees the same text


# --- Llama 3 and Mistral: JSON after the family's own markers ---------------------------

TEMPLATES = {"llama3": LLAMA3, "mistral": MISTRAL, "mistral_list": MISTRAL_V3}


@pytest.fixture(scope="module")
def families(tiny_model):
    """family -> the tiny model's tokenizer with that family's template and markers."""
    return {family: family_tokenizer(tiny_model, family, template) for family, template in TEMPLATES.items()}


def forced(tokenizer, name: str | None, tools: list[dict] = TOOLS):
    return constrain.forced_call(tokenizer, tools, name, detect(tokenizer))


def rendered(tokenizer, name: str, arguments: dict) -> str:
    return constrain.format_for(tokenizer, detect(tokenizer)).render(name, arguments)


def test_the_variant_is_the_one_the_template_renders_back(families):
    assert {f: detect(t).name for f, t in families.items()} == {"llama3": "llama3", "mistral": "mistral", "mistral_list": "mistral"}
    assert {f: constrain.format_for(t, detect(t)).name for f, t in families.items()} == {
        "llama3": "llama3",
        "mistral": "mistral",
        "mistral_list": "mistral_list",
    }
    assert rendered(families["llama3"], "Read", {"file_path": "/a"}) == '{"name": "Read", "parameters": {"file_path": "/a"}}'
    assert rendered(families["mistral"], "Read", {"file_path": "/a"}) == '[TOOL_CALLS]Read[ARGS]{"file_path": "/a"}'
    assert rendered(families["mistral_list"], "Read", {"file_path": "/a"}) == '[TOOL_CALLS] [{"name": "Read", "arguments": {"file_path": "/a"}}]'


@pytest.mark.parametrize("family", list(TEMPLATES))
@pytest.mark.parametrize(
    "name,arguments",
    [
        ("Read", {"file_path": "/tmp/é ü.txt", "offset": 3, "limit": 20}),
        ("Read", {"file_path": 'a "quoted"\\ name\twith\nbreaks'}),
        ("Bash", {"command": "ls -la", "timeout": 1.5}),
        ("WebFetch", {"url": "https://example.com/", "prompt": "summarise"}),
    ],
)
def test_json_family_calls_are_accepted_and_parsed_back(families, family, name, arguments):
    tokenizer = families[family]
    text = rendered(tokenizer, name, arguments)
    assert fed(forced(tokenizer, None), tokenizer, text)
    assert parsed(tokenizer, text) == [toolcalls.ToolCall(name, arguments)]
    assert constrain.format_for(tokenizer, detect(tokenizer)).parse(text) == (name, arguments)


@pytest.mark.parametrize("family", ["mistral", "mistral_list"])
def test_mistral_markers_are_the_special_tokens(families, family):
    tokenizer = families[family]
    processor = forced(tokenizer, "Read")
    width = len(tokenizer.vocab)
    first = np.array(processor(mx.array([1, 2, 3]), mx.zeros((1, width)))[0])
    assert np.flatnonzero(first != -np.inf).tolist() == [tokenizer.convert_tokens_to_ids("[TOOL_CALLS]")]
    if family == "mistral":
        text = rendered(tokenizer, "Read", {"file_path": "/a"})
        ids = tokenizer.encode(text, add_special_tokens=False)
        assert tokenizer.convert_tokens_to_ids("[ARGS]") in ids


REFUSED = {
    "llama3": [
        '{"name": "Read", "arguments": {"file_path": "/a"}}',  # the Hermes key
        '<|python_tag|>{"name": "Read", "parameters": {"file_path": "/a"}}',  # built-in tools only
        '{"name": "Read", "parameters": {"file_path":"/a"}}',  # compact JSON
        'Sure! {"name": "Read", "parameters": {"file_path": "/a"}}',  # text first
        '{"name": "Read", "parameters": {"file_path": "/a"}}\n',  # anything after
        '{"name": "Read", "parameters": {"offset": 3}}',  # required
        '{"name": "Bash", "parameters": {"command": "ls"}}',  # another tool
    ],
    "mistral": [
        '[TOOL_CALLS] [{"name": "Read", "arguments": {"file_path": "/a"}}]',  # the v3 list
        '[TOOL_CALLS] Read[ARGS]{"file_path": "/a"}',  # a space
        '[TOOL_CALLS]Read[ARGS]{"file_path":"/a"}',  # compact JSON
        '[TOOL_CALLS]Read[ARGS]{"file_path": "/a", "mode": "r"}',  # additionalProperties: false
        '[TOOL_CALLS]Bash[ARGS]{"command": "ls"}',  # another tool
        'Sure! [TOOL_CALLS]Read[ARGS]{"file_path": "/a"}',  # text first
    ],
    "mistral_list": [
        '[TOOL_CALLS]Read[ARGS]{"file_path": "/a"}',  # the newer header
        '[TOOL_CALLS][{"name": "Read", "arguments": {"file_path": "/a"}}]',  # no space
        '[TOOL_CALLS] [{"name": "Read", "arguments": {"file_path": "/a"}, "id": "abcdefghi"}]',  # an id
        '[TOOL_CALLS] [{"name": "Read", "arguments": {"file_path": "/a"}}, {"name": "Read", "arguments": {"file_path": "/b"}}]',
        '[TOOL_CALLS] [{"name": "Read", "arguments": {"offset": 0}}]',  # required, exclusiveMinimum
    ],
}


@pytest.mark.parametrize(("family", "text"), [(f, t) for f, texts in REFUSED.items() for t in texts])
def test_json_family_other_texts_are_refused(families, family, text):
    assert not fed(forced(families[family], "Read"), families[family], text)


# As XML_PROMPT, with the 9-character ids Mistral's v3 template insists on.
CALL_PROMPT = [
    XML_PROMPT[0],
    XML_PROMPT[1] | {"tool_calls": [XML_PROMPT[1]["tool_calls"][0] | {"id": "a1b2c3d4e"}]},
    XML_PROMPT[2] | {"tool_call_id": "a1b2c3d4e"},
    XML_PROMPT[3],
]


@pytest.fixture(scope="module")
def spelled_out(tiny_model):
    """Like `families` but with the markers as plain text: the tiny model has no
    embedding rows for added special tokens, so it can only generate them spelled out."""
    return {family: family_tokenizer(tiny_model, f"{family}, spelled out", template) for family, template in TEMPLATES.items()}


@pytest.mark.parametrize("family", list(TEMPLATES))
def test_json_family_forced_read_from_a_prompt(tiny, spelled_out, family):
    model, _ = tiny
    tokenizer = spelled_out[family]
    processor = forced(tokenizer, "Read")
    text, ended = generate((model, tokenizer), _prefill(model, tokenizer, CALL_PROMPT), processor, 0.0)
    assert ended and processor.done, text
    (call,) = parsed(tokenizer, text)
    assert call.name == "Read"
    jsonschema.Draft202012Validator(READ_SCHEMA).validate(call.arguments)
    assert rendered(tokenizer, call.name, call.arguments) == text  # the prefix cache sees the same text


def test_a_schema_with_defs_is_forced_through_its_refs(tiny):
    """Pydantic-made schemas (MCP tools) put their types in `$defs` and point at them."""
    import json

    from anyclaude import prompt
    from anyclaude.api import wire

    _, tokenizer = tiny
    schema = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$defs": {"Mode": {"type": "string", "enum": ["r", "w"]}},
        "type": "object",
        "properties": {"mode": {"$ref": "#/$defs/Mode"}},
        "required": ["mode"],
    }
    body = {"model": "m", "max_tokens": 8, "tools": [{"name": "Open", "input_schema": schema}], "messages": [{"role": "user", "content": "hi"}]}
    rendered = prompt.render(wire.decode_request(json.dumps(body).encode()), tokenizer)
    assert "$defs" in rendered.tools[0]["function"]["parameters"]
    assert "$schema" not in rendered.tools[0]["function"]["parameters"]
    assert fed(constrain.forced_call(tokenizer, rendered.tools, "Open"), tokenizer, call("Open", {"mode": "w"}))
    assert not fed(constrain.forced_call(tokenizer, rendered.tools, "Open"), tokenizer, call("Open", {"mode": "x"}))
