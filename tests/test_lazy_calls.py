"""Calls the model makes by itself: held to the grammar from the marker that opens one
(`constrain.lazy_calls`), and streamed as they are written, XML calls converted to JSON
as they come (`toolcalls.Parser`, `families.partial`)."""

from __future__ import annotations

import json
import random

import jsonschema
import mlx.core as mx
import numpy as np
import pytest
from claude_code import READ_SCHEMA
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import make_prompt_cache
from mlx_lm.sample_utils import make_sampler
from test_constrain import CALL_PROMPT, TOOLS, function
from test_templates import GLM, HARMONY, LLAMA3, MISTRAL, QWEN_THINK, family_tokenizer

from anyclaude import constrain, repair, toolcalls
from anyclaude.families import detect

WRITE = function(
    "Write",
    {
        "type": "object",
        "properties": {"file_path": {"type": "string"}, "content": {"type": "string"}, "mode": {"type": "integer"}, "tags": {"type": "array", "items": {"type": "string"}}},
        "required": ["file_path", "content"],
    },
)
CALLING = [*TOOLS, WRITE]
ARGUMENTS = {"file_path": "/tmp/é x.txt", "content": "line one\n  </param \"two\"\nnull\n", "mode": 420, "tags": ["a", "b"]}
# family -> (template, its markers as special tokens)
TEMPLATES = {
    "qwen3.5": ("Qwen3.5-4B.jinja", QWEN_THINK),
    "glm-4.6": ("GLM-4.6.jinja", GLM),
    "glm-4.7": ("GLM-4.7-Flash.jinja", GLM),
    "devstral": ("unsloth-mistral-Devstral-Small-2507.jinja", MISTRAL),
    "gpt-oss": ("openai-gpt-oss-120b.jinja", HARMONY),
}


@pytest.fixture(scope="module")
def tokenizers(tiny_model, tokenizer):
    """family -> the tiny model's tokenizer with that family's real template; "generic" is
    the tiny model's own (its `<tool_call>` is spelled out, several tokens)."""
    made = {name: family_tokenizer(tiny_model, template, special) for name, (template, special) in TEMPLATES.items()}
    return made | {"generic": tokenizer}


def call_text(tokenizer, name: str, arguments: dict) -> str:
    return constrain.format_for(tokenizer, detect(tokenizer)).render(name, arguments)


def ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def walk(processor, tokenizer, tokens: list[int]) -> list[tuple[bool, bool]]:
    """Feed `tokens` through `processor` as generate_step does (a prompt first, then one
    token a call): for each token, whether it was allowed and whether any was masked,
    up to the first one refused (a sampler could not have chosen it)."""
    logits = mx.zeros((1, len(tokenizer.vocab)))
    seen, out = [1, 2, 3], []
    for token in tokens:
        row = np.array(processor(mx.array(seen), logits)[0])
        out.append((bool(row[token] != -np.inf), bool((row == -np.inf).any())))
        if not out[-1][0]:
            break
        seen.append(token)
    return out


def lazy(tokenizer, tools=CALLING):
    processor = constrain.lazy_calls(tokenizer, tools, detect(tokenizer))
    assert processor is not None
    return processor


@pytest.mark.parametrize("family", ["generic", *TEMPLATES])
def test_a_call_is_held_from_its_marker_to_its_end_and_no_further(tokenizers, family):
    tokenizer = tokenizers[family]
    calls = constrain.format_for(tokenizer, detect(tokenizer))
    before, after = ids(tokenizer, "I will write it now."), ids(tokenizer, "\nDone, as asked.\n")
    # GLM strips a string value: the grammar writes none that it would change.
    arguments = ARGUMENTS | ({"content": ARGUMENTS["content"].strip()} if "glm" in family else {})
    call = ids(tokenizer, calls.render("Write", arguments))
    opened = next(k for k in range(1, len(call) + 1) if calls.trigger in tokenizer.decode(call[:k]))
    processor = lazy(tokenizer)
    steps = walk(processor, tokenizer, before + call + after + call)
    assert all(allowed for allowed, _ in steps), steps
    masked = [m for _, m in steps]
    begun, free = len(before) + opened, len(before) + len(call)
    assert not any(masked[:begun])  # free text, and the marker itself
    assert all(masked[begun:free])  # the call, after its marker
    assert not any(masked[free : free + len(after) + opened])  # free again once it is complete
    assert all(masked[free + len(after) + opened :])
    assert processor.calls == 2


