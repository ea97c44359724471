"""The errors anyclaude answers with, and their Anthropic envelope."""

from __future__ import annotations

import msgspec


class AnthropicError(Exception):
    """An error that reaches the client as Anthropic's error envelope."""

    status = 500
    type = "api_error"

    def __init__(self, message: str, *, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}


class InvalidRequest(AnthropicError):
    status = 400
    type = "invalid_request_error"


class Unauthorized(AnthropicError):
    status = 401
    type = "authentication_error"


class NotFound(AnthropicError):
    status = 404
    type = "not_found_error"


class RequestTooLarge(AnthropicError):
    status = 413
    type = "request_too_large"


class Overloaded(AnthropicError):
    status = 529
    type = "overloaded_error"


class NotReady(AnthropicError):
    # 503 while a model loads: the SDKs and Claude Code retry it.
    status = 503
    type = "overloaded_error"


class ApiError(AnthropicError):
    status = 500
    type = "api_error"


class _ErrorBody(msgspec.Struct):
    type: str
    message: str


class ErrorEnvelope(msgspec.Struct, tag="error", tag_field="type"):
    error: _ErrorBody
    request_id: str


def envelope(exc: AnthropicError, request_id: str) -> ErrorEnvelope:
    """The body (and the SSE `error` event) for an error."""
    return ErrorEnvelope(error=_ErrorBody(type=exc.type, message=exc.message), request_id=request_id)


# The fewest tokens a prompt must leave for its answer (or max_tokens, if smaller): a
# prompt that leaves less is refused with prompt_too_long rather than answered in a handful.
ANSWER_FLOOR = 1024


def prompt_too_long(tokens: int, maximum: int) -> InvalidRequest:
    # Claude Code matches this wording to compact the conversation.
    return InvalidRequest(f"prompt is too long: {tokens} tokens > {maximum} maximum")
