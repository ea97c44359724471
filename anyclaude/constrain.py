"""Forced tool calls: a grammar that lets the sampler write only a valid call.

Anthropic's `tool_choice` `{"type": "any"}` and `{"type": "tool", "name": X}` promise a
tool call. `forced_call` turns the request's tools into a grammar (llguidance: Lark with
each tool's JSON Schema inlined) and returns an MLX logits processor that masks every
token that would leave it. The grammar covers the whole output: the call markers, the
tool name and arguments that match the tool's schema, laid out exactly as `json.dumps`
writes them, so the text re-rendered from the parsed call next turn is token-identical
(DESIGN principle 4). When the call is complete only the end-of-sequence tokens remain
allowed, so the engine ends the generation through its usual EOS path.

A model's call syntax is a `CallFormat`, one per family `toolcalls` parses: Hermes
(`<tool_call>` + JSON), Qwen3-Coder (`<tool_call>` + `<function=...>`/`<parameter=...>`
XML), Llama 3.x (bare JSON with `parameters`) and Mistral (`[TOOL_CALLS]NAME[ARGS]{...}`,
or a JSON list for v3 templates). `supports` tells whether a `toolcalls.Format` name has
one; `format_for` picks the variant the model's template renders back.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from . import toolcalls

# JSON exactly as `json.dumps(..., ensure_ascii=False)` writes it (what prompt.py renders):
# ", " and ": " separators, no other whitespace, and only the escapes json.dumps itself
# produces. `\uXXXX` and `\/` are left out: they parse to characters json.dumps would
# write differently, and the re-rendered text would no longer match the generated one.
_JSON_LAYOUT = {
    "item_separator": ", ",
    "key_separator": ": ",
    "whitespace_flexible": False,
    "json_allowed_escapes": 'nrbtf\\"',
}
# Keywords that constrain nothing: `$schema` makes some engines choke, and descriptions
# only make the grammar text (and so its compile and cache key) bigger.
_DROPPED_KEYWORDS = ("$schema", "$comment", "description", "title", "examples")
# Subschema-valued keywords (value is a schema, a list of schemas, or a map of schemas).
_SCHEMA_KEYWORDS = ("additionalProperties", "items", "not", "propertyNames", "contains", "if", "then", "else")
_SCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")

_CACHE_SIZE = 32
# Tokens a call's grammar may force before the model chooses any: far more than any
# real schema's fixed text, far fewer than llguidance's own limit.
_MAX_FORCED = 4096


class ConstraintError(Exception):
    """Tools that cannot be forced (unknown name, a schema no grammar can express), or a
    generation that left the grammar."""


# --- call formats ------------------------------------------------------------------


class CallFormat:
    """How a model writes one tool call: as a Lark grammar, and as text."""

    name = ""

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        """A Lark grammar (llguidance dialect) for exactly one call to one of `tools`.

        `tools` are (name, prepared JSON Schema) pairs; `marker(text)` gives the grammar
        item for a fixed marker such as `<tool_call>` (a token reference when the model
        has it as a special token, else a string literal)."""
        raise NotImplementedError

    def render(self, name: str, arguments: dict) -> str:
        """The canonical text of a call: what the grammar produces for these arguments."""
        raise NotImplementedError

    def parse(self, text: str) -> tuple[str, dict]:
        """The (name, arguments) of one call written in this format."""
        raise NotImplementedError


class JsonCall(CallFormat):
    """A call as one JSON object, `{"name": NAME, KEY: {...}}`, between fixed texts.

    `opening` and `closing` may hold markers (`markers`), which the grammar writes as
    the model's special token where it has one."""

    def __init__(self, name: str, opening: str, closing: str, *, key: str = "arguments", markers: tuple[str, ...] = ()):
        self.name, self.opening, self.closing, self.key, self.markers = name, opening, closing, key, markers

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        opening = _pieces(self.opening + "{", self.markers, marker)
        closing = _pieces("}" + self.closing, self.markers, marker)
        lines = [
            f"start: {opening} call {closing}",
            "call: " + " | ".join(f"tool{i}" for i in range(len(tools))),
        ]
        for i, (name, schema) in enumerate(tools):
            head = f'"name": {json.dumps(name, ensure_ascii=False)}, "{self.key}": '
            lines.append(f"tool{i}: {_lark_string(head)} %json {json.dumps(schema, ensure_ascii=False)}")
        return "\n".join(lines)

    def render(self, name: str, arguments: dict) -> str:
        call = json.dumps({"name": name, self.key: arguments}, ensure_ascii=False)
        return f"{self.opening}{call}{self.closing}"

    def parse(self, text: str) -> tuple[str, dict]:
        if not (text.startswith(self.opening) and text.endswith(self.closing)):
            raise ValueError(f"not a {self.name} tool call")
        call = json.loads(text[len(self.opening) : len(text) - len(self.closing)])
        return call["name"], call[self.key]


