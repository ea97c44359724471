"""The prefix KV cache: several entries, reused by longest token prefix, LRU by bytes.

Claude Code repeats its system prompt and tools (and the whole conversation so
far) on every turn; its side requests and subagents share only the system part.
So the engine keeps several entries: one per recent conversation (prompt plus
generated tokens, stored when a request ends, however it ends), and checkpoints
of each system+tools prefix (main, each subagent type), optionally persisted to
disk so that the first request after a restart is warm too.

Eviction fits Claude Code's load, where one prefix is 12-20K tokens: one recency
order over all entries (side requests' first), except that the newest checkpoint of
each prefix is protected, evicted only once nothing else is left. A checkpoint is
not kept twice: a conversation that begins with it holds it (its first tokens are
the checkpoint), and when that conversation is evicted it is cut back to the
checkpoint instead of dropped. The budget covers the stored entries and the KV of
the requests being generated (each one's prompt plus `max_tokens`) together.

The store is a short list searched linearly (a handful of entries); it is owned
by the engine thread, and `peek` reads it under a lock from the event loop so
that `message_start` can report cached tokens before the engine gets to the
request. KV state is never shared between a request and the store: reuse takes
a copy, or takes over a conversation the request continues (trimmed to what it
shares) to store it again, extended.

Every mlx-lm cache type is kept. An entry knows its tokens from the token array it
was stored with (never from the layers' `size()`). Caches that cannot be trimmed
(sliding-window layers past their window, linear-attention and SSM layers) are reused
by exact prefix only, so the engine stores them at the points where reuse happens:
the end of the system+tools prefix; each prompt's end before its generation prompt
(the next turn renders the answer from there, and may part from it right there:
Qwen3.5's template leaves out earlier turns' reasoning once the user speaks again); the
end of each request; and where a prefill was cut short. Of such a conversation's
entries, one of each kind is kept (a newer one that extends it replaces it), except
those at the user's turns: the next message of the user resumes at the last of them.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import threading
import time
from pathlib import Path
from collections.abc import Callable
from typing import Any

import numpy as np
from msgspec import Struct

CONVERSATION = "conversation"
CHECKPOINT = "checkpoint"
# Where in its request a conversation entry was stored (Entry.point): "" at the end (the
# prompt and what was generated), or before the generation prompt, after tool results
# (REPLY) or after the user's own message (TURN).
REPLY = "reply"
TURN = "turn"
KEEP_ON_DISK = 4

# What became of an entry offered to `store` (the request log's `cache_store`):
STORED = "stored"
TOO_LARGE = "too_large"  # larger than the whole budget, `[cache] max_gb`
OVER_BUDGET = "over_budget"  # evicted at once: protected checkpoints and the live request fill the budget
MISCOUNTED = "miscounted"  # its layers hold another number of tokens than were given to the model
EMPTY = "empty"  # no tokens: nothing was computed
FAILED = "failed"  # not offered (the engine's): a forward pass failed, its layers may disagree

# Why a lookup reused no more than it did (the request log's `cache_lookup`):
HIT = "hit"  # all that any entry shares with the prompt
NO_ENTRIES = "no_entries"
NO_PREFIX = "no_prefix"  # no entry begins as the prompt does
NOT_TRIMMABLE = "not_trimmable"  # an entry shares more, but its layers cannot be cut back to it


class Entry(Struct):
    tokens: np.ndarray
    cache: list
    nbytes: int
    kind: str
    used: float
    prompt: int  # how many of `tokens` were the prompt (the rest were generated)
    # A side request's (Claude Code's haiku titles and classifiers): rarely continued,
    # so evicted before the conversations the user works in.
    side: bool = False
    # The checkpoint this entry begins with and holds (its token count; 0: none), which
    # it is cut back to when evicted, if no other entry holds it.
    holds: int = 0
    point: str = ""  # where in its request it was stored: "", REPLY or TURN


class Reuse(Struct):
    """What a lookup found: the KV cache to extend (or None) and how many prompt tokens it covers."""

    cache: list | None
    tokens: int
    # What the tokens came from: a conversation, a checkpoint, or "" (nothing).
    kind: str = ""
    lookup: str = HIT


class Eviction(Struct, frozen=True):
    """An entry evicted (or cut back to the checkpoint it holds), for the log's `cache.evict`."""

    kind: str  # conversation or checkpoint
    tokens: int
    bytes: int
    # Why: "budget" (a new entry did not fit), "live" (room for the request being
    # generated), "settings" (a smaller budget from an edited profile).
    reason: str
    # Tokens left of it: the checkpoint a conversation was cut back to (0: all gone).
    kept: int = 0
    idle_s: float = 0.0  # seconds since it was last used
    side: bool = False


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    if n == 0:
        return 0
    differ = np.flatnonzero(a[:n] != b[:n])
    return int(differ[0]) if len(differ) else n


