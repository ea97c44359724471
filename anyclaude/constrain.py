"""Forced tool calls: a grammar that lets the sampler write only a valid call.

Anthropic's `tool_choice` `{"type": "any"}` and `{"type": "tool", "name": X}` promise a
tool call. `forced_call` turns the request's tools into a grammar (llguidance: Lark with
each tool's JSON Schema inlined) and returns an MLX logits processor that masks every
token that would leave it. The grammar covers the whole output: the call markers, the
tool name and arguments that match the tool's schema, laid out exactly as `json.dumps`
writes them, so the text re-rendered from the parsed call next turn is token-identical
(DESIGN principle 4). When the call is complete only the end-of-sequence tokens remain
allowed, so the engine ends the generation through its usual EOS path.

A model's call syntax is a `families.grammar.CallFormat`, given by its family's module
(`Family.call_format`, the variant its template renders back); `supports` tells whether
a format has one.
"""

from __future__ import annotations

import hashlib
import json
import threading
import weakref
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import llguidance
import llguidance.hf
import mlx.core as mx
import numpy as np

from . import families
from .families import hermes
from .families.base import Format
from .families.grammar import CallFormat, ConstraintError, lark_string

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


def supports(fmt: Format, tokenizer: Any) -> bool:
    """Whether calls in format `fmt` can be forced."""
    return families.of(fmt).call_format(fmt, families.template_text(tokenizer)) is not None


def format_for(tokenizer: Any, fmt: Format) -> CallFormat:
    """The CallFormat a forced call in `fmt` is written in: the one the model's chat
    template renders calls back in, so that a forced call is next turn's prompt, token
    for token."""
    calls = families.of(fmt).call_format(fmt, families.template_text(tokenizer))
    if calls is None:
        raise ConstraintError(f"calls in the {fmt.name} format cannot be forced")
    return calls


# --- the public entry point --------------------------------------------------------


def forced_call(tokenizer: Any, tools: list[dict], name: str | None, fmt: Format = hermes.FORMAT) -> Callable[[mx.array, mx.array], mx.array]:
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
    calls = format_for(tokenizer, fmt)
    chosen = _choose(tools, name)
    compiled = _compiled(tokenizer, calls, chosen)
    return ForcedCall(compiled.matcher.deep_copy(), compiled.vocab_size, compiled.eos)


def lazy_calls(tokenizer: Any, tools: list[dict], fmt: Format) -> Callable[[mx.array, mx.array], mx.array] | None:
    """A logits processor for an answer that may call any of `tools`: once the model has
    written the marker that opens a call, the rest of the call is held to the grammar,
    so that a call streamed while it is written is certain to end valid. None for
    formats whose calls have no such marker. Raises ConstraintError as `forced_call`.
    """
    calls = format_for(tokenizer, fmt)
    if calls.trigger is None:
        return None
    compiled = _compiled(tokenizer, calls, _choose(tools, None))
    return LazyCalls(compiled, _state(tokenizer).lltokenizer, calls)


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


# --- the processors ----------------------------------------------------------------


