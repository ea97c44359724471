"""Detokenizing and stop sequences, token by token, with the real tokenizer."""

from __future__ import annotations

from anyclaude.output import Output


def run(tokenizer, text: str, stops: list[str]) -> tuple[list[str], str, str | None]:
    output = Output(tokenizer, stops)
    pieces = [output.add(t) for t in tokenizer.encode(text, add_special_tokens=False)]
    pieces.append(output.finish())
    return pieces, "".join(pieces), output.stop_sequence


def test_text_passes_through_unchanged(tokenizer):
    text = "Hello, world! 123 ünïcödé\n  indented"
    assert run(tokenizer, text, [])[1] == text


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
