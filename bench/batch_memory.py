"""What batching costs in memory and time (issue 14, review items 3 and 4), on a random-weight
llama: the transient peak of a join and a leave (mlx-lm's BatchKVCache `extend`, `filter`,
`extract` copy the batch), and the left padding of a short sequence merged with a long one.

    uv run --no-sync python -m bench.batch_memory [--long 4096] [--short 256] [--tiny]

`--tiny`: the tiny profile's model (imported from its GGUF as the daemon does) instead.
"""

from __future__ import annotations

import argparse
import gc
import time

import mlx.core as mx


def model(layers: int = 4, width: int = 256, kv_heads: int = 2, vocab: int = 2048):
    from mlx_lm.models import llama

    args = llama.ModelArgs.from_dict({
        "model_type": "llama", "vocab_size": vocab, "hidden_size": width, "num_attention_heads": 4, "num_key_value_heads": kv_heads,
        "num_hidden_layers": layers, "intermediate_size": 2 * width, "rms_norm_eps": 1e-5, "rope_theta": 10000.0,
        "tie_word_embeddings": True, "max_position_embeddings": 65536,
    })
    mx.random.seed(0)
    m = llama.Model(args)
    mx.eval(m.parameters())
    return m


class Member:
    def __init__(self, m, length: int, seed: int):
        from mlx_lm.models.cache import make_prompt_cache
        from mlx_lm.sample_utils import make_sampler

        from anyclaude.engine.decode import Decoder

        self.decoder = Decoder(m, make_prompt_cache(m), sampler=make_sampler(temp=0.0), sampling=("greedy",))
        prompt = [(seed * 7919 + i * 31) % 2000 + 1 for i in range(length)]
        *_, self.last = self.decoder.prefill(prompt, 512)


def kv(member) -> int:
    return sum(layer.nbytes for layer in member.decoder.cache)


def settle() -> int:
    gc.collect()
    mx.synchronize()
    mx.clear_cache()
    return mx.get_active_memory()


def joins(m, lengths: list[int]) -> list[dict]:
    """Each sequence joining in turn: the batch's bytes before, the joiner's, the peak above
    what was held before, and what is held after."""
    from anyclaude.engine.batch import Batch

    batch, rows = Batch(m), []
    for i, length in enumerate(lengths):
        member = Member(m, length, i)
        own = kv(member)
        held_batch = batch.nbytes or (kv(batch.members[0]) if batch.members else 0)
        before = settle()
        mx.reset_peak_memory()
        batch.join(member)
        if batch._merged is not None:
            mx.eval([layer.state for layer in batch._merged])
        peak = mx.get_peak_memory() - before
        after = settle() - before
        rows.append({"join": length, "batch_before": held_batch, "joiner": own, "peak_over": peak, "held_change": after, "batch_after": batch.nbytes})
    for member in list(batch.members[:-1]):
        held = batch.nbytes
        before = settle()
        mx.reset_peak_memory()
        cache = batch.leave(member)
        mx.eval([layer.state for layer in cache])
        if batch._merged is not None:
            mx.eval([layer.state for layer in batch._merged])
        peak = mx.get_peak_memory() - before
        rows.append({"leave": member.decoder.position, "batch_before": held, "extracted": sum(c.nbytes for c in cache), "peak_over": peak, "batch_after": batch.nbytes})
    return rows


def step_time(m, lengths: list[list[int]], steps: int = 16) -> tuple[float, int]:
    """Seconds per decode step of each group in `lengths` (a batch each, stepped in turn),
    and the bytes their batched caches hold."""
    from anyclaude.engine.batch import Batch

    batches = []
    for g, group in enumerate(lengths):
        batch = Batch(m)
        for i, length in enumerate(group):
            batch.join(Member(m, length, 10 * g + i))
        batches.append(batch)
    for batch in batches:  # a warm-up step each, and the merged caches evaluated
        for member, token in zip(batch.members, batch.step()):
            member.last = token
    held = sum(b.nbytes or sum(kv(x) for x in b.members) for b in batches)
    started = time.perf_counter()
    for _ in range(steps):
        for batch in batches:
            for member, token in zip(batch.members, batch.step()):
                member.last = token
    return (time.perf_counter() - started) / steps, held


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--long", type=int, default=4096)
    parser.add_argument("--short", type=int, default=256)
    parser.add_argument("--tiny", action="store_true")
    args = parser.parse_args()
    if args.tiny:
        from mlx_lm.utils import load

        from anyclaude import models, profiles

        (tiny,) = profiles.load("tiny").profile.models.values()
        m, _ = load(str(models.prepare(tiny)))
    else:
        m = model()
    per_token = Member(m, 1, 0)
    print(f"KV bytes per token: {kv(per_token) // 256} (a fresh cache holds 256 positions)")
    print("joins and leaves (bytes):")
    for row in joins(m, [args.long, args.short, args.long // 2, args.short]):
        print("  ", row)
    L, S = args.long, args.short
    mixes = {
        "1 long alone": [[L]],
        "1 short alone": [[S]],
        "long+short merged": [[L, S]],
        "long, short apart": [[L], [S]],
        "2 long + 2 short merged": [[L, L, S, S]],
        "2 long | 2 short grouped": [[L, L], [S, S]],
        "1 long + 3 short merged": [[L, S, S, S]],
        "1 long | 3 short grouped": [[L], [S, S, S]],
        "4 short merged": [[S, S, S, S]],
    }
    print(f"decode step (long {L}, short {S} tokens):")
    for name, groups in mixes.items():
        seconds, held = step_time(m, groups)
        print(f"   {name:28s} {seconds * 1000:7.2f} ms/step  {held / 2**20:7.2f} MiB of KV")


if __name__ == "__main__":
    main()
