"""Anthropic request -> chat messages -> the model's chat template -> token ids.

count_tokens and generation share this path, so they agree to the token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import string
from typing import Any

import numpy as np
from msgspec import Struct

from . import toolcalls, wire
from .cache import common_prefix
from .errors import InvalidRequest

BILLING_HEADER = "x-anthropic-billing-header:"
IMAGE_NOTE = "[image omitted: this model reads text only]"
DOCUMENT_NOTE = "[document omitted: only text documents can be read]"


class Rendered(Struct, frozen=True):
    text: str
    ids: list[int]
    # The tools as function definitions, and the call format the model will write.
    tools: list[dict]
    format: toolcalls.Format
    # Whether the tools went into the system prompt in the generic format below.
    generic_tools: bool
    # Whether the prompt ends inside an opened reasoning block.
    thinking_open: bool
    # Tokens of the leading system turn (system prompt and tools): the prefix that
    # Claude Code's main conversation, side requests and subagents share.
    checkpoint: int = 0


def render(request: wire.CountTokensRequest, tokenizer: Any, *, keep_billing_header: bool = False) -> Rendered:
    """The prompt for a request, as text and as token ids."""
    fmt = toolcalls.format_for(tokenizer)
    messages, tools, generic = template_inputs(request, fmt, keep_billing_header=keep_billing_header)
    template_tools = tools if tools and not generic else None
    thinking = thinking_wanted(request)
    text = _apply(tokenizer, messages, template_tools, thinking)
    ids = list(tokenizer.encode(text, add_special_tokens=False))
    thinking_open = bool(fmt.think_start) and text.rstrip().endswith(fmt.think_start)
    return Rendered(
        text=text,
        ids=ids,
        tools=tools,
        format=fmt,
        generic_tools=generic,
        thinking_open=thinking_open,
        checkpoint=_system_prefix(tokenizer, messages, template_tools, thinking, text, ids),
    )


def template_inputs(request: wire.CountTokensRequest, fmt: toolcalls.Format, *, keep_billing_header: bool = False) -> tuple[list[dict], list[dict], bool]:
    """What the chat template of a model whose tool format is `fmt` is given for a request:
    the chat messages, the tools as OpenAI-style functions, and whether those went into the
    system prompt instead, in the generic format (a template whose own tool syntax anyclaude
    cannot parse)."""
    tools = [_function(t) for t in request.tools or [] if t.type in (None, "custom")]
    messages = chat_messages(request, keep_billing_header=keep_billing_header)
    generic = bool(tools) and fmt.name == "generic"
    if generic:
        return _generic_tools(messages, tools), tools, generic
    if fmt.name == "qwen3_coder":
        messages = _json_values(messages)
    return messages, tools, generic


# The user turn of the probe that finds where a template's system+tools prefix ends.
_PROBE = "\u2063anyclaude checkpoint probe\u2063"


def _system_prefix(tokenizer, messages: list[dict], tools, thinking: bool, text: str, ids: list[int]) -> int:
    if len(messages) < 2 or messages[0]["role"] != "system":
        return 0
    shared = _shared_prefix(tokenizer, messages[0], tools, thinking, text)
    if not shared:
        return 0
    # Tokens can merge across the boundary; the checkpoint stops where they agree.
    return common_prefix(_encode(tokenizer, shared), np.asarray(ids))


def _shared_prefix(tokenizer, system: dict, tools, thinking: bool, text: str) -> str:
    """The text every request with this system prompt and these tools starts with.

    The system turn alone, rendered, where it holds the system prompt and the tools.
    Many templates put them elsewhere: the tools in the first user turn (Llama 3.x) or
    before the last one (Mistral Small 3.x), the system prompt in the first user turn
    (Gemma) or the last (Nemo), or refuse a conversation without a user turn (Qwen3.5);
    for them it is what comes before a probe user turn, where that starts the prompt."""

    def rendered(messages: list[dict], tools) -> str:
        try:
            return tokenizer.apply_chat_template(
                messages, tools=tools, tokenize=False, add_generation_prompt=False, enable_thinking=thinking
            )
        except Exception:  # a template that wants more than a system turn
            return ""

    alone = rendered([system], tools)
    alone = alone if alone and text.startswith(alone) else ""
    # Without tools the system turn is short: rendering it again costs little.
    if alone and system["content"] in alone and not (tools and alone == rendered([system], None)):
        return alone
    probe = rendered([system, {"role": "user", "content": _PROBE}], tools)
    head = probe[: probe.find(_PROBE)] if _PROBE in probe else ""
    return head if len(head) > len(alone) and text.startswith(head) else alone


@functools.lru_cache(maxsize=8)
def _encode(tokenizer, text: str) -> np.ndarray:
    # The same system prompt and tools come with every turn: tokenize them once.
    return np.asarray(tokenizer.encode(text, add_special_tokens=False))


def thinking_wanted(request: wire.CountTokensRequest) -> bool:
    """Whether to switch the template's reasoning on: `enabled`, or `adaptive` unless effort
    is low; never for a forced call (tool_choice any or tool), written from the first token."""
    thinking = request.thinking
    if thinking is None or thinking.type == "disabled" or (request.tool_choice and request.tool_choice.type in ("any", "tool")):
        return False
    effort = request.output_config.effort if request.output_config else None
    return thinking.type == "enabled" or effort != "low"


def chat_messages(request: wire.CountTokensRequest, *, keep_billing_header: bool = False) -> list[dict]:
    """The conversation as chat-template messages (system, user, assistant, tool)."""
    out: list[dict] = []
    system = system_text(request.system, keep_billing_header=keep_billing_header)
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        blocks = wire.blocks(message.content, f"messages.{i}.content")
        if message.role == "assistant":
            _add(out, _assistant(blocks))
        elif message.role == "system":
            _add(out, {"role": "system", "content": _text(blocks)})
        else:
            for turn in _user(blocks):
                _add(out, turn)
    return out


def system_text(system: str | list | None, *, keep_billing_header: bool = False) -> str:
    if system is None:
        return ""
    parts = []
    for block in wire.blocks(system, "system"):
        if not isinstance(block, wire.TextBlock):
            continue
        # The billing header changes with every Claude Code version (and per request
        # in some), so at the very top of the prompt it would defeat prefix caching.
        if not keep_billing_header and block.text.startswith(BILLING_HEADER):
            continue
        parts.append(block.text)
    return "\n\n".join(parts)


def _text(blocks: list[wire.Block]) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, wire.TextBlock):
            parts.append(block.text)
        elif isinstance(block, wire.ImageBlock):
            parts.append(IMAGE_NOTE)
        elif isinstance(block, wire.DocumentBlock):
            parts.append(_document(block))
        elif isinstance(block, wire.MidConversationSystemBlock):
            parts.append(_text(wire.blocks(block.content, "content")))
    return "\n\n".join(p for p in parts if p)


def _document(block: wire.DocumentBlock) -> str:
    source = block.source or {}
    if source.get("type") == "text" and isinstance(source.get("data"), str):
        title = f"{block.title}\n\n" if block.title else ""
        return title + source["data"]
    return DOCUMENT_NOTE


def _assistant(blocks: list[wire.Block]) -> dict:
    # Thinking from earlier turns is dropped, always the same way, so that the
    # rendered history stays stable from turn to turn.
    text = _text([b for b in blocks if isinstance(b, wire.TextBlock)])
    turn: dict = {"role": "assistant", "content": text}
    calls = [
        {"type": "function", "id": b.id, "function": {"name": b.name, "arguments": b.input}}
        for b in blocks
        if isinstance(b, wire.ToolUseBlock)
    ]
    if calls:
        turn["tool_calls"] = calls
    return turn


def _user(blocks: list[wire.Block]) -> list[dict]:
    """A user message as turns: tool results become tool turns, in order, text around them user turns."""
    turns: list[dict] = []
    pending: list[wire.Block] = []

    def flush() -> None:
        if text := _text(pending):
            turns.append({"role": "user", "content": text})
        pending.clear()

    for block in blocks:
        if isinstance(block, wire.ToolResultBlock):
            flush()
            turns.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _tool_result(block)})
        elif isinstance(block, wire.MidConversationSystemBlock):
            flush()
            turns.append({"role": "system", "content": _text([block])})
        else:
            pending.append(block)
    flush()
    return turns


def _tool_result(block: wire.ToolResultBlock) -> str:
    text = _text(wire.blocks(block.content, "tool_result.content"))
    return f"Error: {text}" if block.is_error else text


def _add(out: list[dict], turn: dict) -> None:
    """Append a turn, combining it with the previous one when the roles are the same."""
    last = out[-1] if out else None
    if last and last["role"] == turn["role"] and turn["role"] in ("user", "assistant", "system"):
        if last.get("tool_calls") and turn["content"]:
            # Text after a tool call would be rendered before it; keep order by not merging.
            out.append(turn)
            return
        last["content"] = "\n\n".join(p for p in (last["content"], turn["content"]) if p)
        if turn.get("tool_calls"):
            last.setdefault("tool_calls", []).extend(turn["tool_calls"])
        return
    out.append(turn)


def _function(tool: wire.Tool) -> dict:
    # `$schema` and `$comment` confuse some templates; `$defs` is kept, `$ref`s point into it.
    schema = {k: v for k, v in tool.input_schema.items() if k not in ("$schema", "$comment")}
    return {"type": "function", "function": {"name": tool.name, "description": tool.description, "parameters": schema}}


# The generic tool format (Hermes style), for chat templates that know no tools.
GENERIC_TOOLS_HEADER = (
    "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
    "You are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
)
GENERIC_TOOLS_FOOTER = (
    "\n</tools>\n\nFor each function call, return a json object with function name and arguments "
    "within <tool_call></tool_call> XML tags:\n<tool_call>\n"
    '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call>'
)


def _generic_tools(messages: list[dict], tools: list[dict]) -> list[dict]:
    listing = "\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
    section = GENERIC_TOOLS_HEADER + listing + GENERIC_TOOLS_FOOTER
    out = [dict(m) for m in messages]
    if out and out[0]["role"] == "system":
        out[0]["content"] = f"{out[0]['content']}\n\n{section}"
    else:
        out.insert(0, {"role": "system", "content": section})
    for m in out:
        if calls := m.pop("tool_calls", None):
            rendered = "\n".join(
                "<tool_call>\n"
                + json.dumps({"name": c["function"]["name"], "arguments": c["function"]["arguments"]}, ensure_ascii=False)
                + "\n</tool_call>"
                for c in calls
            )
            m["content"] = f"{m['content']}\n{rendered}" if m["content"] else rendered
        if m["role"] == "tool":
            m["role"] = "user"
            m["content"] = f"<tool_response>\n{m['content']}\n</tool_response>"
            m.pop("tool_call_id", None)
    merged: list[dict] = []
    for m in out:
        _add(merged, m)
    return merged


def _json_values(messages: list[dict]) -> list[dict]:
    """Qwen3-Coder's (and Qwen3.5's) template prints a non-container argument with
    `| string`, so a boolean comes out as Python's `True` and null as `None`, where the
    model (and the forced-call grammar) wrote `true` and `null`: the history would part
    from the generated tokens at the first such argument. Every non-string value goes to
    the template already written as JSON, the way the model writes it (containers too:
    the template's `tojson` gives the same text, and then no template variant can differ)."""
    out = []
    for m in messages:
        if calls := m.get("tool_calls"):
            m = m | {"tool_calls": [_json_call(c) for c in calls]}
        out.append(m)
    return out


def _json_call(call: dict) -> dict:
    function = call["function"]
    arguments = function["arguments"]
    if not isinstance(arguments, dict):
        return call
    written = {k: v if isinstance(v, str) else json.dumps(v, ensure_ascii=False) for k, v in arguments.items()}
    return call | {"function": function | {"arguments": written}}


def _apply(tokenizer: Any, messages: list[dict], tools: list[dict] | None, thinking: bool) -> str:
    continue_final = bool(messages) and messages[-1]["role"] == "assistant"
    kwargs = dict(
        tools=tools,
        tokenize=False,
        add_generation_prompt=not continue_final,
        continue_final_message=continue_final,
        # Templates with a reasoning switch read it; the others ignore it.
        enable_thinking=thinking,
    )
    try:
        return tokenizer.apply_chat_template(messages, **kwargs)
    except Exception as first:
        # Many templates refuse a system turn after the first message; give them
        # the same text as a reminder inside the user turn instead of dropping it.
        # Mistral's v3 templates refuse tool-call ids that are not 9 alphanumerics.
        adapted = _short_ids(_fold_system(messages))
        if adapted == messages:
            raise InvalidRequest(f"the model's chat template cannot render this conversation: {first}") from None
        try:
            return tokenizer.apply_chat_template(adapted, **kwargs)
        except Exception as exc:
            raise InvalidRequest(f"the model's chat template cannot render this conversation: {exc}") from None


def _short_ids(messages: list[dict]) -> list[dict]:
    out = []
    for m in messages:
        if m.get("tool_calls"):
            m = m | {"tool_calls": [c | {"id": _short_id(c["id"])} for c in m["tool_calls"]]}
        if m.get("tool_call_id"):
            m = m | {"tool_call_id": _short_id(m["tool_call_id"])}
        out.append(m)
    return out


def _short_id(tool_use_id: str) -> str:
    # The same id always gives the same 9 characters: the history must not change.
    n = int.from_bytes(hashlib.sha256(tool_use_id.encode()).digest()[:8], "big")
    digits = string.ascii_letters + string.digits
    return "".join(digits[(n // 62**i) % 62] for i in range(9))


def _fold_system(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            m = {"role": "user", "content": f"<system-reminder>\n{m['content']}\n</system-reminder>"}
        _add(out, dict(m))
    return out
