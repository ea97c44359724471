"""A Claude-Code-shaped conversation, generated deterministically, for the cache benchmark.

A system prompt and eighteen tools (about 1,500 tokens rendered on the tiny
model's tokenizer), then turns that each append the assistant's answer as it came
back, a tool_use/tool_result pair and a short user message, the way Claude Code's
agent loop grows its prompt. Side requests (haiku) and a second session share only
the system prompt and tools.

Requests are built in Anthropic form; `openai_messages` turns one into the chat
messages an OpenAI-style server needs to see the same prompt.
"""

from __future__ import annotations

import json

SYSTEM = """You are an interactive command line tool that helps users with software engineering tasks. \
Use the instructions below and the tools available to you to assist the user.

IMPORTANT: Refuse to write code or explain code that may be used maliciously. Do not guess URLs.

# Tone and style
You should be concise, direct, and to the point. Your output is displayed on a command line \
interface and rendered as GitHub-flavored markdown in a monospace font. Answer the user's question \
directly, without elaboration, explanation, or details, unless the user asks for them. One word \
answers are best. Avoid introductions, conclusions, and explanations of what you did.

# Doing tasks
The user will primarily request you perform software engineering tasks: solving bugs, adding new \
functionality, refactoring code, explaining code. Use the search tools extensively to understand the \
codebase and the user's query. Implement the solution using all tools available to you. Verify the \
solution with the project's tests; never assume a specific test framework or test script. When you \
have completed a task, run the lint and typecheck commands if they were provided to you.

<env>
Working directory: /home/user/project
Is directory a git repo: Yes
Platform: linux
</env>"""

# name, description, parameters (all required) and their JSON types.
# Parameter descriptions and optional parameters are left out to keep the prefix near
# 1,500 tokens on this tokenizer (JSON schemas are token-hungry).
_TOOLS = [
    ("Task", "Launch an agent for a multi-step task.", {"description": "string", "prompt": "string"}),
    ("Bash", "Run a bash command in a persistent shell.", {"command": "string"}),
    ("Glob", "Find files by glob pattern.", {"pattern": "string"}),
    ("Grep", "Search file contents with ripgrep.", {"pattern": "string"}),
    ("LS", "List a directory.", {"path": "string"}),
    ("ExitPlanMode", "Leave plan mode with a plan.", {"plan": "string"}),
    ("Read", "Read a file from the local filesystem.", {"file_path": "string"}),
    ("Edit", "Replace an exact string in a file.", {"file_path": "string", "old_string": "string", "new_string": "string"}),
    ("MultiEdit", "Make several edits to one file.", {"file_path": "string", "edits": "array"}),
    ("Write", "Write a file, overwriting it.", {"file_path": "string", "content": "string"}),
    ("NotebookEdit", "Replace a Jupyter notebook cell.", {"notebook_path": "string", "new_source": "string"}),
    ("WebFetch", "Fetch a URL and process its content.", {"url": "string", "prompt": "string"}),
    ("TodoWrite", "Update the todo list of the session.", {"todos": "array"}),
    ("WebSearch", "Search the web.", {"query": "string"}),
    ("BashOutput", "Get output from a background shell.", {"bash_id": "string"}),
    ("KillShell", "Kill a background shell.", {"shell_id": "string"}),
    ("SlashCommand", "Run a slash command.", {"command": "string"}),
    ("AskUserQuestion", "Ask the user a question.", {"question": "string"}),
]


def tools() -> list[dict]:
    """The tools, in Anthropic form."""
    return [
        {"name": name, "description": description, "input_schema": {"type": "object", "properties": {p: {"type": t} for p, t in params.items()}, "required": list(params)}}
        for name, description, params in _TOOLS
    ]


