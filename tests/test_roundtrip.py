"""Round trip: a generated tool call, rendered again as history, gives back the generated tokens.

The prefix cache depends on it (DESIGN principle 4). For each supported template: render
the prompt, take the call the model writes in that family's canonical form (what
constrained decoding produces) plus its end-of-turn token, parse it as the daemon does,
send it back as an Anthropic tool_use with a tool_result, and check that the new
prompt starts with the old prompt followed by exactly the generated tokens.
"""

from __future__ import annotations

import copy
import json
import re

import pytest

from anyclaude import prompt, toolcalls
from anyclaude.api import wire
from anyclaude.output import Output

READ = {
    "name": "Read",
    "description": "Read a file",
    "input_schema": {"type": "object", "properties": {"file_path": {"type": "string"}, "limit": {"type": "integer"}}, "required": ["file_path"]},
}
ARGS = {"file_path": "/tmp/notes.txt", "limit": 20}

# Chat templates written for this test in the shape of each family's real one: how
# they render tools, assistant tool calls (with OpenAI's `function` nesting) and tool results.
QWEN25 = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = 'You are a helpful assistant.' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n' + tool | tojson }}{%- endfor %}{{- '\\n</tools>' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant' }}{%- if message.content %}{{- '\\n' + message.content }}{%- endif %}"
    "{%- for tool_call in message.tool_calls or [] %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '\\n<tool_call>\\n{\"name\": \"' + tool_call.name + '\", \"arguments\": ' + tool_call.arguments | tojson + '}\\n</tool_call>' }}"
    "{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
QWEN3_CODER = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system }}"
    "{%- if tools %}{{- '\\n\\n# Tools\\n\\n<tools>' }}{%- for tool in tools %}{{- '\\n<function>\\n<name>' + tool.function.name + '</name>\\n</function>' }}{%- endfor %}{{- '\\n</tools>' }}{%- endif %}"
    "{{- '<|im_end|>\\n' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' %}{{- '<|im_start|>assistant\\n' + message.content }}"
    "{%- for tool_call in message.tool_calls or [] %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '<tool_call>\\n<function=' + tool_call.name + '>\\n' }}"
    "{%- for k, v in tool_call.arguments.items() %}{{- '<parameter=' + k + '>\\n' + (v if v is string else v | tojson) + '\\n</parameter>\\n' }}{%- endfor %}"
    "{{- '</function>\\n</tool_call>' }}{%- endfor %}{{- '<|im_end|>\\n' }}"
    "{%- elif message.role == 'tool' %}{{- '<|im_start|>user\\n<tool_response>\\n' + message.content + '\\n</tool_response><|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