class MistralHeader(CallFormat):
    """`[TOOL_CALLS]NAME[ARGS]{...}`, the call syntax of Mistral's newer templates
    (Mistral Small 3.2, Devstral, Magistral)."""

    name = "mistral"
    OPEN, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        lines = [
            f"start: {marker(self.OPEN)} call",
            "call: " + " | ".join(f"tool{i}" for i in range(len(tools))),
        ]
        for i, (name, schema) in enumerate(tools):
            # mlx-lm's parser reads the name as a run of word characters and dashes.
            if not re.fullmatch(r"[\w-]+", name):
                raise ConstraintError(f"tool name {name!r} cannot be written in a Mistral call")
            lines.append(f"tool{i}: {_lark_string(name)} {marker(self.ARGS)} %json {json.dumps(schema, ensure_ascii=False)}")
        return "\n".join(lines)

    def render(self, name: str, arguments: dict) -> str:
        return f"{self.OPEN}{name}{self.ARGS}{json.dumps(arguments, ensure_ascii=False)}"

    def parse(self, text: str) -> tuple[str, dict]:
        head, sep, arguments = text.removeprefix(self.OPEN).partition(self.ARGS)
        if not (text.startswith(self.OPEN) and sep):
            raise ValueError("not a Mistral tool call")
        return head, json.loads(arguments)


def _pieces(text: str, markers: tuple[str, ...], marker: Callable[[str], str]) -> str:
    """`text` as grammar items: each marker through `marker`, the rest as literals."""
    if not markers:
        return _lark_string(text)
    parts = re.split("(" + "|".join(re.escape(m) for m in markers) + ")", text)
    return " ".join(marker(p) if p in markers else _lark_string(p) for p in parts if p)