@pytest.mark.parametrize("family", ["generic", *TEMPLATES])
def test_a_call_to_no_tool_offered_is_refused_once_begun(tokenizers, family):
    tokenizer = tokenizers[family]
    text = call_text(tokenizer, "Nope", {"file_path": "/tmp/a"})
    steps = walk(lazy(tokenizer), tokenizer, ids(tokenizer, "Let me see. " + text))
    assert not all(allowed for allowed, _ in steps)


def test_the_marker_may_come_in_pieces(tokenizers):
    tokenizer = tokenizers["generic"]
    assert len(ids(tokenizer, "<tool_call>")) > 1
    # However the marker is cut into tokens, with text before it in its first one.
    opened = ids(tokenizer, "Sure <tool") + ids(tokenizer, "_call>\n")
    assert tokenizer.decode(opened[1:2]) == " <"
    body = '{"name": "Read", "arguments": {"file_path": "/a"}}\n</tool_call>'
    processor = lazy(tokenizer)
    assert all(allowed for allowed, _ in walk(processor, tokenizer, opened + ids(tokenizer, body)))
    assert processor.calls == 1
    refused = walk(lazy(tokenizer), tokenizer, opened + ids(tokenizer, '{"name": "Read", "args"'))
    assert not all(allowed for allowed, _ in refused)


def test_a_marker_whose_token_runs_on_past_the_grammar_is_not_held(tokenizers):
    # "<tool_call" then "><": the text right after the marker is not a call's, so the
    # grammar cannot hold it; the parser then shows it as text, as without a grammar.
    tokenizer = tokenizers["generic"]
    processor = lazy(tokenizer)
    tokens = ids(tokenizer, "<tool_call") + ids(tokenizer, "><b>bold</b>")
    assert tokenizer.decode(tokens[len(ids(tokenizer, "<tool_call")) :][:1]) == "><"
    assert not any(masked for _, masked in walk(processor, tokenizer, tokens))
    assert processor.calls == 0


def test_gpt_oss_may_name_the_recipient_in_the_header_its_prompt_opened(tokenizers):
    # The generation prompt ends with `<|start|>assistant`: the reply may go on with the
    # recipient (` to=functions.Read...`) rather than open a channel first.
    tokenizer = tokenizers["gpt-oss"]
    processor = lazy(tokenizer)
    rest = 'Read <|constrain|>json<|message|>{"file_path": "/a"}'
    steps = walk(processor, tokenizer, ids(tokenizer, " to=functions.") + ids(tokenizer, rest))
    assert all(allowed for allowed, _ in steps) and processor.calls == 1
    for reply in (" to=functions." + rest, ' to=functions.Read<|channel|>commentary json<|message|>{"file_path": "/a"}'):
        parser = toolcalls.Parser(detect(tokenizer), CALLING, stream_calls=True)
        segments = parser.feed(reply + "<|call|>") + parser.finish()
        assert segments[0] == toolcalls.CallStart("Read") and segments[-1] == toolcalls.ToolCall("Read", {"file_path": "/a"}), segments


def test_calls_that_open_with_no_marker_of_their_own_are_not_held(tiny_model):
    tokenizer = family_tokenizer(tiny_model, "meta-llama-Llama-3.1-8B-Instruct.jinja", LLAMA3)
    assert detect(tokenizer).name == "llama3"  # bare JSON
    assert constrain.lazy_calls(tokenizer, TOOLS, detect(tokenizer)) is None


# --- the tiny model, made to open a call and then left to write it -------------------


class Opener:
    """Makes the model write `tokens` first (as a model deciding to call a tool would),
    then lets it choose."""

    def __init__(self, tokens: list[int]):
        self._tokens, self._start = tokens, None

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        if self._start is None:
            self._start = tokens.size
        step = tokens.size - self._start
        if step >= len(self._tokens):
            return logits
        only = np.full(logits.shape, -np.inf, dtype=np.float32)
        only[..., self._tokens[step]] = 0.0
        return mx.array(only)


