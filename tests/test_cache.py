"""The prefix cache with the real tiny model: hits, trims, eviction, budget, persistence."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from anyclaude.cache import CHECKPOINT, PrefixCache, length, nbytes


@pytest.fixture(scope="module")
def model(tiny_model):
    from mlx_lm import load

    from anyclaude import blas, cpu

    net, tokenizer = load(str(tiny_model))
    if blas.loaded():  # as the daemon runs it on a CPU: much faster prefill
        cpu.dequantize(net)
    return net, tokenizer


def prefill(model, tokens: list[int], kv=None):
    """KV cache for `tokens` (extending `kv`), and the logits after the last one."""
    net, _ = model
    kv = kv if kv is not None else make_prompt_cache(net)
    logits = net(mx.array(tokens)[None], cache=kv)[0, -1]
    mx.eval(logits, [c.state for c in kv])
    return kv, logits


def ids(model, text: str) -> list[int]:
    return model[1].encode(text, add_special_tokens=False)


SYSTEM = "You are a careful assistant. Answer briefly and precisely. " * 4


def test_longest_prefix_is_reused_and_extends_exactly(model):
    cache = PrefixCache(2**30)
    first = ids(model, SYSTEM + "Question one: what is two plus two?")
    kv, _ = prefill(model, first)
    cache.store(first, kv)
    second = first + ids(model, " Four. Question two: and three plus three?")
    assert cache.peek(second) == len(first)
    reuse = cache.fetch(second)
    assert reuse.tokens == len(first) and length(reuse.cache) == len(first)
    # Extending the reused cache gives the logits of a full prefill.
    _, extended = prefill(model, second[len(first) :], reuse.cache)
    _, full = prefill(model, second)
    assert mx.allclose(extended, full, atol=1e-4)
    assert cache.entries == 0  # the conversation entry was taken over, to come back longer


def test_a_longer_entry_is_trimmed_to_the_common_prefix_and_kept(model):
    cache = PrefixCache(2**30)
    shared = ids(model, SYSTEM)
    long = shared + ids(model, "Tell me about the sea and the sky.")
    kv, _ = prefill(model, long)
    cache.store(long, kv)
    other = shared + ids(model, "Name a prime number.")
    common = next(i for i, (a, b) in enumerate(zip(long, other)) if a != b)
    reuse = cache.fetch(other)
    assert reuse.tokens == common >= len(shared) - 1
    assert length(reuse.cache) == common
    assert nbytes(reuse.cache) < nbytes(kv)  # only the shared part was copied
    assert cache.entries == 1 and cache.peek(long) == len(long) - 1  # the original is intact
    _, extended = prefill(model, other[common:], reuse.cache)
    _, full = prefill(model, other)
    assert mx.allclose(extended, full, atol=1e-4)


def test_eviction_is_lru_by_bytes_conversations_before_checkpoints(model):
    shared = ids(model, SYSTEM)
    checkpoint, _ = prefill(model, shared)
    conversations = []
    for n in range(3):
        tokens = shared + ids(model, f"{n}: conversation number {n}, hello there, how are you today?")
        conversations.append((tokens, prefill(model, tokens)[0]))
    one = nbytes(conversations[0][1])
    cache = PrefixCache(nbytes(checkpoint) + 2 * one)  # room for the checkpoint and two conversations
    cache.store(shared, checkpoint, CHECKPOINT)
    for tokens, kv in conversations:
        cache.store(tokens, kv)
    assert cache.entries == 3 and cache.bytes <= cache.max_bytes and cache.peak_bytes <= cache.max_bytes
    # The oldest conversation went; the checkpoint and the two newest stayed.
    assert cache.peek(conversations[0][0] + [1]) == len(shared)
    assert cache.peek(conversations[1][0] + [1]) == len(conversations[1][0])
    assert cache.peek(conversations[2][0] + [1]) == len(conversations[2][0])
    assert cache.has(shared, CHECKPOINT)


def test_persisted_checkpoint_gives_identical_logits_after_a_restart(model, tmp_path):
    shared = ids(model, SYSTEM)
    kv, _ = prefill(model, shared)
    before = PrefixCache(2**30, persist_dir=tmp_path)
    before.store(shared, kv, CHECKPOINT)
    before.save()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1

    after = PrefixCache(2**30, persist_dir=tmp_path)  # a new process would start like this
    assert after.load_persisted() == 1
    question = shared + ids(model, "What is the capital of Italy?")
    reuse = after.fetch(question)
    assert reuse.tokens == len(shared)
    _, warm = prefill(model, question[len(shared) :], reuse.cache)
    _, cold = prefill(model, question)
    assert mx.array_equal(warm, prefill(model, question[len(shared) :], before.fetch(question).cache)[1])
    assert mx.allclose(warm, cold, atol=1e-4)