class Qwen3Coder(CallFormat):
    """Qwen3-Coder's XML call, as its chat template renders one back::

        <tool_call>
        <function=NAME>
        <parameter=KEY>
        VALUE
        </parameter>
        </function>
        </tool_call>

    Parameters come in the schema's `properties` order, required ones always, optional
    ones possibly. VALUE is the raw text for string-typed properties and `json.dumps`
    JSON (per the property's schema) otherwise, which is what mlx-lm's qwen3_coder
    parser converts back by the property's declared type.
    """

    name = "qwen3_coder"
    OPEN, CLOSE = "<tool_call>", "</tool_call>"
    _END = "\n</parameter>\n"

    def grammar(self, tools: list[tuple[str, dict]], marker: Callable[[str], str]) -> str:
        opening, closing, newline = marker(self.OPEN), marker(self.CLOSE), _lark_string("\n")
        lines = [
            f"start: {opening} {newline} call {closing}",
            "call: " + " | ".join(f"tool{i}" for i in range(len(tools))),
        ]
        for i, (name, schema) in enumerate(tools):
            _check_xml_name(name, "tool")
            items = []
            for j, (key, sub, required) in enumerate(_parameters(name, schema)):
                _check_xml_name(key, f"parameter of tool {name!r}:")
                rule = f"t{i}p{j}"
                items.append(rule if required else f"{rule}?")
                opener = _lark_string(f"<parameter={key}>\n")
                lines.append(f"{rule}: {opener} {self._value(sub, rule.upper())}")
                if (terminal := self._terminal(sub, rule.upper())) is not None:
                    lines.append(terminal)
            head, tail = _lark_string(f"<function={name}>\n"), _lark_string("</function>\n")
            lines.append(f"tool{i}: {head} {' '.join(items)} {tail}")
        return "\n".join(lines)

    def _value(self, schema: dict, terminal: str) -> str:
        literals = _string_literals(schema)
        if literals is not None:
            allowed = [s for s in literals if _raw_ok(s)]
            if not allowed:
                return "%json {\"not\": {}}"  # nothing can be written
            return "(" + " | ".join(_lark_string(s + self._END) for s in allowed) + ")"
        if _is_string(schema):
            return terminal
        return f"%json {json.dumps(schema, ensure_ascii=False)} {_lark_string(self._END)}"

    def _terminal(self, schema: dict, terminal: str) -> str | None:
        if _string_literals(schema) is not None or not _is_string(schema):
            return None
        # Raw text the parser gives back unchanged: no `</parameter>` (its end), no
        # `</tool_call>` (the call's end), and not "null" in any case (read as None).
        body = r"/(?s:.*)/ & ~/(?s:.*<\/parameter>.*)/ & ~/(?s:.*<\/tool_call>.*)/ & ~/(?i:null)/"
        least = schema.get("minLength")
        if isinstance(least, int) and 0 < least <= 64:
            body += f" & /(?s:.{{{least},}})/"
        return f"{terminal}: ({body}) {_lark_string(self._END)}"

    def render(self, name: str, arguments: dict) -> str:
        params = "".join(
            f"<parameter={k}>\n{v if isinstance(v, str) else json.dumps(v, ensure_ascii=False)}\n</parameter>\n"
            for k, v in arguments.items()
        )
        return f"{self.OPEN}\n<function={name}>\n{params}</function>\n{self.CLOSE}"

    def parse(self, text: str, tools: list[dict] | None = None) -> tuple[str, dict]:
        """The call as mlx-lm's qwen3_coder parser reads it; `tools` (OpenAI-style) give
        the property types it converts values by (without them every value is text)."""
        from mlx_lm.tool_parsers import qwen3_coder

        body = text.strip()
        if not (body.startswith(self.OPEN) and body.endswith(self.CLOSE)):
            raise ValueError("not a Qwen3-Coder tool call")
        call = qwen3_coder.parse_tool_call(body[len(self.OPEN) : -len(self.CLOSE)].strip(), tools)
        return call["name"], call["arguments"]


def _check_xml_name(name: str, what: str) -> None:
    # The parser reads a name as the run of characters up to whitespace, `<` or `>`.
    if not name or any(c.isspace() or c in "<>" for c in name):
        raise ConstraintError(f"{what} name {name!r} cannot be written in a Qwen3-Coder call")


def _parameters(name: str, schema: dict) -> list[tuple[str, dict, bool]]:
    """(key, schema, required) for each parameter of an object schema, in order.

    Each sub-schema carries the tool's `$defs`/`definitions` (so `$ref`s resolve) and
    its `x-guidance` layout. Keys only in `required` come after, with any value."""
    if schema.get("type") not in ("object", None) or any(k in schema for k in ("anyOf", "oneOf", "allOf", "$ref")):
        raise ConstraintError(f"the input_schema of tool {name!r} is not a plain object schema")
    shared = {k: schema[k] for k in ("$defs", "definitions", "x-guidance") if k in schema}
    properties = schema.get("properties") if isinstance(schema.get("properties"), dict) else {}
    required = [k for k in schema.get("required") or [] if isinstance(k, str)]
    out = []
    for key in [*properties, *(k for k in required if k not in properties)]:
        sub = properties.get(key, {})
        sub = {"not": {}} if sub is False else {} if sub is True else sub
        out.append((key, shared | sub, key in required))
    return out


def _is_string(schema: dict) -> bool:
    return schema.get("type") == "string"


def _string_literals(schema: Any) -> list[str] | None:
    """The strings a schema allows if it is a finite set of strings (const, enum, or
    anyOf/oneOf of those), else None."""
    if not isinstance(schema, dict) or schema.get("type", "string") != "string":
        return None
    if "const" in schema:
        return [schema["const"]] if isinstance(schema["const"], str) else None
    if isinstance(schema.get("enum"), list):
        return schema["enum"] if all(isinstance(v, str) for v in schema["enum"]) else None
    for key in ("anyOf", "oneOf"):
        if isinstance(schema.get(key), list) and schema[key]:
            parts = [_string_literals(branch) for branch in schema[key]]
            if any(p is None for p in parts):
                return None
            return list(dict.fromkeys(s for p in parts for s in p))
    return None