def nbytes(cache: list) -> int:
    return sum(c.nbytes for c in cache)


def length(cache: list) -> int | None:
    """Tokens a model's cache has seen, by the layers that count them (attention layers'
    `offset`; linear-attention and SSM layers keep no count), or None where none does
    or they disagree. `size()` will not do: it is optional (0 by default), and a
    sliding-window layer's is at most its window."""
    seen = {n for layer in cache if (n := _seen(layer)) is not None}
    return seen.pop() if len(seen) == 1 else None


def _seen(layer: Any) -> int | None:
    offset = getattr(layer, "offset", None)
    if isinstance(offset, int):
        return offset
    counts = {n for sub in getattr(layer, "caches", ()) if (n := _seen(sub)) is not None}  # a CacheList
    return counts.pop() if len(counts) == 1 else None


def kinds(cache: list) -> list[str]:
    """The cache types of a model's layers, e.g. ["ArraysCache", "KVCache"]."""
    return sorted({type(layer).__name__ for layer in cache})


class KVSize(Struct, frozen=True):
    """What a model's KV cache takes: bytes per token of its growing layers (attention),
    the same capped at their window (sliding-window layers), and a fixed part
    (linear-attention and SSM state)."""

    per_token: int = 0
    windowed: list[tuple[int, int]] = []  # (bytes per token, window)
    fixed: int = 0

    def bytes(self, tokens: int) -> int:
        return self.fixed + self.per_token * tokens + sum(b * min(tokens, w) for b, w in self.windowed)


def measure(model: Any) -> KVSize:
    """A model's KV size, from its cache after one token (cheap: one forward pass)."""
    import mlx.core as mx
    from mlx_lm.models.cache import make_prompt_cache

    kv = make_prompt_cache(model)
    mx.eval(model(mx.array([[0]]), cache=kv))
    per_token, windowed, fixed = 0, [], 0
    for layer in _layers(kv):
        keys = getattr(layer, "keys", None)
        if keys is None or not hasattr(keys, "shape"):  # ArraysCache, MambaCache: a state
            fixed += layer.nbytes
            continue
        # (batch, heads, positions, dim), allocated some positions at a time.
        rate = (keys.nbytes + layer.values.nbytes) // keys.shape[2]
        window = getattr(layer, "max_size", None)
        if window:
            windowed.append((rate, window))
        else:
            per_token += rate
    return KVSize(per_token, windowed, fixed)


def _layers(cache: list) -> list:
    return [sub for layer in cache for sub in (_layers(layer.caches) if hasattr(layer, "caches") else [layer])]


# What is kept back from the memory the models may use, for activations, the
# tokenizer, Python and the rest of the process.
RESERVE = 0.1
MIN_RESERVE = 2**30
FALLBACK_BYTES = 2 * 2**30  # until the model is loaded and measured