MISTRAL = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- if tools %}{{- '[AVAILABLE_TOOLS]' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{{- '[SYSTEM_PROMPT]' + system + '[/SYSTEM_PROMPT]' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '[INST]' + message.content + '[/INST]' }}"
    "{%- elif message.role == 'assistant' %}{{- message.content }}"
    "{%- for tool_call in message.tool_calls or [] %}{%- if tool_call.function is defined %}{%- set tool_call = tool_call.function %}{%- endif %}"
    "{{- '[TOOL_CALLS]' + tool_call.name + '[ARGS]' + tool_call.arguments | tojson }}{%- endfor %}{{- '<|im_end|>' }}"
    "{%- elif message.role == 'tool' %}{{- '[TOOL_RESULTS]' + message.content + '[/TOOL_RESULTS]' }}{%- endif %}"
    "{%- endfor %}"
)
# Llama 3.1's: tools in the system turn, a call rendered as bare JSON with "parameters"
# (the assistant's text is not rendered with it), results in an `ipython` turn.
LLAMA3 = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{{- '<|start_header_id|>system<|end_header_id|>\\n\\n' + system }}"
    "{%- if tools %}{{- '\\n\\nTo call a function, respond with JSON in the format {\"name\": function name, \"parameters\": dictionary of argument name and its value}.\\n\\n' }}"
    "{%- for tool in tools %}{{- tool | tojson(indent=4) + '\\n\\n' }}{%- endfor %}{%- endif %}"
    "{{- '<|eot_id|>' }}"
    "{%- for message in messages %}"
    "{%- if message.role == 'assistant' and message.tool_calls %}{%- set tool_call = message.tool_calls[0].function %}"
    "{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n{\"name\": \"' + tool_call.name + '\", \"parameters\": ' + tool_call.arguments | tojson + '}<|eot_id|>' }}"
    "{%- elif message.role == 'tool' %}{{- '<|start_header_id|>ipython<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}"
    "{%- else %}{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content + '<|eot_id|>' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)
# Mistral's v3 templates (7B v0.3, Nemo): a JSON list of calls, each rendered back with
# the 9-character id the template insists on.
MISTRAL_V3 = (
    "{%- if messages[0].role == 'system' %}{%- set system = messages[0].content %}{%- set messages = messages[1:] %}"
    "{%- else %}{%- set system = '' %}{%- endif %}"
    "{%- if tools %}{{- '[AVAILABLE_TOOLS] ' + tools | tojson + '[/AVAILABLE_TOOLS]' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message.role == 'user' %}{{- '[INST] ' + system + '\\n\\n' + message.content + '[/INST]' }}"
    "{%- elif message.role == 'assistant' and message.tool_calls %}{{- '[TOOL_CALLS] [' }}"
    "{%- for tool_call in message.tool_calls %}{%- set out = tool_call.function | tojson %}{{- out[:-1] }}"
    "{%- if not tool_call.id is defined or tool_call.id | length != 9 %}{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "{{- ', \"id\": \"' + tool_call.id + '\"}' }}{%- if not loop.last %}{{- ', ' }}{%- endif %}{%- endfor %}{{- ']</s>' }}"
    "{%- elif message.role == 'assistant' %}{{- ' ' + message.content + '</s>' }}"
    "{%- elif message.role == 'tool' %}"
    "{%- if message.tool_call_id is not defined or message.tool_call_id | length != 9 %}{{- raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}{%- endif %}"
    "{{- '[TOOL_RESULTS] {\"content\": ' + message.content | tojson + ', \"call_id\": \"' + message.tool_call_id + '\"}[/TOOL_RESULTS]' }}{%- endif %}"
    "{%- endfor %}"
)
# The family's markers are special tokens in its real vocabulary, as they must be here.
SPECIAL = {
    "mistral": ["[INST]", "[/INST]", "[TOOL_CALLS]", "[ARGS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]"],
    "mistral_list": ["[INST]", "[/INST]", "[TOOL_CALLS]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]", "[/TOOL_RESULTS]", "</s>"],
    "llama3": ["<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>", "<|python_tag|>"],
}
# Llama 3's pre-tokenizer: a run of newlines is one piece whatever follows it, so the
# generation prompt's "\n\n" stays a token of its own when the call is appended (with
# the tiny model's GPT-2 rule, "\n\n" before "{" would split differently).
LLAMA3_PRE_TOKENIZER = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# What ends the assistant's turn in each family's history.
END_OF_TURN = {"llama3": "<|eot_id|>"}


def generated(family: str) -> str:
    """The call as the model writes it, canonically: what constrained decoding allows."""
    if family in ("generic", "hermes"):
        return "<tool_call>\n" + json.dumps({"name": "Read", "arguments": ARGS}) + "\n</tool_call>"
    if family == "qwen3_coder":
        params = "".join(f"<parameter={k}>\n{v}\n</parameter>\n" for k, v in ARGS.items())
        return f"<tool_call>\n<function=Read>\n{params}</function>\n</tool_call>"
    if family == "mistral":
        return "[TOOL_CALLS]Read[ARGS]" + json.dumps(ARGS)
    if family == "llama3":
        return json.dumps({"name": "Read", "parameters": ARGS})
    raise AssertionError(family)


def family_tokenizer(tiny_model, family: str, template: str):
    """The tiny model's tokenizer as mlx-lm loads it, with a family's template (and, for
    families listed in SPECIAL, their markers as special tokens)."""
    from mlx_lm import tokenizer_utils
    from mlx_lm.utils import load_tokenizer

    if family in SPECIAL:
        made = load_tokenizer(tiny_model, {"chat_template": template, "extra_special_tokens": SPECIAL[family]})
        if family == "llama3":
            from tokenizers import Regex, pre_tokenizers

            made._tokenizer.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
                [
                    pre_tokenizers.Split(Regex(LLAMA3_PRE_TOKENIZER), behavior="isolated"),
                    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
                ]
            )
        return made
    base = load_tokenizer(tiny_model)._tokenizer
    twin = copy.copy(base)
    twin.chat_template = template
    twin.init_kwargs = {k: v for k, v in base.init_kwargs.items() if k != "tool_parser_type"}
    with pytest.MonkeyPatch.context() as patch:  # mlx-lm's own family inference runs on it
        patch.setattr(tokenizer_utils.AutoTokenizer, "from_pretrained", lambda *a, **k: twin)
        return load_tokenizer(tiny_model)