def _raw_ok(text: str) -> bool:
    return "</parameter>" not in text and "</tool_call>" not in text and text.lower() != "null"


def _lark_string(text: str) -> str:
    # A JSON string literal is a valid llguidance Lark string literal.
    return json.dumps(text, ensure_ascii=False)


FORMATS: dict[str, CallFormat] = {
    "hermes": JsonCall("hermes", "<tool_call>\n", "\n</tool_call>", markers=("<tool_call>", "</tool_call>")),
    "qwen3_coder": Qwen3Coder(),
    # Llama 3.1-3.3 write a custom tool's call as bare JSON, and their templates render
    # one back the same way (with no `<|python_tag|>`, which is for built-in tools).
    "llama3": JsonCall("llama3", "", "", key="parameters"),
    "mistral": MistralHeader(),
    # Mistral's v3 templates write a JSON list: after a space (Mistral 7B v0.3) or right
    # after the marker (Nemo); the call must be the one the template renders back.
    "mistral_list": JsonCall("mistral_list", "[TOOL_CALLS] [", "]", markers=("[TOOL_CALLS]",)),
    "mistral_list_unspaced": JsonCall("mistral_list_unspaced", "[TOOL_CALLS][", "]", markers=("[TOOL_CALLS]",)),
}
# `toolcalls.Format` names whose calls are written as one of FORMATS.
_ALIASES = {"generic": "hermes"}


def supports(format_name: str) -> bool:
    """Whether calls in the `toolcalls.Format` named `format_name` can be forced."""
    return _ALIASES.get(format_name, format_name) in FORMATS


def format_for(tokenizer: Any, format_name: str) -> CallFormat:
    """The CallFormat for a `toolcalls.Format` name: the one the model's chat template
    renders calls back in, so that a forced call is next turn's prompt, token for token."""
    name = _ALIASES.get(format_name, format_name)
    template = toolcalls.template_text(tokenizer)
    if name == "mistral" and "[ARGS]" not in template:
        name = "mistral_list_unspaced" if "[TOOL_CALLS][" in template else "mistral_list"
    if name not in FORMATS:
        raise ConstraintError(f"unknown call format {format_name!r}")
    return FORMATS[name]


# --- the public entry point --------------------------------------------------------


def forced_call(
    tokenizer: Any, tools: list[dict], name: str | None, *, call_format: str = "hermes"
) -> Callable[[mx.array, mx.array], mx.array]:
    """A logits processor that forces one call to tool `name` (or any of `tools` if None).

    `tokenizer` is the model's mlx-lm TokenizerWrapper; `tools` are OpenAI-style
    function definitions (`{"type": "function", "function": {"name", "description",
    "parameters"}}`). The processor is for ONE generation, passed to mlx-lm's
    `generate_step(..., logits_processors=[processor])` on the engine thread: its first
    call sees the prompt (whatever its length), later calls one new token each. Once the
    call is complete it allows only EOS. Grammars are compiled once per tokenizer, tool
    set, name and format, and kept in an LRU cache. Raises ConstraintError if `name` is
    not among the tools or a schema cannot be compiled.
    """
    fmt = format_for(tokenizer, call_format)
    chosen = _choose(tools, name)
    compiled = _compiled(tokenizer, fmt, chosen)
    return ForcedCall(compiled.matcher.deep_copy(), compiled.vocab_size, compiled.eos)


def prepare(tokenizer: Any) -> None:
    """Adapt `tokenizer` for grammars now rather than on the first forced call.

    This takes up to a second per tokenizer (the vocabulary is indexed once); call it
    on the engine thread after loading a model so no request waits for it.
    """
    _state(tokenizer)


