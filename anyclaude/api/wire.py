"""The Anthropic Messages API as msgspec types: lenient requests in, strict events out."""

from __future__ import annotations

import re
from typing import Any, Literal, Union

import msgspec
import numpy as np
from msgspec import Raw, Struct

from .errors import InvalidRequest

# ---------------------------------------------------------------------------
# Requests. Unknown fields are ignored (msgspec's default); unknown content
# block types are dropped in `blocks()`, since new ones appear with each beta.


class TextBlock(Struct, tag="text", tag_field="type"):
    text: str


class ImageBlock(Struct, tag="image", tag_field="type"):
    source: dict[str, Any] | None = None


class DocumentBlock(Struct, tag="document", tag_field="type"):
    source: dict[str, Any] | None = None
    title: str | None = None


class ThinkingBlock(Struct, tag="thinking", tag_field="type"):
    thinking: str = ""
    signature: str = ""


class RedactedThinkingBlock(Struct, tag="redacted_thinking", tag_field="type"):
    data: str = ""


class ToolUseBlock(Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any] = {}


class ToolResultBlock(Struct, tag="tool_result", tag_field="type"):
    tool_use_id: str
    content: str | list[Raw] | None = None
    is_error: bool = False


class MidConversationSystemBlock(Struct, tag="mid_conv_system", tag_field="type"):
    content: str | list[Raw] = ""


class ToolReferenceBlock(Struct, tag="tool_reference", tag_field="type"):
    """Tool search's answer, in a tool_result: the tool named is defined from here on."""

    tool_name: str


Block = Union[
    TextBlock,
    ImageBlock,
    DocumentBlock,
    ThinkingBlock,
    RedactedThinkingBlock,
    ToolUseBlock,
    ToolResultBlock,
    MidConversationSystemBlock,
    ToolReferenceBlock,
]


class Message(Struct):
    role: Literal["user", "assistant", "system"]
    content: str | list[Raw]


class Tool(Struct):
    name: str
    description: str = ""
    input_schema: dict[str, Any] = {}
    type: str | None = None
    # Tool search: kept out of the prompt until a tool_reference names it.
    defer_loading: bool = False


class ToolChoice(Struct):
    type: Literal["auto", "any", "tool", "none"] = "auto"
    name: str | None = None
    disable_parallel_tool_use: bool = False


class Thinking(Struct):
    type: str = "disabled"
    budget_tokens: int | None = None
    display: str | None = None


class OutputConfig(Struct):
    effort: str | None = None


class Metadata(Struct):
    user_id: str | None = None


class CountTokensRequest(Struct, kw_only=True):
    model: str
    messages: list[Message]
    system: str | list[Raw] | None = None
    tools: list[Tool] | None = None
    tool_choice: ToolChoice | None = None
    thinking: Thinking | None = None
    output_config: OutputConfig | None = None


class MessagesRequest(CountTokensRequest, kw_only=True):
    max_tokens: int
    stream: bool = False
    stop_sequences: list[str] | None = None
    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    metadata: Metadata | None = None


_block_decoder = msgspec.json.Decoder(Block)
_request_decoders = {
    MessagesRequest: msgspec.json.Decoder(MessagesRequest),
    CountTokensRequest: msgspec.json.Decoder(CountTokensRequest),
}
_BLOCK_TYPES = {b.__struct_config__.tag for b in Block.__args__}


class _Typed(Struct):
    type: str = ""


_type_decoder = msgspec.json.Decoder(_Typed)


# Limits a daemon on a person's machine keeps, whatever a client sends. JSON nested
# deeper than this is refused before decoding: rendering, grammars and schema checks
# recurse, and a deep enough body would exhaust the stack in any of them.
MAX_DEPTH = 64
MAX_MODEL_NAME = 256
MAX_TOOL_NAME = 128  # Anthropic's own limit for a tool's name
MAX_STOP_SEQUENCES = 256
MAX_STOP_SEQUENCE = 1000
_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
_NOT_BRACKETS = bytes(b for b in range(256) if b not in b"[]{}")