@pytest.fixture(scope="module")
def tokenizer_for(tokenizer, tiny_model):
    return lambda family, template: tokenizer if template is None else family_tokenizer(tiny_model, family, template)


def request(messages: list[dict]) -> wire.MessagesRequest:
    body = {"model": "m", "max_tokens": 64, "system": "You read files.", "tools": [READ], "messages": messages}
    return wire.decode_request(json.dumps(body).encode())


@pytest.mark.parametrize(
    ("family", "template", "format_name"),
    [
        ("generic", None, "generic"),
        ("hermes", QWEN25, "hermes"),
        ("qwen3_coder", QWEN3_CODER, "qwen3_coder"),
        ("mistral", MISTRAL, "mistral"),
        ("llama3", LLAMA3, "llama3"),
    ],
)
def test_a_generated_call_renders_back_to_the_generated_tokens(tokenizer_for, family, template, format_name):
    tok = tokenizer_for(family, template)
    ask = [{"role": "user", "content": "Show me my notes."}]
    first = prompt.render(request(ask), tok)
    assert first.format.name == format_name
    # The model's output, token by token, ending with its end-of-turn token.
    end_of_turn = tok.convert_tokens_to_ids(END_OF_TURN.get(family, "<|im_end|>"))
    out_ids = tok.encode(generated(family), add_special_tokens=False) + [end_of_turn]
    output = Output(tok, toolcalls.Parser(first.format, first.tools))
    segments = [s for t in out_ids[:-1] for s in output.add(t)] + output.finish()
    assert segments == [toolcalls.ToolCall("Read", ARGS)]
    history = ask + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01", "name": "Read", "input": segments[0].arguments}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01", "content": "buy milk"}, {"type": "text", "text": "<system-reminder>ok</system-reminder>"}]},
    ]
    second = prompt.render(request(history), tok)
    assert second.ids[: len(first.ids) + len(out_ids)] == first.ids + out_ids


def test_mistral_v3_history_keeps_the_call_up_to_the_id_it_adds(tokenizer_for):
    """v3 templates render a call back with an `id` the model never wrote, and refuse
    ids that are not 9 alphanumerics: Claude Code's `toolu_…` ids are mapped to 9
    stable characters, and the history agrees with the generated call up to the id."""
    tok = tokenizer_for("mistral_list", MISTRAL_V3)
    ask = [{"role": "user", "content": "Show me my notes."}]
    first = prompt.render(request(ask), tok)
    call = "[TOOL_CALLS] [" + json.dumps({"name": "Read", "arguments": ARGS})
    out_ids = tok.encode(call + "]", add_special_tokens=False)
    output = Output(tok, toolcalls.Parser(first.format, first.tools))
    segments = [s for t in out_ids for s in output.add(t)] + output.finish()
    assert segments == [toolcalls.ToolCall("Read", ARGS)]
    history = ask + [
        {"role": "assistant", "content": [{"type": "tool_use", "id": "toolu_01AbC", "name": "Read", "input": ARGS}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "toolu_01AbC", "content": "buy milk"}]},
    ]
    second = prompt.render(request(history), tok)
    (call_id,) = set(re.findall(r'"id": "(\w+)"', second.text))
    assert len(call_id) == 9 and call_id.isalnum() and f'"call_id": "{call_id}"' in second.text
    assert second.text.startswith(first.text + call[:-1] + ', "id": ')
    # Token for token up to the arguments' closing braces (which may merge with the `,`).
    kept = tok.encode(call[:-2], add_special_tokens=False)
    assert second.ids[: len(first.ids) + len(kept)] == first.ids + kept
