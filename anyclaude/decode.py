"""The token loop: prefill a prompt on a KV cache, then sample token by token (engine thread).

It does what mlx-lm's `generate_step` does, with one difference: a short last chunk
of the prompt and the first token are one forward pass. `generate_step` always keeps
the last prompt token for a pass of its own, and a pass costs at least one read of
every weight: on a CPU with float32 weights that is as long as decoding a token, paid
on every request before its first token.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import mlx.core as mx

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
) -> Iterator[int]:
    """The tokens generated after `prompt` (at least one token), extending `cache`.

    `processors` are mlx-lm logits processors; they see the prompt and the tokens
    generated so far, as with `generate_step`. `check` runs before each prefill chunk
    and may raise to stop. As in `generate_step`, from the second token on, the next
    token's pass is queued before a token is yielded, so that on a GPU decoding
    overlaps with the caller's work.
    """
    seen: mx.array | None = None

    def step(inputs: mx.array) -> mx.array:
        nonlocal seen
        logits = model(inputs[None], cache=cache)[:, -1, :]
        if processors:
            seen = inputs if seen is None else mx.concatenate([seen, inputs])
            for processor in processors:
                logits = processor(seen, logits)
        return sampler(logits - mx.logsumexp(logits, keepdims=True))

    rest = prompt
    while len(rest) > prefill_step or len(rest) > MERGED:
        check()
        n = min(prefill_step, len(rest) - 1)
        chunk = mx.array(rest[:n])
        model(chunk[None], cache=cache)
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
