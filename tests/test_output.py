"""Detokenizing and stop sequences, token by token, with the real tokenizer."""

from __future__ import annotations

from anyclaude import toolcalls
from anyclaude.families import generic
from anyclaude.output import Output


def texts(segments) -> str:
    assert all(isinstance(s, toolcalls.Text) for s in segments)
    return "".join(s.text for s in segments)


def run(tokenizer, text: str, stops: list[str]) -> tuple[list[str], str, str | None]:
    output = Output(tokenizer, toolcalls.Parser(generic.FORMAT, []), stops)
    pieces = [texts(output.add(t)) for t in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(texts(output.finish()))
    return pieces, "".join(pieces), output.stop_sequence


def test_text_passes_through_unchanged(tokenizer):
    text = "Hello, world! 123 ünïcödé\n  indented"
    assert run(tokenizer, text, [])[1] == text


def test_the_replys_leading_whitespace_reaches_the_client(tokenizer):
    # "\n" is a token of its own; a leading space is in the first word's token, and
    # mlx-lm's BPE detokenizer drops it where the tokenizer's decoding does not.
    for text in ["\nicense, and more", "\n\nHi", " Hello world", "  two spaces", " \n mixed "]:
        assert run(tokenizer, text, [])[1] == text == tokenizer.decode(tokenizer.encode(text, add_special_tokens=False))


def test_stop_sequence_is_cut_and_reported(tokenizer):
    _, text, stop = run(tokenizer, "The answer is 42. END more text", ["END", "never"])
    assert text == "The answer is 42. " and stop == "END"


def test_earliest_stop_sequence_wins(tokenizer):
    _, text, stop = run(tokenizer, "one two three", ["three", "two"])
    assert text == "one " and stop == "two"


def test_a_partial_stop_sequence_is_held_then_released(tokenizer):
    pieces, text, stop = run(tokenizer, "abc</sto and more", ["</stop>"])
    assert text == "abc</sto and more" and stop is None
    assert not any(p.endswith("</") for p in pieces[:-1])


def test_a_call_cut_short_is_dropped_and_a_whole_one_is_kept(tokenizer):
    read = {"type": "function", "function": {"name": "Read", "parameters": {"type": "object", "properties": {"p": {"type": "string"}}}}}
    whole = '<tool_call>\n{"name": "Read", "arguments": {"p": "x"}}\n</tool_call>'
    for text, cut, expected in [
        ("Reading." + whole, False, [toolcalls.Text("Reading."), toolcalls.ToolCall("Read", {"p": "x"})]),
        ("Reading." + whole[:30], True, [toolcalls.Text("Reading.")]),
        ("Reading." + whole[:30], False, [toolcalls.Text("Reading."), toolcalls.BadCall(whole[:30], "truncated")]),
    ]:
        output = Output(tokenizer, toolcalls.Parser(generic.FORMAT, [read]))
        segments = [s for t in tokenizer.encode(text, add_special_tokens=False) for s in output.add(t)]
        segments += output.finish(cut=cut)
        merged = []
        for s in segments:
            if merged and type(s) is type(merged[-1]) is toolcalls.Text:
                merged[-1] = toolcalls.Text(merged[-1].text + s.text)
            else:
                merged.append(s)
        assert merged == expected
