"""Anthropic request -> chat messages -> the model's chat template -> token ids.

count_tokens and generation share this path, so they agree to the token.
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
import string
from typing import Any

import numpy as np
from msgspec import Struct

from . import families, pdf, signature
from .api import wire
from .families.base import Format
from .engine.cache import common_prefix
from .api.errors import InvalidRequest

BILLING_HEADER = "x-anthropic-billing-header:"
IMAGE_NOTE = "[the user attached an image, which this model cannot see]"
DOCUMENT_NOTE = "[the user attached a document that cannot be read as text: {why}]"


class Rendered(Struct, frozen=True):
    text: str
    ids: list[int]
    # The tools as function definitions, and the call format the model will write.
    tools: list[dict]
    format: Format
    # Whether the prompt ends inside an opened reasoning block.
    thinking_open: bool
    # Tokens of the leading system turn (system prompt and tools): the prefix that
    # Claude Code's main conversation, side requests and subagents share.
    checkpoint: int = 0
    # Images in the conversation, which reach the model as a note (it cannot see them).
    images: int = 0
    # For a model that sees: the images, where their tokens are, and the prompt as the
    # prefix cache keys it (vision.Images); None without images.
    seen_images: Any = None
    # Tokens before the generation prompt (the assistant turn's opening), 0 if unknown:
    # the next turn renders this one's answer from there, perhaps otherwise than it was
    # generated (Qwen3.5 leaves out earlier turns' reasoning once the user speaks again).
    reply_start: int = 0
    # Whether the last message is the user's own (not only tool results): the templates
    # that leave out reasoning do so for the turns before such a message.
    user_turn: bool = False

    @property
    def cache_key(self) -> list[int]:
        """The prompt as the prefix cache keys it: its ids, an image's tokens by the image."""
        return self.ids if self.seen_images is None else self.seen_images.keys


def render(request: wire.CountTokensRequest, tokenizer: Any, *, keep_billing_header: bool = False, vision: Any = None) -> Rendered:
    """The prompt for a request, as text and as token ids. `vision` (a vision.Vision): the
    model sees images, which become its template's image parts and its processor's tokens."""
    fmt = families.detect(tokenizer)
    seen = Seen(vision=vision is not None)
    messages, tools, template_tools = template_inputs(request, fmt, keep_billing_header=keep_billing_header, seen=seen)
    template = _Template(tokenizer, families.of(fmt), thinking_wanted(request), _effort(request))
    pictures: list = []
    if seen.pictures:
        messages, pictures = _image_parts(messages, seen.pictures)
    text, taken = template.apply(messages, template_tools)
    images = None
    if pictures:
        ids, images = vision.prepare(text, pictures)
    else:
        ids = list(tokenizer.encode(text, add_special_tokens=False))
    thinking_open = bool(fmt.think_start) and text.rstrip().endswith(fmt.think_start)
    return Rendered(
        text=text,
        ids=ids,
        tools=tools,
        format=fmt,
        thinking_open=thinking_open,
        checkpoint=_system_prefix(template, messages, template_tools, text, ids),
        images=seen.images,
        seen_images=images,
        reply_start=_reply_start(template, taken, template_tools, text, ids),
        user_turn=bool(taken) and taken[-1]["role"] == "user",
    )


# Where an image is, in a message's text until the template is given its parts: no
# family's handling of the history (folding tool results into user turns, ...) changes it.
_IMAGE_AT = re.compile("\u2063anyclaude image (\\d+)\u2063")


def _image_parts(messages: list[dict], pictures: list) -> tuple[list[dict], list]:
    """The messages with each image as an image content part, the text around it as text
    parts; and the pictures in the order the template renders them (the messages')."""
    out, ordered = [], []
    for message in messages:
        content = message.get("content")
        if not isinstance(content, str) or not _IMAGE_AT.search(content):
            out.append(message)
            continue
        parts: list[dict] = []
        for i, piece in enumerate(_IMAGE_AT.split(content)):
            if i % 2:
                parts.append({"type": "image"})
                ordered.append(pictures[int(piece)])
            elif piece.strip():
                parts.append({"type": "text", "text": piece})
        out.append(message | {"content": parts})
    return out, ordered


