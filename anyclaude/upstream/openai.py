"""An upstream that speaks OpenAI's chat completions (mlx_lm.server, vLLM, SGLang, LM
Studio, Ollama, llama-cpp-python): the request translated, the streamed chunks read back
into text, thinking and tool calls, each call validated and repaired as a local one is."""

from __future__ import annotations

import json

from .. import prompt, repair, toolcalls
from ..api import wire
from ..toolcalls import BadCall, Text, Thinking
from .base import Broke, Ended, Output, Usage, usage_of, whole_json

PATH = "/v1/chat/completions"

# finish_reason -> stop_reason
_STOPS = {"stop": "end_turn", "length": "max_tokens", "tool_calls": "tool_use", "function_call": "tool_use", "content_filter": "refusal"}


def body(raw: dict, request: wire.MessagesRequest, model, max_tokens: int, *, keep_billing_header: bool) -> dict:
    messages, tools = prompt.chat_inputs(request, keep_billing_header=keep_billing_header)
    out: dict = {
        "model": model.upstream_model or request.model,
        # Only the first system message is taken everywhere; later ones say what they are.
        "messages": [_message(m) for m in prompt.fold_system(messages)],
        "max_tokens": max_tokens,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    for key in ("temperature", "top_p", "top_k"):
        if (value := getattr(request, key)) is not None:
            out[key] = value
    if request.stop_sequences:
        out["stop"] = request.stop_sequences
    choice = request.tool_choice
    if tools and not (choice and choice.type == "none"):
        out["tools"] = tools
        if choice is not None:
            out["tool_choice"] = {"auto": "auto", "any": "required"}.get(choice.type) or {"type": "function", "function": {"name": choice.name}}
            if choice.disable_parallel_tool_use:
                out["parallel_tool_calls"] = False
    if request.thinking is not None:
        # vLLM's and SGLang's switch for the reasoning of templates that have one (Qwen3 and others).
        out["chat_template_kwargs"] = {"enable_thinking": prompt.thinking_wanted(request)}
    return out


def _message(turn: dict) -> dict:
    out = {"role": turn["role"], "content": turn.get("content") or ""}
    if turn.get("tool_calls"):
        out["tool_calls"] = [
            {"id": c["id"], "type": "function", "function": {"name": c["function"]["name"], "arguments": json.dumps(c["function"]["arguments"], ensure_ascii=False)}}
            for c in turn["tool_calls"]
        ]
        # "" rather than null: templates that add the content to a string fail on null.
    if turn.get("tool_call_id"):
        out["tool_call_id"] = turn["tool_call_id"]
    return out


def headers(forwarded: dict[str, str]) -> dict[str, str]:
    # Claude Code's session header lets a server that routes by session (SGLang's router) keep its cache.
    hints = {k: v for k, v in forwarded.items() if k.startswith("x-claude-code-")}
    return {"content-type": "application/json", "accept": "text/event-stream", **hints}


class Reader:
    """Chat-completion chunks as the events of `base`. A call's arguments are gathered
    until the call ends, then repaired and checked against its tool's schema: what is
    streamed to the client cannot be taken back."""

    def __init__(self, tools: list[dict] | None = None, stop_sequences: list[str] | None = None):
        self.done = False
        self._tools = toolcalls.functions(tools)
        self._stops = stop_sequences or []
        self._calls: dict[int, list[str]] = {}  # index -> [name, arguments so far]
        self._finish: str | None = None
        self._matched: str | None = None

    @classmethod
    def for_request(cls, request: wire.MessagesRequest) -> Reader:
        _, tools = prompt.chat_inputs(request)
        return cls(tools, request.stop_sequences)

    def feed(self, name: str, data: str) -> list:
        if data.strip() == "[DONE]":
            return self._end()
        chunk = json.loads(data)
        if not isinstance(chunk, dict):
            raise ValueError("a chunk that is not a JSON object")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else str(error)
            self.done = True
            return [Broke(f"upstream: {message}", overloaded=True)]
        events: list = []
        for choice in chunk.get("choices") or []:
            if choice.get("index", 0) != 0:
                continue
            events += self._delta(choice.get("delta") or choice.get("message") or {})
            if choice.get("finish_reason"):
                self._finish = choice["finish_reason"]
                # vLLM says which stop string ended it.
                if isinstance(choice.get("stop_reason"), str) and choice["stop_reason"] in self._stops:
                    self._matched = choice["stop_reason"]
        if usage := usage_of(chunk.get("usage")):
            prompt_tokens = usage.get("prompt_tokens")
            cached = usage_of(usage.get("prompt_tokens_details")).get("cached_tokens") or 0
            events.append(
                Usage(
                    input_tokens=prompt_tokens - cached if isinstance(prompt_tokens, int) else None,
                    output_tokens=usage.get("completion_tokens") if isinstance(usage.get("completion_tokens"), int) else None,
                    cache_read=cached if isinstance(prompt_tokens, int) else None,
                )
            )
        return events

    def close(self) -> list:
        """The stream ended without [DONE]: the end, if a finish_reason came; a hang-up if not."""
        if self._finish is not None:
            return self._end()
        self.done = True
        return [Broke("the upstream ended the stream before the answer's end; retry")]

    def _delta(self, delta: dict) -> list:
        segments: list = []
        reasoning = delta.get("reasoning_content") or delta.get("reasoning")
        if isinstance(reasoning, str) and reasoning:
            segments += self._calls_done()
            segments.append(Thinking(reasoning))
        if isinstance(delta.get("content"), str) and delta["content"]:
            segments += self._calls_done()
            segments.append(Text(delta["content"]))
        for call in delta.get("tool_calls") or []:
            # Without an index (some servers), a delta with an id starts the next call.
            index = call.get("index")
            if not isinstance(index, int):
                index = max(self._calls, default=-1) + (1 if call.get("id") is not None or not self._calls else 0)
            function = call.get("function") or {}
            if index not in self._calls:
                segments += self._calls_done(before=index)
                self._calls[index] = ["", ""]
            entry = self._calls[index]
            # The name comes once, in the call's first delta; some servers repeat it whole.
            if function.get("name") and function["name"] != entry[0]:
                entry[0] += function["name"]
            if isinstance(function.get("arguments"), str):
                entry[1] += function["arguments"]
            elif isinstance(function.get("arguments"), dict):  # some servers send the object
                entry[1] = json.dumps(function["arguments"])
        # A call's arguments show nothing until the call ends, but the upstream is not
        # silent: the relay's idle watchdog goes by these (a long Write takes minutes).
        return [Output(segments)] if segments or delta.get("tool_calls") else []

    def _calls_done(self, before: int | None = None) -> list:
        """The calls gathered so far (those before index `before`), checked."""
        out = []
        for index in sorted(self._calls):
            if before is not None and index >= before:
                continue
            name, arguments = self._calls.pop(index)
            out.append(self._check(name, arguments))
        return out

    def _check(self, name: str, arguments: str):
        raw = json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        try:
            parsed = repair.loads(arguments) if arguments.strip() else {}
        except ValueError as exc:
            return BadCall(raw=raw, reason=f"unparseable arguments: {exc}")
        checked = toolcalls.check_call(self._tools, name, parsed)
        return checked if isinstance(checked, toolcalls.ToolCall) else BadCall(raw=raw, reason=checked)

    def _end(self) -> list:
        self.done = True
        events: list = []
        last, cut = max(self._calls, default=None), []
        if self._finish == "length" and last is not None and not whole_json(self._calls[last][1]):
            # The cap cut the last call short: repair would close it into a wrong call.
            name, arguments = self._calls.pop(last)
            cut = [BadCall(raw=json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False), reason="truncated")]
        if segments := self._calls_done() + cut:
            events.append(Output(segments))
        reason = _STOPS.get(self._finish or "stop", "end_turn")
        if self._matched:
            reason = "stop_sequence"
        return events + [Ended(reason, self._matched)]
