"""The prefix KV cache: several entries, reused by longest token prefix, LRU by bytes.

Claude Code repeats its system prompt and tools (and the whole conversation so
far) on every turn; its side requests and subagents share only the system part.
So the engine keeps several entries: one per recent conversation (prompt plus
generated tokens, stored when a request ends, however it ends), and checkpoints
of the shared system+tools prefix, which are evicted last and, optionally,
persisted to disk so that the first request after a restart is warm too.

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
the end of the system+tools prefix, the end of each prompt before its answer (the
next turn re-renders the answer, and may part from it right there), the end of each
request, and where a prefill was cut short.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
from msgspec import Struct

CONVERSATION = "conversation"
CHECKPOINT = "checkpoint"
KEEP_ON_DISK = 4

# What became of an entry offered to `store` (the request log's `cache_store`):
STORED = "stored"
TOO_LARGE = "too_large"  # larger than the whole budget, `[cache] max_gb`
OVER_BUDGET = "over_budget"  # evicted at once: the entries kept before it (checkpoints) fill the budget
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


class Reuse(Struct):
    """What a lookup found: the KV cache to extend (or None) and how many prompt tokens it covers."""

    cache: list | None
    tokens: int
    # What the tokens came from: a conversation, a checkpoint, or "" (nothing).
    kind: str = ""
    lookup: str = HIT


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


class PrefixCache:
    """Entries for one model."""

    def __init__(self, max_bytes: int, *, persist_dir: Path | None = None):
        self.max_bytes = max_bytes
        self.persist_dir = persist_dir
        self._entries: list[Entry] = []
        self._lock = threading.Lock()
        self._unsaved: list[Entry] = []
        self.peak_bytes = 0

    @property
    def bytes(self) -> int:
        return sum(e.nbytes for e in self._entries)

    @property
    def entries(self) -> int:
        return len(self._entries)

    def configure(self, max_bytes: int, persist_dir: Path | None) -> None:
        """New settings, in effect now (any thread). Turning persistence on saves the
        checkpoints held now, after the next request."""
        with self._lock:
            self.max_bytes = max_bytes
            self._evict()
            if persist_dir is not None and self.persist_dir is None:
                self._unsaved = [e for e in self._entries if e.kind == CHECKPOINT]
            self.persist_dir = persist_dir

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
            best = max(self._entries, key=lambda e: self._usable(e, prompt))
            reuse = self._usable(best, prompt)
            shared = max(self._shared(e, prompt) for e in self._entries)
            lookup = NO_PREFIX if shared == 0 else HIT if reuse == shared else NOT_TRIMMABLE
            if reuse == 0:
                return Reuse(None, 0, lookup=lookup)
            best.used = time.monotonic()
            cut = len(best.tokens) - reuse
            # A prompt that shares a conversation's whole prompt continues it, even where
            # it parts from the answer as generated (cut at max_tokens, a stop sequence,
            # reasoning the template leaves out; a retry shares all but the last token):
            # the entry is taken over, trimmed, and stored back longer when the request ends.
            if best.kind == CONVERSATION and (cut == 0 or (reuse >= best.prompt - 1 and trimmable(best.cache))):
                from mlx_lm.models.cache import trim_prompt_cache

                self._entries = [e for e in self._entries if e is not best]
                trim_prompt_cache(best.cache, cut)
                return Reuse(best.cache, reuse, best.kind, lookup)
        return Reuse(prefix_copy(best.cache, reuse), reuse, best.kind, lookup)

    def store(self, tokens: list[int], cache: list, kind: str = CONVERSATION, *, prompt: int | None = None, side: bool = False) -> str:
        """Keep a cache holding exactly `tokens` (the first `prompt` of them the request's
        prompt, by default all; `side`: a side request's), then evict down to the budget
        (engine thread). Returns what became of it: STORED, TOO_LARGE, OVER_BUDGET,
        MISCOUNTED or EMPTY."""
        if not tokens:
            return EMPTY
        held = length(cache)
        if held is not None and held != len(tokens):
            return MISCOUNTED  # a cache we cannot account for is not reused
        entry = Entry(np.asarray(tokens), cache, nbytes(cache), kind, time.monotonic(), len(tokens) if prompt is None else prompt, side)
        with self._lock:
            # An entry that is a prefix of the new one (same kind) is redundant when caches trim.
            self._entries = [
                e
                for e in self._entries
                if not (e.kind == kind and trimmable(e.cache) and common_prefix(e.tokens, entry.tokens) == len(e.tokens))
            ]
            self._entries.append(entry)
            self._evict()
            self.peak_bytes = max(self.peak_bytes, self.bytes)
            if not any(e is entry for e in self._entries):
                return TOO_LARGE if entry.nbytes > self.max_bytes else OVER_BUDGET
        if kind == CHECKPOINT and self.persist_dir is not None:
            self._unsaved.append(entry)
        return STORED

    def save(self) -> None:
        """Write the checkpoints stored since the last call to disk (engine thread).

        Called once a request has its answer: a large model's checkpoint is gigabytes,
        and writing it must not delay a first token."""
        with self._lock:  # `configure` may change both from the event loop
            unsaved, self._unsaved, folder = self._unsaved, [], self.persist_dir
        for entry in unsaved if folder is not None else []:
            try:
                self._persist(entry, folder)
            except OSError:  # a full or read-only disk only costs a cold start later
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

    def load_persisted(self) -> int:
        """Load the checkpoints saved for this model; returns how many (engine thread, at start)."""
        from mlx_lm.models.cache import load_prompt_cache

        if self.persist_dir is None or not self.persist_dir.is_dir():
            return 0
        loaded = 0
        for path in _saved(self.persist_dir):
            try:
                cache, metadata = load_prompt_cache(str(path), return_metadata=True)
                tokens = json.loads(metadata["tokens"])
            except Exception:  # a damaged or foreign file only costs a cold start
                path.unlink(missing_ok=True)
                continue
            self._insert_loaded(tokens, cache)
            loaded += 1
        return loaded

    # --- internals -----------------------------------------------------------

    def _insert_loaded(self, tokens: list[int], cache: list) -> None:
        held = length(cache)
        if not tokens or (held is not None and held != len(tokens)):
            return
        with self._lock:
            self._entries.append(Entry(np.asarray(tokens), cache, nbytes(cache), CHECKPOINT, time.monotonic(), len(tokens)))
            self._evict()
            self.peak_bytes = max(self.peak_bytes, self.bytes)

    def _shared(self, entry: Entry, prompt: np.ndarray) -> int:
        # At least one prompt token must be left to compute the first logits.
        return max(0, min(common_prefix(entry.tokens, prompt), len(prompt) - 1))

    def _usable(self, entry: Entry, prompt: np.ndarray) -> int:
        common = self._shared(entry, prompt)
        if common == 0:
            return 0
        if common < len(entry.tokens) and not trimmable(entry.cache):
            return 0  # sliding-window and linear-attention caches only extend
        return common

    def _evict(self) -> None:
        # Least recently used first: side requests', then conversations, then checkpoints.
        while self._entries and sum(e.nbytes for e in self._entries) > self.max_bytes:
            victim = min(self._entries, key=lambda e: (e.kind == CHECKPOINT, not e.side, e.used))
            self._entries = [e for e in self._entries if e is not victim]

    def _persist(self, entry: Entry, folder: Path) -> None:
        from mlx_lm.models.cache import save_prompt_cache

        folder.mkdir(parents=True, exist_ok=True)
        digest = hashlib.sha256(entry.tokens.astype(np.int64).tobytes()).hexdigest()[:24]
        path = folder / f"{digest}.safetensors"
        if not path.exists():
            partial = path.with_name(f"{digest}.partial.safetensors")
            save_prompt_cache(str(partial), entry.cache, {"tokens": json.dumps(entry.tokens.tolist())})
            partial.replace(path)
        for old in _saved(folder)[KEEP_ON_DISK:]:
            old.unlink(missing_ok=True)


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