def _choose(tools: list[dict], name: str | None) -> list[tuple[str, dict]]:
    seen: dict[str, dict] = {}
    for tool in tools:
        fn = tool.get("function", tool)
        if fn.get("name") and fn["name"] not in seen:
            seen[fn["name"]] = fn.get("parameters") or fn.get("input_schema") or {}
    if name is not None:
        if name not in seen:
            raise ConstraintError(f"tool_choice names {name!r}, which is not among the tools")
        seen = {name: seen[name]}
    if not seen:
        raise ConstraintError("a tool call is required but no tools were given")
    return list(seen.items())


# --- the processor -----------------------------------------------------------------


class ForcedCall:
    """The stateful logits processor for one generation (see `forced_call`)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos: list[int]):
        self._matcher = matcher
        self._eos = eos
        self._seen: int | None = None  # how much of `tokens` is already accounted for
        self._bitmask = np.zeros(((vocab_size + 31) // 32,), dtype=np.int32)

    @property
    def done(self) -> bool:
        """Whether the call is complete (only EOS may follow)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        # generate_step passes prompt + generated tokens; the first call's tokens are
        # the prompt (or the part of it not in a reused cache), never grammar input.
        # numpy reads the evaluated buffer; an MLX slice would be one more op to schedule.
        seen = np.asarray(tokens)
        if self._seen is None:
            self._seen = seen.size
        elif seen.size > self._seen:
            new = seen[self._seen :].tolist()
            self._seen = seen.size
            for token in new:
                self._consume(token)
        allowed = self._allowed(logits.shape[-1])
        return mx.where(allowed, logits, mx.array(-mx.inf, dtype=logits.dtype))

    def _consume(self, token: int) -> None:
        if token in self._eos and self._matcher.is_stopped():
            return  # the caller went on past the end: stay at the end
        if not self._matcher.consume_token(token):
            raise ConstraintError(f"the generation left the tool-call grammar: {self._matcher.get_error()}")

    def _allowed(self, width: int) -> mx.array:
        self._matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if self._matcher.is_error():
            raise ConstraintError(f"the tool-call grammar failed: {self._matcher.get_error()}")
        bits = np.unpackbits(self._bitmask.view(np.uint8), count=min(width, self._bitmask.size * 32), bitorder="little")
        # The model's output layer may be wider than the tokenizer (padding rows):
        # those ids are never allowed.
        if bits.size < width:
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=np.uint8)])
        return mx.array(bits.view(np.bool_))


# --- compiling and caching ---------------------------------------------------------


class _Compiled:
    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos: list[int]):
        self.matcher = matcher  # never advanced: each generation gets a deep copy
        self.vocab_size = vocab_size
        self.eos = eos


class _TokenizerState:
    def __init__(self, lltokenizer: llguidance.LLTokenizer, eos: list[int]):
        self.lltokenizer = lltokenizer
        self.eos = eos
        self.grammars: OrderedDict[str, _Compiled] = OrderedDict()


_states: weakref.WeakKeyDictionary[Any, _TokenizerState] = weakref.WeakKeyDictionary()
_lock = threading.Lock()


def _compiled(tokenizer: Any, fmt: CallFormat, tools: list[tuple[str, dict]]) -> _Compiled:
    state = _state(tokenizer)
    tools = [(name, _prepare_schema(schema)) for name, schema in tools]
    key = _key(fmt, tools)
    with _lock:
        if (hit := state.grammars.get(key)) is not None:
            state.grammars.move_to_end(key)
            return hit
    compiled = _Compiled(_compile(state, fmt, tools), state.lltokenizer.vocab_size, state.eos)
    with _lock:
        state.grammars[key] = compiled
        while len(state.grammars) > _CACHE_SIZE:
            state.grammars.popitem(last=False)
    return compiled


def _key(fmt: CallFormat, tools: list[tuple[str, dict]]) -> str:
    # Tool names and prepared schemas: descriptions change nothing in the grammar.
    text = json.dumps([fmt.name, tools], sort_keys=True, ensure_ascii=False)
    return hashlib.sha256(text.encode()).hexdigest()