def depth(body: bytes) -> int:
    """How deeply valid JSON text nests arrays and objects (brackets in strings do not count)."""
    brackets = np.frombuffer(_STRING.sub(b"", body).translate(None, _NOT_BRACKETS), dtype=np.uint8)
    if not brackets.size:
        return 0
    steps = np.where((brackets == ord("[")) | (brackets == ord("{")), 1, -1)
    return int(np.cumsum(steps).max())


def decode_request(body: bytes, kind: type[CountTokensRequest] = MessagesRequest):
    """Decode a request body, turning every failure into a 400 naming the field."""
    try:
        request = _request_decoders[kind].decode(body)
    except msgspec.ValidationError as exc:
        raise InvalidRequest(_field_message(str(exc))) from None
    except msgspec.DecodeError as exc:
        raise InvalidRequest(f"The request body is not valid JSON: {exc}") from None
    except UnicodeDecodeError as exc:
        raise InvalidRequest(f"The request body is not valid UTF-8 ({exc.reason})") from None
    except RecursionError:
        raise InvalidRequest(f"The request body nests JSON more than {MAX_DEPTH} levels deep") from None
    # Only on valid JSON: every string in it is closed, so the scan is linear.
    if depth(body) > MAX_DEPTH:
        raise InvalidRequest(f"The request body nests JSON more than {MAX_DEPTH} levels deep")
    _check(request)
    return request


def _check(request: CountTokensRequest) -> None:
    if not request.messages:
        raise InvalidRequest("messages: at least one message is required")
    if len(request.model) > MAX_MODEL_NAME:
        raise InvalidRequest(f"model: a model name has at most {MAX_MODEL_NAME} characters")
    for i, tool in enumerate(request.tools or []):
        if not tool.name:
            raise InvalidRequest(f"tools.{i}.name: must be non-empty")
        if len(tool.name) > MAX_TOOL_NAME:
            raise InvalidRequest(f"tools.{i}.name: a tool name has at most {MAX_TOOL_NAME} characters")
    if request.tool_choice and request.tool_choice.name is not None and len(request.tool_choice.name) > MAX_TOOL_NAME:
        raise InvalidRequest(f"tool_choice.name: a tool name has at most {MAX_TOOL_NAME} characters")
    thinking = request.thinking
    if thinking and thinking.budget_tokens is not None and thinking.budget_tokens < 0:
        raise InvalidRequest("thinking.budget_tokens: must be greater than or equal to 0")
    if not isinstance(request, MessagesRequest):
        return
    if request.max_tokens < 1:
        raise InvalidRequest("max_tokens: must be greater than or equal to 1")
    stops = request.stop_sequences or []
    if any(not s for s in stops):
        raise InvalidRequest("stop_sequences: stop sequences must be non-empty")
    if len(stops) > MAX_STOP_SEQUENCES or any(len(s) > MAX_STOP_SEQUENCE for s in stops):
        raise InvalidRequest(f"stop_sequences: at most {MAX_STOP_SEQUENCES}, of at most {MAX_STOP_SEQUENCE} characters each")
    if request.temperature is not None and not 0.0 <= request.temperature <= 2.0:
        raise InvalidRequest("temperature: must be between 0 and 2")
    if request.top_p is not None and not 0.0 <= request.top_p <= 1.0:
        raise InvalidRequest("top_p: must be between 0 and 1")
    if request.top_k is not None and request.top_k < 0:
        raise InvalidRequest("top_k: must be greater than or equal to 0")


def blocks(content: str | list[Raw] | None, where: str) -> list[Block]:
    """The known content blocks of a message; unknown block types are dropped."""
    if content is None:
        return []
    if isinstance(content, str):
        return [TextBlock(text=content)]
    out: list[Block] = []
    for i, raw in enumerate(content):
        try:
            kind = _type_decoder.decode(raw).type
            if kind in _BLOCK_TYPES:
                out.append(_block_decoder.decode(raw))
        except msgspec.ValidationError as exc:
            raise InvalidRequest(_field_message(str(exc), f"{where}.{i}")) from None
    return out