def generate(model, tokenizer, processors, max_tokens: int, temperature: float) -> list[int]:
    prompt = tokenizer.apply_chat_template(CALL_PROMPT, tools=TOOLS, add_generation_prompt=True)
    cache = make_prompt_cache(model)
    mx.random.seed(11)
    out = []
    steps = generate_step(mx.array(prompt), model, max_tokens=max_tokens, sampler=make_sampler(temp=temperature), logits_processors=processors, prompt_cache=cache)
    for token, _ in steps:
        if token in tokenizer.eos_token_ids:
            break
        out.append(token)
    return out


@pytest.mark.parametrize("family,temperature", [("generic", 0.0), ("qwen3.5", 0.0), ("qwen3.5", 1.0)])
def test_a_call_the_model_opens_is_valid_and_streams_as_it_comes(tiny_net, tiny_model, tokenizers, family, temperature):
    model, _ = tiny_net
    if family == "generic":
        tokenizer = tokenizers["generic"]
    else:  # the tiny model has no embedding rows for added special tokens: spelled out
        tokenizer = family_tokenizer(tiny_model, TEMPLATES[family][0], ())
    processor = lazy(tokenizer, TOOLS)
    out = generate(model, tokenizer, [Opener(ids(tokenizer, "Let me look.\n<tool_call>\n")), processor], 120, temperature)
    assert processor.calls >= 1
    parser = toolcalls.Parser(detect(tokenizer), TOOLS, stream_calls=True)
    segments, detokenizer = [], tokenizer.detokenizer
    for token in out:
        detokenizer.add_token(token)
        segments += parser.feed(detokenizer.last_segment)
    detokenizer.finalize()
    segments += parser.feed(detokenizer.last_segment)
    start = next(i for i, s in enumerate(segments) if isinstance(s, toolcalls.CallStart))
    end = next((i for i, s in enumerate(segments) if isinstance(s, (toolcalls.ToolCall, toolcalls.BadCall))), None)
    if end is None:
        # A 135M model may go on in a free string until max_tokens (sampled, it does):
        # what went out is still the start of one JSON value.
        assert temperature > 0, tokenizer.decode(out)
        segments += parser.finish()
        assert isinstance(json.loads("".join(s.json for s in segments[start:] if isinstance(s, toolcalls.CallDelta))), dict)
        return
    call = segments[end]
    assert isinstance(call, toolcalls.ToolCall), call
    jsonschema.Draft202012Validator({t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}[call.name]).validate(call.arguments)
    assert json.loads("".join(s.json for s in segments[start:end] if isinstance(s, toolcalls.CallDelta))) == call.arguments


# --- XML calls streamed as JSON -------------------------------------------------------


def streamed(fmt, text: str, seed: int) -> list:
    rng, parser, out, i = random.Random(seed), toolcalls.Parser(fmt, CALLING, stream_calls=True), [], 0
    while i < len(text):
        n = rng.randint(1, 5)
        out += [(i + n, s) for s in parser.feed(text[i : i + n])]
        i += n
    return out + [(len(text), s) for s in parser.finish()]


@pytest.mark.parametrize("family", ["qwen3.5", "glm-4.6", "glm-4.7"])
def test_xml_calls_stream_as_json_that_ends_as_the_parsed_call(tokenizers, family):
    tokenizer = tokenizers[family]
    fmt = detect(tokenizer)
    arguments = ARGUMENTS | ({"content": ARGUMENTS["content"].strip()} if "glm" in family else {})
    call = call_text(tokenizer, "Write", arguments)
    text = "On it." + call
    content_end = text.index(arguments["content"]) + len(arguments["content"])
    for seed in range(8):
        out = streamed(fmt, text, seed)
        segments = [s for _, s in out]
        (whole,) = [s for s in segments if isinstance(s, toolcalls.ToolCall)]
        assert whole.arguments == arguments
        pieces = [(at, s.json) for at, s in out if isinstance(s, toolcalls.CallDelta)]
        assert json.loads("".join(p for _, p in pieces)) == arguments
        # The content went out while it was written, not once the call was complete.
        sent_before = "".join(p for at, p in pieces if at < content_end)
        assert json.dumps(arguments["content"], ensure_ascii=False)[1:20] in sent_before
        assert next(s for s in segments if not isinstance(s, toolcalls.Text)) == toolcalls.CallStart("Write")