def _state(tokenizer: Any) -> _TokenizerState:
    with _lock:
        if (state := _states.get(tokenizer)) is not None:
            return state
    eos = sorted(int(t) for t in getattr(tokenizer, "eos_token_ids", None) or [tokenizer.eos_token_id])
    try:
        lltokenizer = llguidance.hf.from_tokenizer(getattr(tokenizer, "_tokenizer", tokenizer), eos_token=eos)
    except ValueError:
        raise ConstraintError("forced tool calls need a tokenizer backed by the `tokenizers` library") from None
    state = _TokenizerState(lltokenizer, eos)
    with _lock:
        return _states.setdefault(tokenizer, state)


def _compile(state: _TokenizerState, fmt: CallFormat, tools: list[tuple[str, dict]]) -> llguidance.LLMatcher:
    schemas = [(name, _schema_for(state, name, schema)) for name, schema in tools]
    grammar = fmt.grammar(schemas, lambda text: _marker(state.lltokenizer, text))
    matcher = llguidance.LLMatcher(state.lltokenizer, llguidance.LLMatcher.grammar_from_lark(grammar), log_level=0)
    if matcher.is_error():
        raise ConstraintError(f"the tool-call grammar does not compile: {matcher.get_error()}")
    return matcher


def _schema_for(state: _TokenizerState, name: str, prepared: dict) -> dict:
    # Strict first; if llguidance lacks a keyword, ignore just that keyword (lenient)
    # rather than refuse the call: the rest of the schema is still enforced.
    for options in (_JSON_LAYOUT, _JSON_LAYOUT | {"lenient": True}):
        candidate = prepared | {"x-guidance": options}
        error = llguidance.LLMatcher.validate_grammar(
            llguidance.LLMatcher.grammar_from_json_schema(candidate), state.lltokenizer
        )
        if not error:
            _check_finite(state, name, candidate)
            return candidate
    raise ConstraintError(f"the input_schema of tool {name!r} cannot be compiled: {error}")


def _check_finite(state: _TokenizerState, name: str, schema: dict) -> None:
    # A schema can compile and still admit no finite value (a required property whose
    # $ref recurses forever): the tokens it forces from the start then never end.
    probe = llguidance.LLMatcher(state.lltokenizer, llguidance.LLMatcher.grammar_from_json_schema(schema), log_level=0)
    if len(probe.compute_ff_tokens()) > _MAX_FORCED or probe.is_error():
        raise ConstraintError(f"no finite call matches the input_schema of tool {name!r} (a $ref that recurses without end?)")


def _prepare_schema(schema: Any) -> dict:
    # Only keyword positions are touched (a property may well be named "description").
    # A `propertyNames` every JSON key satisfies (`{"type": "string"}`, `{}`, `true`)
    # goes, since llguidance does not implement the keyword; arguments are an object.
    prepared = _walk(schema) if isinstance(schema, dict) else {}
    if "type" not in prepared and not any(k in prepared for k in ("anyOf", "oneOf", "allOf", "$ref", "const", "enum")):
        prepared["type"] = "object"
    return prepared


def _walk(schema: Any) -> Any:
    if not isinstance(schema, dict):
        return schema  # true/false schemas
    out: dict = {}
    for key, value in schema.items():
        if key in _DROPPED_KEYWORDS or (key == "propertyNames" and _trivial_name_schema(value)):
            continue
        if key in _SCHEMA_KEYWORDS:
            out[key] = [_walk(v) for v in value] if isinstance(value, list) else _walk(value)
        elif key in _SCHEMA_LISTS and isinstance(value, list):
            out[key] = [_walk(v) for v in value]
        elif key in _SCHEMA_MAPS and isinstance(value, dict):
            out[key] = {k: _walk(v) for k, v in value.items()}
        else:
            out[key] = value
    return out


def _trivial_name_schema(value: Any) -> bool:
    if value is True or value == {}:
        return True
    return isinstance(value, dict) and set(value) <= {"type", "description", "title"} and value.get("type") == "string"


def _marker(lltokenizer: llguidance.LLTokenizer, text: str) -> str:
    # A marker the model has as one special token must be that token: spelled out as
    # text it would be out of distribution, and would tokenize differently next turn.
    ids = lltokenizer.tokenize_str(text, parse_special=True)
    if len(ids) == 1 and lltokenizer.is_special_token(ids[0]):
        return f"<[{ids[0]}]>"
    return _lark_string(text)
