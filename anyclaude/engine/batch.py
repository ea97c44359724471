"""Sequences decoded together: one forward pass per step for all of them (engine thread).

Continuous batching, as mlx-lm's `BatchGenerator` does it: a sequence joins once its
prompt is computed (alone, a chunk at a time between the batch's steps, by the engine)
and leaves when it ends; the others go on. Each step feeds every member its last token
in one pass over a batched cache (mlx-lm's `BatchKVCache` and kin, left-padded to one
length), then each member's own logits processors and sampler pick its next token.

A lone member decodes on its own cache; the caches are merged into a batched one only
when a second joins (a copy of each member's KV, made once), and a member's cache is
copied out when it leaves (for the prefix cache). Models whose cache types cannot be
merged (quantized keys, images fed through a wrapper) do not batch: each such member is a
batch of its own, stepped in turn with the others, so none waits for another's whole answer.
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx



def batchable(cache: list) -> bool:
    """Whether a cache of these layer types can be merged with others (mlx-lm's test)."""
    return all(hasattr(layer, "merge") for layer in cache)


class Batch:
    """Members decoding together. A member is anything with a `decoder` (decode.Decoder)
    and `last` (its last token, not yet fed); the batch owns their caches while they are in it."""

    def __init__(self, model: Any):
        self.model = model
        self.members: list = []
        self._merged: list | None = None  # the batched cache, once there are two
        # KV bytes copied into the batched cache and out of it (the price of merging).
        self.copied = 0

    def __len__(self) -> int:
        return len(self.members)

    @property
    def alone(self) -> bool:
        """One member, on its own cache (nothing merged)."""
        return len(self.members) == 1 and self._merged is None

    def join(self, member) -> None:
        if not self.members:
            self.members.append(member)
            return
        # A layer at a time, each evaluated before the next and the originals let go
        # of as it goes: the copies beside the originals are one layer's, not the whole
        # batch's; and they are made now, while the engine holds room for them
        # (`join_cost`), not at the next step's evaluation.
        if self._merged is None:
            (first,) = self.members
            own, first.decoder.cache = first.decoder.cache, None
            self._merged = []
            for i, layer in enumerate(own):
                self._merged.append(type(layer).merge([layer]))
                own[i] = None
                mx.eval(self._merged[-1].state)
            self.copied += self.nbytes
        own, member.decoder.cache = member.decoder.cache, None  # its KV lives in the batch now
        for i, layer in enumerate(self._merged):
            # Extending re-pads and concatenates: the whole layer is copied, the newcomer's included.
            layer.extend(type(own[i]).merge([own[i]]))
            own[i] = None
            mx.eval(layer.state)
        self.copied += self.nbytes
        self.members.append(member)

    def join_cost(self, member) -> int:
        """Bytes of KV that `member` joining would hold at its peak beyond what is held
        now: what the merged cache grows by (every row as long as the longest), and one
        layer's copies made beside it (the layer merged, the newcomer's, a padded copy
        of the old; measured by bench/batch_memory.py)."""
        if not self.members:
            return 0
        # A lone member's cache is merged at its length (not the 256-position steps it
        # grows by); a merged one is copied whole.
        first = self.members[0].decoder.cache if self._merged is None else None
        batch = self.nbytes // len(self) if first is None else _used(first)
        joining = _used(member.decoder.cache)
        row, layers = max(batch, joining), len(member.decoder.cache)
        grows = (len(self) + 1) * row - (self.nbytes if first is None else _nbytes(first)) - _nbytes(member.decoder.cache)
        return max(0, grows) + -(-(2 * len(self) + 3) * row // layers)

    def leave_cost(self) -> int:
        """Bytes of KV a member leaving copies at its peak: its own row, and one layer of
        the rows that stay."""
        if self._merged is None:
            return 0
        return self.nbytes // len(self) + -(-2 * self.nbytes // len(self._merged))

    def fits(self, member, ratio: float) -> bool:
        """Whether `member` is within `ratio` of the members' lengths: merged, the shorter
        rows are left-padded to the longest, in memory and in every step's attention."""
        lengths = [m.decoder.position for m in self.members] + [member.decoder.position]
        return max(lengths) <= ratio * max(1, min(lengths))

    def leave(self, member) -> list:
        """Take `member` out; its cache, on its own again."""
        i = self.members.index(member)
        self.members.pop(i)
        if self._merged is None:
            return member.decoder.cache
        cache = [layer.extract(i) for layer in self._merged]
        mx.eval([layer.state for layer in cache])  # (copies made now, a layer at a time, as in `join`)
        self.copied += sum(layer.nbytes for layer in cache)
        if self.members:
            keep = [j for j in range(len(self.members) + 1) if j != i]
            for layer in self._merged:
                layer.filter(keep)
                mx.eval(layer.state)
            self.copied += self.nbytes
        else:
            self._merged = None
        member.decoder.cache = cache
        return cache

    def step(self) -> list[int | Exception]:
        """Feed each member its last token; the next token of each, in member order, or
        what went wrong with that member's processors (a forward pass that fails raises)."""
        if self._merged is None:
            (member,) = self.members
            return [member.decoder.step(member.last)]
        inputs = mx.array([[m.last] for m in self.members])
        logits = self.model(inputs, cache=self._merged)[:, -1, :]
        first = self.members[0].decoder
        if all(m.decoder.processors is None and m.decoder.sampling == first.sampling is not None for m in self.members):
            # One sampler call for them all: the same settings, nothing to process per row.
            for member in self.members:
                member.decoder.position += 1
            return first.sampler(logits - mx.logsumexp(logits, axis=-1, keepdims=True)).tolist()
        picked: list[mx.array | Exception] = []
        for i, member in enumerate(self.members):
            member.decoder.position += 1
            try:
                picked.append(member.decoder.pick(inputs[i], logits[i : i + 1]).reshape(1))
            except Exception as exc:  # one request's grammar, not the others' concern
                picked.append(exc)
        chosen = [p for p in picked if not isinstance(p, Exception)]
        tokens = iter(mx.concatenate(chosen).tolist() if chosen else [])
        return [p if isinstance(p, Exception) else next(tokens) for p in picked]

    @property
    def nbytes(self) -> int:
        if self._merged is None:
            return 0
        return sum(layer.nbytes for layer in self._merged)


def _used(cache: list) -> int:
    """Bytes of a sequence's own cache that hold tokens: a layer of keys and values
    allocates positions ahead; other layers (states) count whole."""
    used = 0
    for layer in cache:
        keys, offset = getattr(layer, "keys", None), getattr(layer, "offset", None)
        if hasattr(keys, "shape") and isinstance(offset, int) and keys.shape[2]:
            used += layer.nbytes * min(offset, keys.shape[2]) // keys.shape[2]
        else:
            used += layer.nbytes
    return used


def _nbytes(cache: list) -> int:
    return sum(layer.nbytes for layer in cache)