def template_inputs(
    request: wire.CountTokensRequest, fmt: Format, *, keep_billing_header: bool = False, seen: Seen | None = None
) -> tuple[list[dict], list[dict], list[dict] | None]:
    """What the chat template of a model whose format is `fmt` is given for a request:
    the chat messages, and the tools as OpenAI-style functions, all of them and those
    passed as the template's `tools` (None when the family writes them into the
    messages, as the generic format does for templates that know no tools)."""
    custom = [t for t in request.tools or [] if t.type in (None, "custom")]
    seen = seen or Seen()
    messages = chat_messages(request, keep_billing_header=keep_billing_header, seen=seen)
    messages, template_tools = families.of(fmt).inputs(messages, [_function(t) for t in custom if not t.defer_loading])
    # Deferred tools are callable once a tool_reference has defined them.
    tools = [_function(t) for t in custom if not t.defer_loading or t.name in seen.found]
    return messages, tools, template_tools


def chat_inputs(request: wire.CountTokensRequest, *, keep_billing_header: bool = False) -> tuple[list[dict], list[dict]]:
    """The chat messages and the tools (OpenAI-style functions) of a request, for a server
    that renders them itself (an OpenAI-API upstream)."""
    custom = [t for t in request.tools or [] if t.type in (None, "custom")]
    seen = Seen()
    messages = chat_messages(request, keep_billing_header=keep_billing_header, seen=seen)
    return messages, [_function(t) for t in custom if not t.defer_loading or t.name in seen.found]


class _Template:
    """A model's chat template, as its family uses it for one request."""

    def __init__(self, tokenizer: Any, family: families.Family, thinking: bool, effort: str | None):
        self.tokenizer, self.family = tokenizer, family
        # Templates with a reasoning switch read `enable_thinking`; the others ignore it.
        self.kwargs = {"enable_thinking": thinking} | family.template_kwargs(effort)

    def render(self, messages: list[dict], tools: list[dict] | None, **kwargs: Any) -> str:
        text = self.tokenizer.apply_chat_template(messages, tools=tools, tokenize=False, **self.kwargs, **kwargs)
        return self.family.rendered(text)

    def apply(self, messages: list[dict], tools: list[dict] | None) -> tuple[str, list[dict]]:
        """The whole prompt, ready for the reply or continuing a final assistant turn; and
        the messages as the template took them."""
        continue_final = bool(messages) and messages[-1]["role"] == "assistant"
        kwargs = dict(add_generation_prompt=not continue_final, continue_final_message=continue_final)
        try:
            return self.render(messages, tools, **kwargs), messages
        except Exception as first:
            # Many templates refuse a system turn after the first message; give them
            # the same text as a reminder inside the user turn instead of dropping it.
            # Mistral's v3 templates refuse tool-call ids that are not 9 alphanumerics.
            adapted = _short_ids(_fold_system(messages))
            if adapted == messages:
                raise InvalidRequest(f"the model's chat template cannot render this conversation: {first}") from None
            try:
                return self.render(adapted, tools, **kwargs), adapted
            except Exception as exc:
                raise InvalidRequest(f"the model's chat template cannot render this conversation: {exc}") from None


def _reply_start(template: _Template, messages: list[dict], tools, text: str, ids: list[int]) -> int:
    if not messages or messages[-1]["role"] == "assistant":  # continuing a turn: no opening
        return 0
    opening = _opening(template.tokenizer, template.family, tuple(template.kwargs.items()))
    if opening is None or not text.endswith(opening):
        # An opening that depends on the conversation: the conversation without it.
        try:
            head = template.render(messages, tools, add_generation_prompt=False)
        except Exception:
            return 0
        if len(head) >= len(text) or not text.startswith(head):
            return 0
        opening = text[len(head) :]
    # The opening's own tokens, where they end the prompt's (no merge across the boundary).
    tail = _encode(template.tokenizer, opening)
    if not 0 < len(tail) < len(ids) or list(ids[-len(tail) :]) != tail.tolist():
        return 0
    return len(ids) - len(tail)