@pytest.mark.parametrize("family", ["qwen3.5", "glm-4.7"])
def test_a_streamed_call_cut_short_is_still_one_json_value(tokenizers, family):
    tokenizer = tokenizers[family]
    fmt = detect(tokenizer)
    call = call_text(tokenizer, "Write", ARGUMENTS | {"content": "abc def"})
    for cut in range(call.index("Write") + 6, len(call) - len("</tool_call>")):
        parser = toolcalls.Parser(fmt, CALLING, stream_calls=True)
        segments = parser.feed(call[:cut]) + parser.finish()
        pieces = "".join(s.json for s in segments if isinstance(s, toolcalls.CallDelta))
        if any(isinstance(s, toolcalls.CallStart) for s in segments):
            assert isinstance(json.loads(pieces), dict), (cut, pieces)


def test_a_string_that_may_be_null_waits(tokenizers):
    # Qwen3-Coder's parser reads a value "null" as no value: its quote waits for proof.
    fmt = detect(tokenizers["qwen3.5"])
    head = "<tool_call>\n<function=Write>\n<parameter=file_path>\n"
    parser = toolcalls.Parser(fmt, CALLING, stream_calls=True)
    sent = "".join(s.json for s in parser.feed(head + "nul") if isinstance(s, toolcalls.CallDelta))
    assert sent == '{"file_path": '
    sent += "".join(s.json for s in parser.feed("la") if isinstance(s, toolcalls.CallDelta))
    assert sent == '{"file_path": "nulla'


def test_closing_makes_every_prefix_of_json_one_value():
    whole = json.dumps({"a": "x \"q\" \\ \u00e9 \n", "b": [1, -2.5e3, True, None, {}, []], "c": {"d": False}}, ensure_ascii=False)
    whole += " "  # and text escaped as a model may write it
    for text in (whole, '{"u": "\\u00e9\\u20ac", "n": 1e-5}'):
        for i in range(len(text) + 1):
            json.loads(text[:i] + repair.closing(text[:i]))
    assert repair.closing(whole) == ""


@pytest.mark.parametrize(
    "family,schema",
    [("qwen3.5", {"anyOf": [{"type": "object"}, {"type": "array"}]}), ("generic", {"type": "object", "properties": {"m": {"enum": [-(2**70)]}}})],
    ids=["not-a-plain-object", "integer-past-64-bits"],
)
def test_a_schema_the_grammar_cannot_hold_is_refused_so_calls_come_whole(tokenizers, family, schema):
    tokenizer = tokenizers[family]
    with pytest.raises(constrain.ConstraintError):
        constrain.lazy_calls(tokenizer, [*TOOLS, function("Odd", schema)], detect(tokenizer))


# --- through the daemon ------------------------------------------------------------------

MODEL = "claude-opus-4-8"
READ = {"name": "Read", "description": "Read a file from the local filesystem.", "input_schema": READ_SCHEMA}
ASK = [{"role": "user", "content": "What is in my notes file?"}]


@pytest.mark.parametrize("choice,grammar", [(None, "held"), ({"type": "tool", "name": "Read"}, "forced"), ({"type": "none"}, None)])
def test_the_log_says_how_calls_were_held(client, daemon, choice, grammar):
    kwargs = {"tool_choice": choice} if choice else {}
    message = client.messages.create(model=MODEL, max_tokens=8, tools=[READ], messages=ASK, extra_body={"temperature": 0}, **kwargs)
    (logged,) = [r for r in daemon.records() if r["request_id"] == message._request_id]
    assert logged.get("call_grammar") == grammar


@pytest.mark.parametrize("stream", [False, True])
def test_a_forced_call_cut_by_max_tokens_is_still_valid_json(client, stream):
    write = {"name": "Write", "input_schema": WRITE["function"]["parameters"]}
    kwargs = dict(model=MODEL, max_tokens=24, tools=[write], tool_choice={"type": "tool", "name": "Write"}, messages=ASK, extra_body={"temperature": 0})
    if stream:
        with client.messages.stream(**kwargs) as events:
            pieces = [e.delta.partial_json for e in events if e.type == "content_block_delta" and e.delta.type == "input_json_delta"]
            message = events.get_final_message()
        assert isinstance(json.loads("".join(pieces)), dict)
    else:
        message = client.messages.create(**kwargs)
    assert message.stop_reason == "max_tokens"
    (call,) = [b for b in message.content if b.type == "tool_use"]
    assert isinstance(call.input, dict) and call.name == "Write"