class _Masking:
    """What both processors share: the tokens that are new since the last call, and the
    mask of a matcher's allowed tokens."""

    def __init__(self, vocab_size: int, eos: list[int]):
        self._eos = eos
        self._seen: int | None = None  # how much of `tokens` is already accounted for
        self._bitmask = np.zeros(((vocab_size + 31) // 32,), dtype=np.int32)

    def _new(self, tokens: mx.array) -> list[int]:
        # generate_step passes prompt + generated tokens; the first call's tokens are
        # the prompt (or the part of it not in a reused cache), never grammar input.
        # numpy reads the evaluated buffer; an MLX slice would be one more op to schedule.
        seen = np.asarray(tokens)
        if self._seen is None:
            self._seen = seen.size
            return []
        new = seen[self._seen :].tolist()
        self._seen = seen.size
        return new

    def _masked(self, matcher: llguidance.LLMatcher, logits: mx.array) -> mx.array:
        matcher.unsafe_compute_mask_ptr(self._bitmask.ctypes.data, self._bitmask.nbytes)
        if matcher.is_error():
            raise ConstraintError(f"the tool-call grammar failed: {matcher.get_error()}")
        width = logits.shape[-1]
        bits = np.unpackbits(self._bitmask.view(np.uint8), count=min(width, self._bitmask.size * 32), bitorder="little")
        # The model's output layer may be wider than the tokenizer (padding rows):
        # those ids are never allowed.
        if bits.size < width:
            bits = np.concatenate([bits, np.zeros(width - bits.size, dtype=np.uint8)])
        return mx.where(mx.array(bits.view(np.bool_)), logits, mx.array(-mx.inf, dtype=logits.dtype))


class ForcedCall(_Masking):
    """The stateful logits processor for one generation (see `forced_call`)."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int, eos: list[int]):
        super().__init__(vocab_size, eos)
        self._matcher = matcher

    @property
    def done(self) -> bool:
        """Whether the call is complete (only EOS may follow)."""
        return self._matcher.is_stopped() and not self._matcher.is_error()

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        for token in self._new(tokens):
            if token in self._eos and self._matcher.is_stopped():
                continue  # the caller went on past the end: stay at the end
            if not self._matcher.consume_token(token):
                raise ConstraintError(f"the generation left the tool-call grammar: {self._matcher.get_error()}")
        return self._masked(self._matcher, logits)


class LazyCalls(_Masking):
    """The logits processor of an unforced answer (see `lazy_calls`): it lets every
    token through until the output holds the call marker, then holds the rest of that
    call to the grammar, and lets every token through again once the call is complete."""

    def __init__(self, compiled: _Compiled, lltokenizer: llguidance.LLTokenizer, calls: CallFormat):
        super().__init__(compiled.vocab_size, compiled.eos)
        self._compiled, self._lltokenizer = compiled, lltokenizer
        self._trigger = calls.trigger.encode()
        # What the grammar reads before the call's own text: its opening (from the start).
        self._opening = lltokenizer.tokenize_str(calls.lead + calls.trigger, parse_special=True)
        self._tail = b""  # the end of the output, where a marker may be starting
        self._matcher: llguidance.LLMatcher | None = None
        self.calls = 0  # calls held to the grammar (for tests and the curious)

    def __call__(self, tokens: mx.array, logits: mx.array) -> mx.array:
        for token in self._new(tokens):
            self._consume(token)
        return logits if self._matcher is None else self._masked(self._matcher, logits)

    def _consume(self, token: int) -> None:
        if self._matcher is not None:
            if not self._matcher.consume_token(token):
                raise ConstraintError(f"the generation left the tool-call grammar: {self._matcher.get_error()}")
            if self._matcher.is_stopped():
                self._matcher = None
            return
        # Bytes, not text: a marker spelled out may come in pieces of any tokenization
        # (and a special token decodes to its marker's text).
        output = self._tail + self._lltokenizer.decode_bytes([token])
        i = output.find(self._trigger)
        if i < 0:
            self._tail = output[max(0, len(output) - len(self._trigger) + 1) :]
            return
        self._tail = b""
        # The grammar is given the call from its opening; whatever the marker's token
        # held after the marker was generated already, and must fit it too.
        matcher = self._compiled.matcher.deep_copy()
        rest = output[i + len(self._trigger) :]
        if matcher.consume_tokens(self._opening) and (not rest or matcher.consume_tokens(self._lltokenizer.tokenize_bytes(rest))):
            self._matcher = matcher
            self.calls += 1


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
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(candidate)
        except ValueError as exc:  # a value its JSON cannot hold (an integer past 64 bits)
            raise ConstraintError(f"the input_schema of tool {name!r} cannot be compiled: {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, state.lltokenizer)
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
    return lark_string(text)
