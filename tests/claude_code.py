"""Requests shaped like Claude Code 2.1's (reference §0), built for tests."""

from __future__ import annotations

SCHEMA = "https://json-schema.org/draft/2020-12/schema"
TOOL_NAMES = [
    "Agent", "Bash", "CronCreate", "CronDelete", "CronList", "Edit", "EnterWorktree", "ExitWorktree",
    "NotebookEdit", "Read", "ReportFindings", "ScheduleWakeup", "SendMessage", "Skill", "TaskCreate",
    "TaskGet", "TaskList", "TaskOutput", "TaskStop", "TaskUpdate", "WebFetch", "WebSearch", "Workflow", "Write",
]  # fmt: skip

READ_SCHEMA = {
    "$schema": SCHEMA,
    "type": "object",
    "properties": {
        "file_path": {"type": "string", "description": "The absolute path to the file to read"},
        "offset": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991},
        "limit": {"type": "integer", "exclusiveMinimum": 0, "maximum": 9007199254740991},
    },
    "required": ["file_path"],
    "additionalProperties": False,
}


def _schema(name: str) -> dict:
    # Each feature of the captured schemas appears somewhere in the set.
    special = {
        "Read": READ_SCHEMA,
        "CronList": {"$schema": SCHEMA, "type": "object", "properties": {}, "additionalProperties": False},
        "TaskList": {"$schema": SCHEMA, "type": "object", "properties": {}},
        "TaskUpdate": {
            "$schema": SCHEMA,
            "type": "object",
            "properties": {
                "taskId": {"type": "string"},
                "status": {"anyOf": [{"const": "pending"}, {"const": "in_progress"}, {"const": "completed"}]},
                "metadata": {"type": "object", "propertyNames": {"type": "string"}, "additionalProperties": {}},
            },
            "required": ["taskId"],
            "additionalProperties": False,
        },
        "WebFetch": {
            "$schema": SCHEMA,
            "type": "object",
            "properties": {"url": {"type": "string", "format": "uri"}, "prompt": {"type": "string", "minLength": 1}},
            "required": ["url", "prompt"],
            "additionalProperties": False,
        },
        "Workflow": {
            "$schema": SCHEMA,
            "type": "object",
            "properties": {"name": {"type": "string", "pattern": "^[a-z-]+$"}, "args": {"description": "Anything"}},
            "required": ["name"],
            "additionalProperties": False,
        },
        "Write": {
            "$schema": SCHEMA,
            "type": "object",
            "properties": {
                "file_path": {"type": "string"},
                "content": {"type": "string", "maxLength": 524288},
                "mode": {"type": "string", "enum": ["create", "overwrite"], "default": "create"},
                "paths": {"type": "array", "items": {"type": "string"}, "maxItems": 8},
            },
            "required": ["file_path", "content"],
            "additionalProperties": False,
        },
    }
    return special.get(
        name,
        {
            "$schema": SCHEMA,
            "type": "object",
            "properties": {"value": {"type": "string"}},
            "required": ["value"],
        },
    )


def tools(description_words: int = 4) -> list[dict]:
    return [
        {"name": n, "description": f"{n}: " + " ".join(["does its job"] * description_words), "input_schema": _schema(n)}
        for n in TOOL_NAMES
    ]


def first_turn(*, description_words: int = 4, system_words: int = 20, max_tokens: int = 64000, stream: bool = True) -> dict:
    """Claude Code's first request: billing header, cached system blocks, a trailing system turn."""
    return {
        "model": "claude-opus-4-8",
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "<system-reminder>\nToday's date is 2026-11-25.\n</system-reminder>"},
                    {"type": "text", "text": "say hi", "cache_control": {"type": "ephemeral"}},
                ],
            },
            {"role": "system", "content": "Available agent types: general-purpose. Skills: none."},
        ],
        "system": [
            {"type": "text", "text": "x-anthropic-billing-header: cc_version=2.1.197.123; cc_entrypoint=sdk-cli;"},
            {"type": "text", "text": "You are a Claude agent, built on Anthropic's Claude Agent SDK.", "cache_control": {"type": "ephemeral"}},
            {"type": "text", "text": " ".join(["Be brief and helpful."] * system_words), "cache_control": {"type": "ephemeral"}},
        ],
        "tools": tools(description_words),
        "metadata": {"user_id": '{"device_id":"' + "a" * 64 + '","account_uuid":"","session_id":"0b6f6c3e-1111-2222-3333-444455556666"}'},
        "max_tokens": max_tokens,
        "thinking": {"type": "adaptive"},
        "context_management": {"edits": [{"type": "clear_thinking_20251015", "keep": "all"}]},
        "output_config": {"effort": "high"},
        "stream": stream,
    }


HEADERS = {
    "accept": "application/json",
    "user-agent": "claude-cli/2.1.197 (external, sdk-cli)",
    "x-claude-code-session-id": "0b6f6c3e-1111-2222-3333-444455556666",
    "x-app": "cli",
    "anthropic-version": "2023-06-01",
    "anthropic-beta": "claude-code-20250219,context-1m-2025-08-07,interleaved-thinking-2025-05-14,"
    "context-management-2025-06-27,mid-conversation-system-2026-04-07,effort-2025-11-24",
    "anthropic-dangerous-direct-browser-access": "true",
    "x-api-key": "sk-local-test",
    "x-stainless-retry-count": "0",
    "x-stainless-timeout": "600",
}