@functools.lru_cache(maxsize=32)
def _opening(tokenizer, family, kwargs: tuple) -> str | None:
    """The generation prompt of a template with these settings, from a one-message probe
    (rendering a long conversation again would cost as much as rendering it), or None."""
    probe = [{"role": "user", "content": _PROBE}]

    def render(opened: bool) -> str:
        return family.rendered(tokenizer.apply_chat_template(probe, tokenize=False, add_generation_prompt=opened, **dict(kwargs)))

    try:
        whole, head = render(True), render(False)
    except Exception:
        return None
    return whole[len(head) :] if len(head) < len(whole) and whole.startswith(head) else None


# The user turn of the probe that finds where a template's system+tools prefix ends.
_PROBE = "\u2063anyclaude checkpoint probe\u2063"


def _system_prefix(template: _Template, messages: list[dict], tools, text: str, ids: list[int]) -> int:
    if len(messages) < 2 or messages[0]["role"] != "system":
        return 0
    shared = _shared_prefix(template, messages[0], tools, text)
    if not shared:
        return 0
    # Tokens can merge across the boundary; the checkpoint stops where they agree.
    return common_prefix(_encode(template.tokenizer, shared), np.asarray(ids))


def _shared_prefix(template: _Template, system: dict, tools, text: str) -> str:
    """The text every request with this system prompt and these tools starts with.

    The system turn alone, rendered, where it holds the system prompt and the tools.
    Many templates put them elsewhere: the tools in the first user turn (Llama 3.x) or
    before the last one (Mistral Small 3.x), the system prompt in the first user turn
    (Gemma) or the last (Nemo), or refuse a conversation without a user turn (Qwen3.5);
    for them it is what comes before a probe user turn, where that starts the prompt."""

    def rendered(messages: list[dict], tools) -> str:
        try:
            return template.render(messages, tools, add_generation_prompt=False)
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


def _effort(request: wire.CountTokensRequest) -> str | None:
    return request.output_config.effort if request.output_config else None


def thinking_wanted(request: wire.CountTokensRequest) -> bool:
    """Whether to switch the template's reasoning on: `enabled`, or `adaptive` unless effort
    is low; never for a forced call (tool_choice any or tool), written from the first token."""
    thinking = request.thinking
    if thinking is None or thinking.type == "disabled" or (request.tool_choice and request.tool_choice.type in ("any", "tool")):
        return False
    return thinking.type == "enabled" or _effort(request) != "low"


class Seen:
    """What rendering a conversation came across: the tools tool search found, images."""

    def __init__(self, vision: bool = False) -> None:
        self.found: set[str] = set()
        self.images = 0  # that the model cannot see
        # For a model that sees: the images, decoded, each marked in the text by its index.
        self.vision = vision
        self.pictures: list = []


def chat_messages(request: wire.CountTokensRequest, *, keep_billing_header: bool = False, seen: Seen | None = None) -> list[dict]:
    """The conversation as chat-template messages (system, user, assistant, tool)."""
    out: list[dict] = []
    tools = {t.name: t for t in request.tools or []}
    seen = seen or Seen()
    system = system_text(request.system, keep_billing_header=keep_billing_header)
    if system:
        out.append({"role": "system", "content": system})
    for i, message in enumerate(request.messages):
        blocks = wire.blocks(message.content, f"messages.{i}.content")
        if message.role == "assistant":
            merge(out, _assistant(blocks))
        elif message.role == "system":
            merge(out, {"role": "system", "content": _text(blocks, seen)})
        else:
            for turn in _user(blocks, tools, seen):
                merge(out, turn)
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


def _text(blocks: list[wire.Block], seen: Seen | None = None) -> str:
    parts = []
    for block in blocks:
        if isinstance(block, wire.TextBlock):
            parts.append(block.text)
        elif isinstance(block, wire.ImageBlock):
            if seen and seen.vision and (block.source or {}).get("type") == "base64":
                from .vision import decode

                parts.append(f"\u2063anyclaude image {len(seen.pictures)}\u2063")
                seen.pictures.append(decode(block.source))
                continue
            parts.append(IMAGE_NOTE)
            if seen:
                seen.images += 1
        elif isinstance(block, wire.DocumentBlock):
            parts.append(_document(block))
        elif isinstance(block, wire.MidConversationSystemBlock):
            parts.append(_text(wire.blocks(block.content, "content"), seen))
    return "\n\n".join(p for p in parts if p)


