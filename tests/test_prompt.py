"""Rendering requests into prompts, with the tiny model's real tokenizer and template."""

from __future__ import annotations

import json

import pytest

from anyclaude import prompt
from anyclaude.api import wire
from anyclaude.api.errors import InvalidRequest


def req(**body) -> wire.MessagesRequest:
    base = {"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]}
    return wire.decode_request(json.dumps(base | body).encode())


def test_system_blocks_and_mid_conversation_system_render_in_place(tokenizer):
    r = prompt.render(
        req(
            system=[{"type": "text", "text": "First."}, {"type": "text", "text": "Second.", "cache_control": {"type": "ephemeral"}}],
            messages=[
                {"role": "user", "content": "Question"},
                {"role": "system", "content": "Late instruction"},
            ],
        ),
        tokenizer,
    )
    assert r.text.index("First.\n\nSecond.") < r.text.index("Question") < r.text.index("Late instruction")
    assert r.text.endswith("<|im_start|>assistant\n")
    assert r.ids == tokenizer.encode(r.text, add_special_tokens=False)


def test_consecutive_same_role_turns_are_merged(tokenizer):
    r = prompt.render(req(messages=[{"role": "user", "content": "one"}, {"role": "user", "content": "two"}]), tokenizer)
    assert r.text.count("<|im_start|>user") == 1 and "one\n\ntwo" in r.text


def test_final_assistant_turn_is_continued(tokenizer):
    r = prompt.render(req(messages=[{"role": "user", "content": "Count"}, {"role": "assistant", "content": "1, 2,"}]), tokenizer)
    assert r.text.endswith("1, 2,")


def test_billing_header_is_removed_unless_kept(tokenizer):
    header = "x-anthropic-billing-header: cc_version=2.1.197.123; cc_entrypoint=sdk-cli;"
    request = req(system=[{"type": "text", "text": header}, {"type": "text", "text": "Sys"}])
    assert header not in prompt.render(request, tokenizer).text
    assert header in prompt.render(request, tokenizer, keep_billing_header=True).text


def test_tools_go_into_the_system_prompt_for_a_template_without_tools(tokenizer):
    tool = {"name": "Read", "description": "Read a file", "input_schema": {"$schema": "x", "type": "object", "properties": {"p": {"type": "string"}}}}
    one = prompt.render(req(tools=[tool]), tokenizer)
    two = prompt.render(req(tools=[tool, dict(tool, name="Write")]), tokenizer)
    assert one.format.name == "generic" and '"name": "Read"' in one.text and "$schema" not in one.text
    assert len(two.ids) > len(one.ids) > len(prompt.render(req(), tokenizer).ids)


def test_tool_history_renders_in_order(tokenizer):
    r = prompt.render(
        req(
            tools=[{"name": "Read", "input_schema": {"type": "object"}}],
            messages=[
                {"role": "user", "content": "read x"},
                {"role": "assistant", "content": [{"type": "text", "text": "Reading."}, {"type": "tool_use", "id": "toolu_1", "name": "Read", "input": {"p": "x"}}]},
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "toolu_1", "content": [{"type": "text", "text": "file body"}, {"type": "image", "source": {}}]},
                        {"type": "text", "text": "<system-reminder>be careful</system-reminder>"},
                    ],
                },
            ],
        ),
        tokenizer,
    )
    text = r.text
    order = ["read x", "Reading.", '<tool_call>\n{"name": "Read", "arguments": {"p": "x"}}\n</tool_call>', "<tool_response>\nfile body", prompt.IMAGE_NOTE, "be careful"]
    positions = [text.index(part) for part in order]
    assert positions == sorted(positions)


def test_a_bad_block_is_a_400_naming_the_field(tokenizer):
    with pytest.raises(InvalidRequest, match=r"messages\.0\.content\.1\.id"):
        prompt.render(req(messages=[{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "tool_use", "id": 5, "name": "x"}]}]), tokenizer)