_PATH = re.compile(r" - at `\$(?P<path>[^`]*)`$")
_MISSING = re.compile(r"Object missing required field `(?P<field>[^`]+)`")


def _field_message(msgspec_message: str, prefix: str = "") -> str:
    """`Expected int, got str - at $.messages[0].x` -> `messages.0.x: Expected int, got str`."""
    path = ""
    message = msgspec_message
    if m := _PATH.search(message):
        path = m["path"]
        message = message[: m.start()]
    path = re.sub(r"\[(\d+)\]", r".\1", path).lstrip(".")
    if m := _MISSING.match(message):
        path = f"{path}.{m['field']}" if path else m["field"]
        message = "Field required"
    if prefix:
        path = f"{prefix}.{path}" if path else prefix
    return f"{path}: {message}" if path else message


# ---------------------------------------------------------------------------
# Responses: the events of reference §1 and the Message of §2.


class Usage(Struct):
    input_tokens: int
    output_tokens: int
    cache_creation_input_tokens: int = 0
    cache_read_input_tokens: int = 0


class TextContent(Struct, tag="text", tag_field="type"):
    text: str = ""


class ThinkingContent(Struct, tag="thinking", tag_field="type"):
    thinking: str = ""
    signature: str = ""


class ToolUseContent(Struct, tag="tool_use", tag_field="type"):
    id: str
    name: str
    input: dict[str, Any] = {}


Content = Union[TextContent, ThinkingContent, ToolUseContent]


class MessageBody(Struct, tag="message", tag_field="type"):
    id: str
    model: str
    content: list[Content]
    stop_reason: str | None
    stop_sequence: str | None
    usage: Usage
    role: str = "assistant"


class TextDelta(Struct, tag="text_delta", tag_field="type"):
    text: str


class InputJsonDelta(Struct, tag="input_json_delta", tag_field="type"):
    partial_json: str


class ThinkingDelta(Struct, tag="thinking_delta", tag_field="type"):
    thinking: str


class SignatureDelta(Struct, tag="signature_delta", tag_field="type"):
    signature: str


Delta = Union[TextDelta, InputJsonDelta, ThinkingDelta, SignatureDelta]


class MessageStart(Struct, tag="message_start", tag_field="type"):
    message: MessageBody


class ContentBlockStart(Struct, tag="content_block_start", tag_field="type"):
    index: int
    content_block: Content


class ContentBlockDelta(Struct, tag="content_block_delta", tag_field="type"):
    index: int
    delta: Delta


class ContentBlockStop(Struct, tag="content_block_stop", tag_field="type"):
    index: int


class StopInfo(Struct):
    stop_reason: str
    stop_sequence: str | None = None


class DeltaUsage(Struct, omit_defaults=True):
    output_tokens: int
    input_tokens: int | None = None
    cache_read_input_tokens: int | None = None


class MessageDelta(Struct, tag="message_delta", tag_field="type"):
    delta: StopInfo
    usage: DeltaUsage


class MessageStop(Struct, tag="message_stop", tag_field="type"):
    pass


class Ping(Struct, tag="ping", tag_field="type"):
    pass


Event = Union[MessageStart, ContentBlockStart, ContentBlockDelta, ContentBlockStop, MessageDelta, MessageStop, Ping]


class TokenCount(Struct):
    input_tokens: int


class ModelInfo(Struct, tag="model", tag_field="type"):
    id: str
    display_name: str
    created_at: str
    max_input_tokens: int | None = None
    max_tokens: int | None = None


class ModelList(Struct):
    data: list[ModelInfo]
    has_more: bool
    first_id: str | None
    last_id: str | None


encoder = msgspec.json.Encoder()
