"""The prefix cache with the real tiny model: hits, trims, eviction, budget, persistence."""

from __future__ import annotations

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from anyclaude.engine.cache import CHECKPOINT, PrefixCache, Reuse, _digest, length, nbytes


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


def conversation(model, system: str, n: int) -> tuple[list[int], list]:
    tokens = ids(model, system) + ids(model, f"{n}: conversation number {n}, hello there, how are you today?")
    return tokens, prefill(model, tokens)[0]


def test_a_checkpoint_is_held_by_the_conversations_that_begin_with_it(model):
    shared = ids(model, SYSTEM)
    checkpoint, _ = prefill(model, shared)
    conversations = [conversation(model, SYSTEM, n) for n in range(3)]
    one = nbytes(conversations[0][1])
    cache = PrefixCache(2 * one + nbytes(checkpoint) // 2)  # two conversations, not a third
    cache.store(shared, checkpoint, CHECKPOINT)
    for tokens, kv in conversations:
        cache.store(tokens, kv)
    # The checkpoint's KV is not kept twice: the conversations begin with it.
    assert cache.entries == 2 and cache.bytes == 2 * one and cache.peak_bytes <= cache.max_bytes
    assert cache.holds(shared) and not cache.has(shared, CHECKPOINT)
    # The oldest conversation went; the two newest stayed, and with them the checkpoint.
    assert cache.peek(conversations[0][0] + [1]) < len(conversations[0][0])
    assert cache.peek(conversations[1][0] + [1]) == len(conversations[1][0])
    assert cache.peek(conversations[2][0] + [1]) == len(conversations[2][0])
    assert cache.peek(shared + ids(model, "A new session.")) >= len(shared)


OTHER = "You are a file search specialist. Report what you find in a few lines. " * 4


def test_an_evicted_conversation_is_cut_back_to_the_checkpoint_it_holds_and_the_log_hears_of_it(model):
    evicted = []
    main, explore = ids(model, SYSTEM), ids(model, OTHER)
    (main_turn, main_kv), (explore_turn, explore_kv) = conversation(model, SYSTEM, 1), conversation(model, OTHER, 1)
    cache = PrefixCache(nbytes(main_kv) + nbytes(explore_kv) - 1, on_evict=evicted.append)
    cache.store(main, prefill(model, main)[0], CHECKPOINT)
    cache.store(main_turn, main_kv)
    cache.store(explore, prefill(model, explore)[0], CHECKPOINT)
    cache.store(explore_turn, explore_kv)
    # Both conversations do not fit: the older one goes, but not the checkpoint it held.
    assert cache.peek(explore_turn + [1]) == len(explore_turn)
    assert cache.peek(main_turn + [1]) == len(main) and cache.holds(main) and cache.has(main, CHECKPOINT)
    assert cache.bytes <= cache.max_bytes
    assert [(e.kind, e.tokens, e.kept, e.reason) for e in evicted] == [("conversation", len(main_turn), len(main), "budget")]
    assert evicted[0].bytes == nbytes(main_kv) and evicted[0].idle_s >= 0
    # The checkpoint left is a copy of the conversation's first tokens: the same logits.
    question = main + ids(model, "What is the capital of Italy?")
    reuse = cache.fetch(question)
    assert reuse.tokens == len(main) and reuse.kind == CHECKPOINT
    _, warm = prefill(model, question[len(main) :], reuse.cache)
    _, cold = prefill(model, question)
    assert mx.allclose(warm, cold, atol=1e-4)


def test_one_recency_order_only_the_newest_checkpoint_of_a_prefix_outranks_conversations(model):
    old = ids(model, SYSTEM)
    new = old[:-3] + ids(model, " Tools changed.")  # the same agent's prefix, another version
    assert new[: len(old) - 3] == old[: len(old) - 3] and new != old
    elsewhere, elsewhere_kv = conversation(model, OTHER, 1)
    cache = PrefixCache(nbytes(elsewhere_kv) + nbytes(prefill(model, new)[0]) + 1)
    cache.store(old, prefill(model, old)[0], CHECKPOINT)
    cache.store(elsewhere, elsewhere_kv)  # more recent than the old version
    cache.store(new, prefill(model, new)[0], CHECKPOINT)
    # The old version is no longer protected: older than the conversation, it goes first.
    assert not cache.has(old, CHECKPOINT) and cache.has(new, CHECKPOINT)
    assert cache.peek(elsewhere + [1]) == len(elsewhere)
    # The newest checkpoint of a prefix outlasts a conversation used since.
    other, other_kv = conversation(model, OTHER + " Again.", 2)
    cache.store(other, other_kv)
    assert cache.has(new, CHECKPOINT) and cache.peek(elsewhere + [1]) < len(elsewhere)


def test_the_budget_holds_the_live_request_s_kv_too(model):
    net, _ = model
    cache = PrefixCache(2**30)
    cache.prepare(net)
    # SmolLM2-135M: 30 layers of 3 KV heads of 64, keys and values in float32.
    assert cache.size.per_token == 30 * 2 * 3 * 64 * 4 and cache.size.fixed == 0
    tokens, kv = conversation(model, SYSTEM, 1)
    assert cache.size.bytes(256) == nbytes(prefill(model, list(range(256)))[0])
    evicted = []
    cache = PrefixCache(nbytes(kv) + cache.size.bytes(100), on_evict=evicted.append)
    cache.prepare(net)
    cache.store(tokens, kv)
    cache.reserve("live", 100)  # fits beside it
    assert cache.entries == 1 and cache.live_bytes == cache.size.bytes(100)
    cache.reserve("live", 101)  # does not
    assert cache.entries == 0 and [e.reason for e in evicted] == ["live"]
    assert cache.peak_bytes <= cache.max_bytes
    cache.reserve("live", 0)
    assert cache.live_bytes == 0 and cache.store(tokens, kv) == "stored"


def test_the_default_budget_is_the_memory_left_by_the_weights():
    from anyclaude.engine.cache import default_budget

    gb = 2**30
    reserve = int(64 * gb * 0.1)  # a tenth
    assert default_budget(64 * gb, 17 * gb) == 64 * gb - reserve - 17 * gb
    assert default_budget(64 * gb, 17 * gb, models=2) == (64 * gb - reserve) // 2 - 17 * gb
    assert default_budget(4 * gb, 3 * gb + gb // 2) == 0  # the reserve is 1 GiB at least


def test_a_restart_keeps_the_newest_checkpoints_when_they_do_not_all_fit(model, tmp_path):
    import os
    import time

    prefixes = [ids(model, f"Agent {n}. " + SYSTEM) for n in range(3)]
    kvs = [prefill(model, p)[0] for p in prefixes]
    before = PrefixCache(2**30, persist_dir=tmp_path)
    for prefix, kv in zip(prefixes, kvs):
        before.store(prefix, kv, CHECKPOINT)
    before.save()
    files = {n: tmp_path / f"{_digest(np.asarray(p))}.safetensors" for n, p in enumerate(prefixes)}
    assert sorted(tmp_path.glob("*.safetensors")) == sorted(files.values())
    for n, path in files.items():  # saved long ago, 2 the newest: far apart, whatever the clock's grain
        stamp = time.time() - 1000 + 10 * n
        os.utime(path, (stamp, stamp))
    assert before.fetch(prefixes[0] + [5]).tokens == len(prefixes[0])
    before.save()  # a checkpoint reused is the newest on disk now
    assert max(files, key=lambda n: files[n].stat().st_mtime) == 0
    # Room for two: the two newest are loaded, the oldest is left on disk.
    after = PrefixCache(nbytes(kvs[0]) + nbytes(kvs[1]) + 1, persist_dir=tmp_path)
    assert after.load_persisted() == 2
    assert after.has(prefixes[0], CHECKPOINT) and after.has(prefixes[2], CHECKPOINT) and not after.has(prefixes[1], CHECKPOINT)
    # The newest on disk is the last to go.
    after.configure(nbytes(kvs[0]) + 1, tmp_path)
    assert after.has(prefixes[0], CHECKPOINT) and after.entries == 1


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
    cache.configure(nbytes(checkpoint) - 1, tmp_path)
    # The smaller budget evicted the conversation, down to the checkpoint it held.
    assert cache.entries == 1 and cache.has(shared, CHECKPOINT)
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
    # Room for the checkpoint, not for a conversation of another prefix as well: the
    # conversation goes first, at once (one that began with it would hold it instead).
    elsewhere = ids(model, "Something else entirely. Tell me about the sea.")
    full = PrefixCache(nbytes(checkpoint) + nbytes(prefill(model, elsewhere)[0]) - 1)
    assert full.store(shared, checkpoint, CHECKPOINT) == "stored"
    assert full.store(elsewhere, prefill(model, elsewhere)[0]) == "over_budget" and full.entries == 1 and full.has(shared, CHECKPOINT)
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