def default_budget(memory: int, weights: int, models: int = 1) -> int:
    """The KV budget (stored entries and the live request together) when `[cache]
    max_gb` is not set: this model's share of the memory the models may use, less
    its weights and a reserve."""
    reserve = max(int(memory * RESERVE), MIN_RESERVE)
    return max(0, (memory - reserve) // max(models, 1) - weights)


class PrefixCache:
    """Entries for one model."""

    def __init__(self, max_bytes: int | None, *, persist_dir: Path | None = None, models: int = 1, on_evict: Callable[[Eviction], None] | None = None):
        # None: from the device's memory once the model is loaded (`prepare`).
        self.configured = max_bytes
        self.max_bytes = FALLBACK_BYTES if max_bytes is None else max_bytes
        self.persist_dir = persist_dir
        self.models = models
        self.on_evict = on_evict
        self.size = KVSize()
        self._memory = (0, 0)  # the memory the models may use, this model's weights
        self._entries: list[Entry] = []
        self._lock = threading.Lock()
        self._unsaved: list[Entry] = []
        self._evicted: list[Eviction] = []
        # The checkpoints' tokens seen (newest last): what a conversation holds.
        self._prefixes: list[np.ndarray] = []
        self._touched: list[np.ndarray] = []  # checkpoints reused since the last save
        self.live_bytes = 0
        self._live: dict[object, int] = {}
        self.peak_bytes = 0

    @property
    def bytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    @property
    def entries(self) -> int:
        return len(self._entries)

    def prepare(self, model: Any, memory: int = 0, weights: int = 0) -> None:
        """Measure the model's KV size and, with no configured budget, size the budget
        from the memory the models may use and its weights (engine thread, once loaded)."""
        self.size = measure(model)
        self._memory = (memory, weights)
        with self._lock:
            self._set_budget(self.configured)
        self._announce()

    def configure(self, max_bytes: int | None, persist_dir: Path | None) -> None:
        """New settings, in effect now (any thread); None: the budget from memory.
        Turning persistence on saves the checkpoints held now, after the next request."""
        with self._lock:
            self.configured = max_bytes
            self._set_budget(max_bytes, "settings")
            if persist_dir is not None and self.persist_dir is None:
                self._unsaved = [e for e in self._entries if e.kind == CHECKPOINT]
            self.persist_dir = persist_dir
        self._announce()

    def _set_budget(self, max_bytes: int | None, reason: str = "budget") -> None:
        memory, weights = self._memory
        if max_bytes is not None:
            self.max_bytes = max_bytes
        elif memory:
            self.max_bytes = default_budget(memory, weights, self.models)
        self._evict(reason)

    def reserve(self, owner: object, tokens: int) -> None:
        """Make room for the KV of a request being generated, `tokens` long at most (its
        prompt plus max_tokens; 0 once it has ended), evicting what it needs (engine thread).
        The requests decoding together each hold their own reservation."""
        self.hold(owner, self.size.bytes(tokens) if tokens else 0)

    def hold(self, owner: object, nbytes: int) -> None:
        """Make room for `nbytes` of live KV that `owner` holds (0: let go), evicting
        stored entries for it (engine thread): a request's reservation, or a copy the
        engine is about to make (a batch merging or splitting, an entry being cut out)."""
        with self._lock:
            if nbytes:
                self._live[owner] = nbytes
            else:
                self._live.pop(owner, None)
            self.live_bytes = sum(self._live.values())
            self._evict("live")
            self.peak_bytes = max(self.peak_bytes, self.bytes + self.live_bytes)
        self._announce()

    def room(self, tokens: int, extra: int = 0) -> bool:
        """Whether a request `tokens` long (and `extra` bytes besides) fits beside the ones
        being generated (stored entries can be evicted for it; the live ones cannot)."""
        return self.fits(self.size.bytes(tokens) + extra)

    def fits(self, nbytes: int) -> bool:
        """Whether `nbytes` more of live KV fit beside what is held live now."""
        return self.live_bytes + nbytes <= self.max_bytes

    def peek(self, tokens: list[int]) -> int:
        """How many leading prompt tokens a fetch would reuse now (any thread)."""
        prompt = np.asarray(tokens)
        with self._lock:
            return max((self._usable(e, prompt) for e in self._entries), default=0)

    def fetch(self, tokens: list[int]) -> Reuse:
        """The best entry for a prompt, as a cache the request may extend (engine thread)."""
        prompt = np.asarray(tokens)
        with self._lock:
            if not self._entries:
                return Reuse(None, 0, lookup=NO_ENTRIES)
            shares = [(self._shared(e, prompt), e) for e in self._entries]  # one comparison each
            reuse, best = max(((self._reusable(e, shared), e) for shared, e in shares), key=lambda pair: pair[0])
            shared = max(shared for shared, _ in shares)
            lookup = NO_PREFIX if shared == 0 else HIT if reuse == shared else NOT_TRIMMABLE
            if reuse == 0:
                return Reuse(None, 0, lookup=lookup)
            best.used = time.monotonic()
            held = self._held(best)
            if held is not None and len(held) <= reuse:  # its file, if saved, is among the newest now
                self._touched.append(held)
            cut = len(best.tokens) - reuse
            # A prompt that shares a conversation's whole prompt continues it, even where
            # it parts from the answer as generated (cut at max_tokens, a stop sequence,
            # reasoning the template leaves out; a retry shares all but the last token):
            # the entry is taken over, trimmed, and stored back longer when the request ends.
            # (A snapshot before a generation prompt is copied: the next turn may need it too.)
            if best.kind == CONVERSATION and not best.point and (cut == 0 or (reuse >= best.prompt - 1 and trimmable(best.cache))):
                from mlx_lm.models.cache import trim_prompt_cache

                self._entries = [e for e in self._entries if e is not best]
                trim_prompt_cache(best.cache, cut)
                return Reuse(best.cache, reuse, best.kind, lookup)
        return Reuse(prefix_copy(best.cache, reuse), reuse, best.kind, lookup)

    def store(self, tokens: list[int], cache: list, kind: str = CONVERSATION, *, prompt: int | None = None, side: bool = False, point: str = "") -> str:
        """Keep a cache holding exactly `tokens` (the first `prompt` of them the request's
        prompt, by default all; `side`: a side request's; `point`: see Entry), then evict
        down to the budget (engine thread). Returns what became of it: STORED, TOO_LARGE,
        OVER_BUDGET, MISCOUNTED or EMPTY."""
        if not tokens:
            return EMPTY
        held = length(cache)
        if held is not None and held != len(tokens):
            return MISCOUNTED  # a cache we cannot account for is not reused
        entry = Entry(np.asarray(tokens), cache, nbytes(cache), kind, time.monotonic(), len(tokens) if prompt is None else prompt, side, point=point)
        with self._lock:
            if kind == CHECKPOINT:
                self._remember(entry.tokens)
            self._add(entry)
            kept = any(e is entry for e in self._entries)
        self._announce()
        if not kept:
            return TOO_LARGE if entry.nbytes > self.max_bytes else OVER_BUDGET
        if kind == CHECKPOINT and self.persist_dir is not None:
            self._unsaved.append(entry)
        return STORED

    def save(self) -> None:
        """Write the checkpoints stored since the last call to disk, and mark those
        reused as the newest there (engine thread).

        Called once a request has its answer: a large model's checkpoint is gigabytes,
        and writing it must not delay a first token."""
        with self._lock:  # `configure` may change both from the event loop
            unsaved, self._unsaved, folder = self._unsaved, [], self.persist_dir
            touched, self._touched = self._touched, []
        if folder is None:
            return
        for entry in unsaved:
            try:
                self._persist(entry, folder)
            except OSError:  # a full or read-only disk only costs a cold start later
                pass
        for tokens in touched:
            try:
                os.utime(folder / f"{_digest(tokens)}.safetensors")
            except OSError:  # not saved (yet, or at all): nothing to mark
                pass

    def demote(self, tokens: list[int], beyond: int) -> int:
        """Make the conversations that share more than `beyond` tokens with `tokens` (a
        conversation that was just compacted away) the first to be evicted; how many."""
        tokens_ = np.asarray(tokens)
        with self._lock:
            dead = [e for e in self._entries if e.kind == CONVERSATION and common_prefix(e.tokens, tokens_) > beyond]
            for entry in dead:  # evicted as side requests' are, and before them
                entry.used = float("-inf")
                entry.side = True
        return len(dead)

    def has(self, tokens: list[int], kind: str) -> bool:
        prompt = np.asarray(tokens)
        with self._lock:
            return any(e.kind == kind and len(e.tokens) == len(prompt) and common_prefix(e.tokens, prompt) == len(prompt) for e in self._entries)

    def holds(self, tokens: list[int]) -> bool:
        """Whether the checkpoint `tokens` is kept, as an entry of its own or as the
        beginning of an entry that holds it."""
        prefix = np.asarray(tokens)
        with self._lock:
            return any(self._holds(e, prefix) for e in self._entries)

    def load_persisted(self) -> int:
        """Load the checkpoints saved for this model, the newest first, as many as fit;
        returns how many (engine thread, at start)."""
        from mlx_lm.models.cache import load_prompt_cache

        if self.persist_dir is None or not self.persist_dir.is_dir():
            return 0
        loaded = 0
        started = time.monotonic()
        for rank, path in enumerate(_saved(self.persist_dir)):
            if self.bytes + _tensor_bytes(path) > self.max_bytes + 2**20:  # (a few small arrays besides the KV)
                continue  # an older one may be smaller; this one is not read for nothing
            try:
                cache, metadata = load_prompt_cache(str(path), return_metadata=True)
                tokens = json.loads(metadata["tokens"])
            except Exception:  # a damaged or foreign file only costs a cold start
                path.unlink(missing_ok=True)
                continue
            # Used as recently as saved: the newest file is the last to be evicted.
            loaded += self._insert_loaded(tokens, cache, started - rank)
        self._announce()
        return loaded

    # --- internals -----------------------------------------------------------

    def _insert_loaded(self, tokens: list[int], cache: list, used: float) -> int:
        held = length(cache)
        if not tokens or (held is not None and held != len(tokens)):
            return 0
        entry = Entry(np.asarray(tokens), cache, nbytes(cache), CHECKPOINT, used, len(tokens))
        with self._lock:
            self._prefixes.insert(0, entry.tokens)  # older than any seen since the start
            self._add(entry)
            return int(any(e is entry for e in self._entries))

    def _remember(self, prefix: np.ndarray) -> None:
        self._prefixes = [p for p in self._prefixes if not _same(p, prefix)][-(MAX_PREFIXES - 1) :] + [prefix]

    def _add(self, entry: Entry) -> None:
        if trimmable(entry.cache):
            # The longest checkpoint it begins with, which it then holds.
            entry.holds = max((len(p) for p in self._prefixes if len(p) <= len(entry.tokens) and common_prefix(p, entry.tokens) == len(p)), default=0)
        # What the new entry holds need not be kept apart: an entry of the same kind it
        # begins with, or a checkpoint it holds (which it would be cut back to). One that
        # cannot be trimmed is replaced by a newer one stored at the same point of its
        # request, except at the user's turns: a branch, or the user's next message after
        # a template left reasoning out, resumes at one of those.
        self._entries = [
            e
            for e in self._entries
            if not (
                common_prefix(e.tokens, entry.tokens) == len(e.tokens)
                and (
                    (e.kind == entry.kind and trimmable(e.cache))
                    or (e.kind == CHECKPOINT and 0 < len(e.tokens) <= entry.holds)
                    or (e.kind == entry.kind == CONVERSATION and e.point == entry.point != TURN)
                )
            )
        ]
        self._entries.append(entry)
        self._evict("budget", entry)
        self.peak_bytes = max(self.peak_bytes, self.bytes + self.live_bytes)

    def _holds(self, entry: Entry, prefix: np.ndarray) -> bool:
        held = self._held(entry)
        return held is not None and len(held) == len(prefix) and common_prefix(held, prefix) == len(prefix)

    def _shared(self, entry: Entry, prompt: np.ndarray) -> int:
        # At least one prompt token must be left to compute the first logits.
        return max(0, min(common_prefix(entry.tokens, prompt), len(prompt) - 1))

    def _usable(self, entry: Entry, prompt: np.ndarray) -> int:
        return self._reusable(entry, self._shared(entry, prompt))

    def _reusable(self, entry: Entry, common: int) -> int:
        if common == 0:
            return 0
        if common < len(entry.tokens) and not trimmable(entry.cache):
            return 0  # sliding-window and linear-attention caches only extend
        return common

    def _protected(self, entry: Entry) -> bool:
        # The newest checkpoint of each prefix: no newer entry holds a version of it
        # (the same agent's prefix after Claude Code changed its tools, say).
        if entry.kind != CHECKPOINT:
            return False
        return not any(
            o is not entry and o.used > entry.used and (held := self._held(o)) is not None and _same(held, entry.tokens) for o in self._entries
        )

    def _held(self, entry: Entry) -> np.ndarray | None:
        # The checkpoint an entry is or begins with (None: none).
        held = len(entry.tokens) if entry.kind == CHECKPOINT else entry.holds
        return entry.tokens[:held] if held else None

    def _evict(self, reason: str, incoming: Entry | None = None) -> None:
        # One recency order (side requests' and compacted conversations' first), the
        # newest checkpoint of each prefix last. Caller holds the lock.
        limit = self.max_bytes - self.live_bytes
        now = time.monotonic()
        while self._entries and sum(e.nbytes for e in self._entries) > limit:
            victim = min(self._entries, key=lambda e: (self._protected(e), not e.side, e.used))
            self._entries = [e for e in self._entries if e is not victim]
            kept = 0
            prefix = victim.tokens[: victim.holds]
            if victim.kind == CONVERSATION and victim.holds and not any(self._holds(e, prefix) for e in self._entries):
                # The checkpoint it holds stays, as an entry of its own: a copy of its
                # first tokens (the conversation's buffers are freed with it).
                rest = Entry(prefix, prefix_copy(victim.cache, victim.holds), 0, CHECKPOINT, victim.used, victim.holds)
                rest.nbytes = nbytes(rest.cache)
                self._entries.append(rest)
                kept = victim.holds
            if victim is incoming:  # never kept: the store's outcome says so
                continue
            idle = 0.0 if victim.used == float("-inf") else round(now - victim.used, 3)
            self._evicted.append(Eviction(victim.kind, len(victim.tokens), victim.nbytes, reason, kept, idle, victim.side))

    def _announce(self) -> None:
        # Outside the lock: the callback writes the log.
        with self._lock:
            evicted, self._evicted = self._evicted, []
        for eviction in evicted if self.on_evict is not None else []:
            try:
                self.on_evict(eviction)
            except Exception:  # the log's trouble, not the cache's
                pass

    def _persist(self, entry: Entry, folder: Path) -> None:
        from mlx_lm.models.cache import save_prompt_cache

        folder.mkdir(parents=True, exist_ok=True)
        digest = _digest(entry.tokens)
        path = folder / f"{digest}.safetensors"
        if path.exists():
            os.utime(path)  # the newest again
        else:
            partial = path.with_name(f"{digest}.partial.safetensors")
            save_prompt_cache(str(partial), entry.cache, {"tokens": json.dumps(entry.tokens.tolist())})
            partial.replace(path)
        for old in _saved(folder)[KEEP_ON_DISK:]:
            old.unlink(missing_ok=True)


MAX_PREFIXES = 32  # checkpoints remembered (tokens only), for what conversations hold


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Whether two checkpoints are versions of one prefix: they share most of the
    shorter one (distinct agents' system prompts part within their first lines)."""
    return 2 * common_prefix(a, b) > min(len(a), len(b))


def _tensor_bytes(path: Path) -> int:
    # A safetensors file: an 8-byte header length, the header (with the tokens), the tensors.
    try:
        with open(path, "rb") as f:
            return path.stat().st_size - 8 - int.from_bytes(f.read(8), "little")
    except OSError:
        return 0


def _digest(tokens: np.ndarray) -> str:
    return hashlib.sha256(np.asarray(tokens).astype(np.int64).tobytes()).hexdigest()[:24]


def _saved(directory: Path) -> list[Path]:
    """Saved checkpoints, newest first."""
    files = [p for p in directory.glob("*.safetensors") if ".partial" not in p.name]
    return sorted(files, key=lambda p: p.stat().st_mtime, reverse=True)


def prefix_copy(cache: list, tokens: int) -> list:
    """A copy of a model's cache holding only its first `tokens` tokens."""
    return [_prefix_copy(layer, tokens) for layer in cache]


def _prefix_copy(layer: Any, tokens: int) -> Any:
    """A copy of one layer's cache holding only its first `tokens` tokens.

    A plain KV cache is sliced, so a side request that shares 1,500 tokens with a
    long conversation does not carry (and keep) a copy of the whole conversation's
    buffer; other cache types are copied whole and trimmed (those that cannot be
    trimmed are only ever copied whole: their entries are reused by exact prefix).
    """
    from mlx_lm.models.cache import KVCache

    if type(layer) is KVCache and layer.keys is not None:
        import mlx.core as mx

        copy_ = KVCache()
        copy_.keys = mx.array(layer.keys[..., :tokens, :])
        copy_.values = mx.array(layer.values[..., :tokens, :])
        copy_.offset = tokens
        mx.eval(copy_.keys, copy_.values)  # a buffer of its own, not a view of the entry's
        return copy_
    copy_ = copy.deepcopy(layer)
    seen = _seen(copy_)
    if seen is not None and seen > tokens and copy_.is_trimmable():
        copy_.trim(seen - tokens)
    return copy_



def trimmable(cache: list) -> bool:
    """Whether a model's cache can be cut back to a shorter prefix."""
    from mlx_lm.models.cache import can_trim_prompt_cache

    return can_trim_prompt_cache(cache)


def trimmable_at(cache: list, tokens: int) -> bool:
    """Whether a model's cache could still be cut back once it holds `tokens` tokens (a
    sliding-window layer can until its window is full)."""
    return trimmable(cache) and all(tokens < getattr(layer, "max_size", tokens + 1) for layer in _layers(cache))