MAIN = [
    "The tests in tests/test_parser.py fail after my last change. Find out why.",
    "Look at the tokenizer module next.",
    "Is the bug in the error handling?",
    "Fix it with the smallest change.",
    "Now run the tests again.",
    "Summarise what you changed.",
]
SECOND = [
    "Add a --verbose flag to the CLI.",
    "Where are the other flags defined?",
    "Use the same style as --quiet.",
    "Update the help text too.",
    "Run the CLI tests.",
    "Write a short commit message.",
]
SIDE = [
    "Write a 5-10 word title for this conversation.",
    "Is this a new topic? Answer yes or no.",
    "Summarise the last command in five words.",
    "Extract the file paths the user mentioned.",
    "Suggest a one-line commit message.",
    "Write a 5-10 word title for this task.",
]
AFTER_RESTART = "Explain what src/config.py does."


def _file_listing(session: str, turn: int) -> str:
    # A tool result the size of a short Read: about seventy tokens, different each turn.
    lines = [f"     {i + 1}\tdef step_{session}_{turn}_{i}(value):" if i % 3 == 0 else f"     {i + 1}\t    return value + {turn * 10 + i}" for i in range(6)]
    return "\n".join(lines)


class Session:
    """One conversation's messages, grown turn by turn from the answers that came back."""

    def __init__(self, name: str, users: list[str]):
        self.name = name
        self.users = users
        self.turn = 0
        self.messages: list[dict] = [{"role": "user", "content": users[0]}]

    def advance(self, answer: list[dict]) -> None:
        """Append the answer (Anthropic content blocks, as returned), a tool call and its
        result, and the next user message."""
        self.turn += 1
        call_id = f"toolu_{self.name}_{self.turn:02d}"
        call = {"type": "tool_use", "id": call_id, "name": "Read", "input": {"file_path": f"/home/user/project/src/{self.name}_{self.turn}.py"}}
        assistant = [dict(b) for b in answer if b.get("type") in ("text", "tool_use")]
        if not any(b["type"] == "text" and b["text"] for b in assistant):
            assistant.insert(0, {"type": "text", "text": "Let me look."})
        results = [
            # Calls the model made itself are answered too, so the history stays valid.
            {"type": "tool_result", "tool_use_id": b["id"], "content": "Not run in this benchmark."}
            for b in assistant
            if b["type"] == "tool_use"
        ]
        results.append({"type": "tool_result", "tool_use_id": call_id, "content": _file_listing(self.name, self.turn)})
        reminder = "<system-reminder>\nThe TodoWrite tool hasn't been used recently.\n</system-reminder>"
        self.messages += [
            {"role": "assistant", "content": [*assistant, call]},
            {"role": "user", "content": [*results, {"type": "text", "text": reminder}, {"type": "text", "text": self.users[self.turn]}]},
        ]


def anthropic_body(messages: list[dict], *, model: str = "claude-opus-4-8", max_tokens: int = 24) -> dict:
    """A streaming Messages API request with the shared system prompt and tools."""
    return {
        "model": model,
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "system": [{"type": "text", "text": SYSTEM}],
        "tools": tools(),
        "messages": messages,
    }


def text_answer(text: str) -> list[dict]:
    """An answer given as plain text (from an OpenAI-style server or in-process generation)."""
    return [{"type": "text", "text": text}]


def openai_messages(body: dict, tokenizer) -> tuple[list[dict], list[dict] | None]:
    """The chat messages (and tools, if they stay separate) that render, with the model's
    template, to the prompt anyclaude builds for `body`.

    The tiny model's chat template knows no tools: given `tools=`, it drops them (and the
    tool calls in the history), so an OpenAI server would prefill a far shorter prompt.
    anyclaude writes them into the system turn in its generic tool format for such
    templates; we ask it for the same messages so both servers prefill the same tokens.
    """
    from anyclaude import families, prompt
    from anyclaude.api import wire

    messages, _, tools = prompt.template_inputs(wire.decode_request(json.dumps(body).encode()), families.detect(tokenizer))
    if not tools:
        return messages, None
    for m in messages:  # OpenAI sends tool-call arguments as JSON text
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = json.dumps(call["function"]["arguments"])
    return messages, tools


def prompt_ids(body: dict, tokenizer) -> list[int]:
    """The token ids anyclaude prefills for `body` (for the in-process reference)."""
    from anyclaude import prompt
    from anyclaude.api import wire

    return prompt.render(wire.decode_request(json.dumps(body).encode()), tokenizer).ids
