"""The prefix cache with the real tiny model: hits, trims, eviction, budget, persistence."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models.cache import make_prompt_cache

from anyclaude.cache import CHECKPOINT, PrefixCache, Reuse, length, nbytes


@pytest.fixture(scope="module")
def model(tiny_net):
    return tiny_net


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


def test_a_conversation_left_just_before_its_end_is_taken_over_and_trimmed(model):
    # As when an answer was cut at max_tokens: the next turn renders it with an end
    # of turn where the stored entry has the token generated last.
    cache = PrefixCache(2**30)
    prompt = ids(model, SYSTEM + "Question: what is two plus two? Answer:")
    turn = prompt + ids(model, " four, and")
    kv, _ = prefill(model, turn)
    cache.store(turn, kv, prompt=len(prompt))
    nxt = turn[:-2] + ids(model, " four. Question: and three plus three?")
    shared = len(turn) - 2
    reuse = cache.fetch(nxt)
    assert reuse.tokens == shared
    assert reuse.cache is kv and length(kv) == shared and cache.entries == 0
    _, extended = prefill(model, nxt[shared:], kv)
    _, full = prefill(model, nxt)
    assert mx.allclose(extended, full, atol=1e-4)


def test_side_requests_are_evicted_before_conversations(model):
    shared = ids(model, SYSTEM)
    entries = [shared + ids(model, f"{n}: conversation number {n}, hello there, how are you today?") for n in range(4)]
    kvs = [prefill(model, tokens)[0] for tokens in entries]
    cache = PrefixCache(2 * nbytes(kvs[0]))
    cache.store(entries[0], kvs[0])  # a conversation from an earlier session
    cache.store(entries[1], kvs[1], side=True)  # a side request since
    cache.store(entries[2], kvs[2])  # a new session's first turn: kept, the side request goes
    assert cache.peek(entries[1] + [1]) < len(entries[1])
    assert cache.peek(entries[0] + [1]) == len(entries[0]) and cache.peek(entries[2] + [1]) == len(entries[2])
    cache.store(entries[3], kvs[3])  # among conversations, the least recently used goes
    assert cache.peek(entries[0] + [1]) < len(entries[0])
    assert cache.peek(entries[2] + [1]) == len(entries[2]) and cache.peek(entries[3] + [1]) == len(entries[3])


def test_a_compacted_conversation_is_the_first_to_go(model):
    shared = ids(model, SYSTEM)
    entries = [shared + ids(model, f"{n}: conversation number {n}, hello there, how are you today?") for n in range(3)]
    kvs = [prefill(model, tokens)[0] for tokens in entries]
    cache = PrefixCache(2 * nbytes(kvs[0]))
    cache.store(entries[0], kvs[0])
    cache.store(entries[1], kvs[1], side=True)  # a side request: would go first
    # Compaction replaced conversation 0 (more recent than nothing else here): it goes first now.
    assert cache.demote(entries[0] + [7, 8], beyond=len(shared)) == 1
    assert cache.demote(entries[2], beyond=len(shared)) == 0  # shares only the system prompt
    cache.store(entries[2], kvs[2])
    assert cache.peek(entries[0] + [1]) < len(entries[0]) and cache.peek(entries[1] + [1]) == len(entries[1])


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


def test_settings_apply_to_a_running_cache(model, tmp_path):
    shared = ids(model, SYSTEM)
    conversation = shared + ids(model, "Hello there.")
    cache = PrefixCache(2**30)  # not persisted
    checkpoint, _ = prefill(model, shared)
    cache.store(shared, checkpoint, CHECKPOINT)
    cache.store(conversation, prefill(model, conversation)[0])
    cache.save()
    # Persistence turned on: the checkpoint held now is saved after the next request.
    cache.configure(nbytes(checkpoint), tmp_path)
    assert cache.entries == 1 and cache.has(shared, CHECKPOINT)  # the smaller budget evicted the conversation
    cache.save()
    assert len(list(tmp_path.glob("*.safetensors"))) == 1
    cache.configure(0, None)
    assert cache.entries == 0


def test_store_says_what_became_of_an_entry(model):
    shared = ids(model, SYSTEM)
    checkpoint, _ = prefill(model, shared)
    conversation = shared + ids(model, "Tell me about the sea.")
    kv, _ = prefill(model, conversation)
    assert PrefixCache(2**30).store(conversation, kv) == "stored"
    alone = PrefixCache(nbytes(kv) - 1)
    assert alone.store(conversation, kv) == "too_large" and alone.entries == 0
    # Room for the checkpoint, not for both: the conversation goes first, at once.
    full = PrefixCache(nbytes(checkpoint) + nbytes(kv) - 1)
    assert full.store(shared, checkpoint, CHECKPOINT) == "stored"
    assert full.store(conversation, kv) == "over_budget" and full.entries == 1 and full.has(shared, CHECKPOINT)
    # Tokens the layers do not hold, or none: nothing that could be reused.
    assert PrefixCache(2**30).store(conversation[:-1], kv) == "miscounted"
    assert PrefixCache(2**30).store([], kv) == "empty"


def test_a_lookup_says_why_it_reused_no_more(model):
    cache = PrefixCache(2**30)
    shared = ids(model, SYSTEM)
    question = shared + ids(model, "Name a prime number.")
    assert cache.fetch(question) == Reuse(None, 0, lookup="no_entries")
    elsewhere = ids(model, "Something else entirely. " + SYSTEM)
    assert elsewhere[0] != question[0]
    cache.store(elsewhere, prefill(model, elsewhere)[0])
    assert cache.fetch(question) == Reuse(None, 0, lookup="no_prefix")
    cache.store(shared, prefill(model, shared)[0], CHECKPOINT)
    reuse = cache.fetch(question)
    assert reuse.tokens == len(shared) and reuse.lookup == "hit"


def test_a_cache_that_cannot_be_trimmed_is_reused_by_exact_prefix_and_the_lookup_says_so(tokenizer):
    from families import build

    net = build("lfm2")  # convolution state: cannot be cut back
    cache = PrefixCache(2**30)
    shared = tokenizer.encode(SYSTEM, add_special_tokens=False)
    long = shared + tokenizer.encode("Tell me about the sea and the sky.", add_special_tokens=False)
    kv = make_prompt_cache(net)
    mx.eval(net(mx.array(long)[None], cache=kv))
    cache.store(long, kv)
    other = shared + tokenizer.encode("Tell me about a prime number.", add_special_tokens=False)
    assert cache.fetch(other) == Reuse(None, 0, lookup="not_trimmable")
    checkpoint = make_prompt_cache(net)
    mx.eval(net(mx.array(shared)[None], cache=checkpoint))
    cache.store(shared, checkpoint, CHECKPOINT)
    # The checkpoint, an exact prefix, is reused; the conversation shares more, in vain.
    reuse = cache.fetch(other)
    assert reuse.tokens == len(shared) and reuse.kind == CHECKPOINT and reuse.lookup == "not_trimmable"
