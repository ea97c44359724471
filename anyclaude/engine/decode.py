"""The token loop of one sequence: prefill its prompt on a KV cache, then a token per step
(engine thread).

It does what mlx-lm's `generate_step` does, with one difference: a short last chunk
of the prompt and the first token are one forward pass. `generate_step` always keeps
the last prompt token for a pass of its own, and a pass costs at least one read of
every weight: on a CPU with float32 weights that is as long as decoding a token, paid
on every request before its first token.

The loop is cut into steps (`Decoder.prefill` yields after each chunk, `Decoder.step`
decodes one token) so that the engine can interleave several sequences, and decode
those that batch in one forward pass (`batch.Batch`, which calls `Decoder.pick`).
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Iterator, Sequence
from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:
    from .engine import KVQuantization

Processor = Callable[[mx.array, mx.array], mx.array]

# The merged pass computes the output layer for each of its tokens, not just the last:
# beyond this many tokens that costs more than the pass it saves.
MERGED = 256


class Decoder:
    """One sequence's sampling state over its KV cache.

    `history` is what `cache` already holds: the tokens before the prompt.
    `processors` are mlx-lm logits processors; they see history and prompt and the
    tokens generated so far, as with `generate_step` on a fresh cache, so that a
    reused cache does not change the answer. `quantize`: see `KVQuantization`.
    `sampling`: the settings `sampler` was made from (None: its own).
    `whole`: spans of positions, [start, end), that a prefill chunk must not end inside
    of (images whose tokens attend to each other both ways, `vision.whole_spans`).
    """

    def __init__(
        self,
        model,
        cache: list,
        *,
        sampler: Callable[[mx.array], mx.array],
        processors: list[Processor] | None = None,
        history: Sequence[int] = (),
        quantize: KVQuantization | None = None,
        sampling: Hashable | None = None,
        whole: Sequence[tuple[int, int]] = (),
    ):
        self.model, self.cache, self.sampler = model, cache, sampler
        self.whole = whole
        # What `sampler` was made from: decoders with equal settings may share one call.
        self.sampling = sampling
        self.processors = processors
        self.quantize = quantize
        self.position = len(history)
        # Made an array once; each step adds its new tokens to it, as for the prompt.
        self._seen: mx.array | None = mx.array(list(history)) if processors and len(history) else None

    def extend(self, tokens: list[int], prefill_step: int = 512) -> Iterator[None]:
        """Compute `tokens` without sampling after them: None after each chunk."""
        while tokens:
            n = min(self._cut(min(prefill_step, len(tokens), chunk_end(self.quantize, self.position) - self.position)), len(tokens))
            self._chunk(tokens[:n])
            tokens = tokens[n:]
            yield None

    def prefill(self, prompt: list[int], prefill_step: int = 512) -> Iterator[int | None]:
        """Compute `prompt` (at least one token): None after each chunk, then the first
        token generated after it, and no more."""
        rest = prompt
        while len(rest) > prefill_step or len(rest) > MERGED or 0 < chunk_end(self.quantize, self.position) - self.position < len(rest):
            n = self._cut(min(prefill_step, len(rest) - 1, chunk_end(self.quantize, self.position) - self.position))
            if n >= len(rest):  # an image that runs to the prompt's end: one pass with it
                break
            self._chunk(rest[:n])
            rest = rest[n:]
            yield None
        yield self.step_array(mx.array(rest)).item()

    def _cut(self, n: int) -> int:
        """A chunk of `n` tokens from here, moved off a `whole` span it would end inside
        of: back to the span's start, or, for a chunk that starts the span, on to its end
        (past `prefill_step` and a KV quantization start: an image is computed whole)."""
        end = self.position + n
        for start, stop in self.whole:
            if start < end < stop:
                return (start if start > self.position else stop) - self.position
        return n

    def _chunk(self, tokens: list[int]) -> None:
        chunk = mx.array(tokens)
        self.model(chunk[None], cache=self.cache)
        self._advance(len(tokens))
        mx.eval([c.state for c in self.cache])
        self._see(chunk)
        mx.clear_cache()

    def step(self, token: int) -> int:
        """Feed `token` (the last one generated) and sample the next, on this sequence's own cache."""
        return self.step_array(mx.array([token])).item()

    def step_array(self, inputs: mx.array) -> mx.array:
        logits = self.model(inputs[None], cache=self.cache)[:, -1, :]
        self._advance(inputs.size)
        return self.pick(inputs, logits)

    def pick(self, inputs: mx.array, logits: mx.array) -> mx.array:
        """The next token (lazy), from the logits that followed `inputs` (shape (1, vocab))."""
        if self.processors:
            self._see(inputs)
            for processor in self.processors:
                logits = processor(self._seen, logits)
        return self.sampler(logits - mx.logsumexp(logits, keepdims=True))

    def _advance(self, n: int) -> None:
        self.position += n
        quantize_due(self.cache, self.quantize, self.position)

    def _see(self, inputs: mx.array) -> None:
        if self.processors:
            self._seen = inputs if self._seen is None else mx.concatenate([self._seen, inputs])


def tokens(
    model,
    prompt: list[int],
    cache: list,
    *,
    max_tokens: int,
    sampler: Callable[[mx.array], mx.array],
    processors: list[Processor] | None = None,
    prefill_step: int = 512,
    check: Callable[[], None] = lambda: None,
    history: Sequence[int] = (),
    quantize: KVQuantization | None = None,
) -> Iterator[int]:
    """The tokens generated after `prompt` (at least one token), extending `cache`: one
    sequence alone. `check` runs before each prefill chunk and may raise to stop."""
    decoder = Decoder(model, cache, sampler=sampler, processors=processors, history=history, quantize=quantize)
    check()
    for token in decoder.prefill(prompt, prefill_step):
        if token is None:
            check()
            continue
        yield token
    for _ in range(1, max_tokens):
        token = decoder.step(token)
        yield token


def chunk_end(quantize: KVQuantization | None, position: int) -> int:
    """Where a prefill chunk starting at `position` must end at the latest (a very large
    number when nothing is due)."""
    if quantize is None or position >= quantize.start:
        return 1 << 62
    return quantize.start


def quantize_due(cache: list, quantize: KVQuantization | None, position: int) -> None:
    """Quantize the attention layers of `cache` (in place) once it holds `quantize.start` tokens."""
    if quantize is None or position < quantize.start:
        return
    for i, layer in enumerate(cache):
        if hasattr(layer, "to_quantized") and not hasattr(layer, "bits"):
            try:
                cache[i] = layer.to_quantized(group_size=quantize.group_size, bits=quantize.bits)
            except NotImplementedError:  # sliding-window layers: mlx-lm cannot quantize them
                pass