def _document(block: wire.DocumentBlock) -> str:
    source = block.source or {}
    title = f"{block.title}\n\n" if block.title else ""
    kind, data = source.get("type"), source.get("data")
    if kind == "text" and isinstance(data, str):
        return title + data
    if kind == "base64" and source.get("media_type") == "application/pdf" and isinstance(data, str):
        try:
            return title + pdf.text(data)
        except ValueError as e:
            return DOCUMENT_NOTE.format(why=f"a PDF, but {e}")
    if kind == "content":  # a list of text blocks (or a string)
        content = source.get("content")
        parts = [content] if isinstance(content, str) else [b.get("text", "") for b in content or [] if isinstance(b, dict)]
        return title + "\n\n".join(p for p in parts if isinstance(p, str) and p)
    return DOCUMENT_NOTE.format(why=source.get("media_type") or kind or "no source")


def _assistant(blocks: list[wire.Block]) -> dict:
    text = _text([b for b in blocks if isinstance(b, wire.TextBlock)])
    turn: dict = {"role": "assistant", "content": text}
    # Reasoning goes back as `reasoning_content`: the templates that keep it within a
    # tool loop (Qwen3, GLM, MiniMax; gpt-oss's family renames it) render it as the model
    # wrote it, so the prompt stays the generated tokens; the others ignore it. A block
    # sent without its text (display "omitted") has it in its signature.
    thoughts = (b.thinking or signature.unseal(b.signature) for b in blocks if isinstance(b, wire.ThinkingBlock))
    if reasoning := "\n\n".join(t for t in thoughts if t):
        turn["reasoning_content"] = reasoning
    calls = [
        {"type": "function", "id": b.id, "function": {"name": b.name, "arguments": b.input}}
        for b in blocks
        if isinstance(b, wire.ToolUseBlock)
    ]
    if calls:
        turn["tool_calls"] = calls
    return turn


def _user(blocks: list[wire.Block], tools: dict[str, wire.Tool], seen: Seen) -> list[dict]:
    """A user message as turns: tool results become tool turns, in order, text around them user turns."""
    turns: list[dict] = []
    pending: list[wire.Block] = []

    def flush() -> None:
        if text := _text(pending, seen):
            turns.append({"role": "user", "content": text})
        pending.clear()

    for block in blocks:
        if isinstance(block, wire.ToolResultBlock):
            flush()
            turns.append({"role": "tool", "tool_call_id": block.tool_use_id, "content": _tool_result(block, tools, seen)})
        elif isinstance(block, wire.MidConversationSystemBlock):
            flush()
            turns.append({"role": "system", "content": _text([block], seen)})
        else:
            pending.append(block)
    flush()
    return turns


def _tool_result(block: wire.ToolResultBlock, tools: dict[str, wire.Tool], seen: Seen) -> str:
    content = wire.blocks(block.content, "tool_result.content")
    text = _text(content, seen)
    if found := [b.tool_name for b in content if isinstance(b, wire.ToolReferenceBlock)]:
        seen.found.update(found)
        text = "\n\n".join(p for p in (text, _definitions(found, tools)) if p)
    return f"Error: {text}" if block.is_error else text


def _definitions(names: list[str], tools: dict[str, wire.Tool]) -> str:
    """Tools a search found, defined where it found them: rendered there, not with the
    other tools, so that the prompt before them (and its cache) stays as it was."""
    known = [tools[n] for n in dict.fromkeys(names) if n in tools]
    lines = [json.dumps(_function(t), ensure_ascii=False) for t in known]
    missing = [n for n in names if n not in tools]
    parts = ["These tools can be called from now on, like the others:\n<tools>\n" + "\n".join(lines) + "\n</tools>"] if lines else []
    if missing:
        parts.append("No tool is named " + ", ".join(missing) + ".")
    return "\n\n".join(parts)


def merge(out: list[dict], turn: dict) -> None:
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


def fold_system(messages: list[dict]) -> list[dict]:
    """System turns after the first as user turns that say they are (`<system-reminder>`),
    for templates and servers that take a system message at the start only."""
    return _fold_system(messages)


def _fold_system(messages: list[dict]) -> list[dict]:
    out: list[dict] = []
    for i, m in enumerate(messages):
        if m["role"] == "system" and i > 0:
            m = {"role": "user", "content": f"<system-reminder>\n{m['content']}\n</system-reminder>"}
        merge(out, dict(m))
    return out
