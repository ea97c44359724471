"""The token loop: prefill a prompt on a KV cache, then sample token by token (engine thread).

It does what mlx-lm's `generate_step` does, with one difference: a short last chunk
of the prompt and the first token are one forward pass. `generate_step` always keeps
the last prompt token for a pass of its own, and a pass costs at least one read of
every weight: on a CPU with float32 weights that is as long as decoding a token, paid
on every request before its first token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import mlx.core as mx

if TYPE_CHECKING:
    from .engine import KVQuantization

Processor = Callable[[mx.array, mx.array], mx.array]

# The merged pass computes the output layer for each of its tokens, not just the last:
# beyond this many tokens that costs more than the pass it saves.
MERGED = 256


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
    """The tokens generated after `prompt` (at least one token), extending `cache`.

    `history` is what `cache` already holds: the tokens before `prompt`.
    `processors` are mlx-lm logits processors; they see history and prompt and the
    tokens generated so far, as with `generate_step` on a fresh cache, so that a
    reused cache does not change the answer. `check` runs before each prefill chunk
    and may raise to stop. As in `generate_step`, from the second token on, the next
    token's pass is queued before a token is yielded, so that on a GPU decoding
    overlaps with the caller's work. `quantize`: see `KVQuantization`.
    """
    position = len(history)
    # Made an array once; each step adds its new tokens to it, as for the prompt.
    seen: mx.array | None = mx.array(list(history)) if processors and len(history) else None

    def step(inputs: mx.array) -> mx.array:
        nonlocal seen, position
        logits = model(inputs[None], cache=cache)[:, -1, :]
        position += inputs.size
        quantize_due(cache, quantize, position)
        if processors:
            seen = inputs if seen is None else mx.concatenate([seen, inputs])
            for processor in processors:
                logits = processor(seen, logits)
        return sampler(logits - mx.logsumexp(logits, keepdims=True))

    rest = prompt
    while len(rest) > prefill_step or len(rest) > MERGED or 0 < chunk_end(quantize, position) - position < len(rest):
        check()
        n = min(prefill_step, len(rest) - 1, chunk_end(quantize, position) - position)
        chunk = mx.array(rest[:n])
        model(chunk[None], cache=cache)
        position += n
        quantize_due(cache, quantize, position)
        mx.eval([c.state for c in cache])
        if processors:
            seen = chunk if seen is None else mx.concatenate([seen, chunk])
        rest = rest[n:]
        mx.clear_cache()
    check()
    y = step(mx.array(rest))
    # The first token goes out before the next pass is queued: on a CPU, `async_eval`
    # computes most of a pass before it returns (~0.1 s here on the tiny model).
    yield y.item()
    pending = None
    for n in range(1, max_tokens):
        y = pending if pending is not None else step(y)
        pending = step(y) if n + 1 < max_tokens else None
        if pending is not None:
            mx.async_eval(pending)
        yield y.item()
        if n % 256 == 0:
            mx.clear_cache()


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
