"""The CPU path's attention and SwiGLU (anyclaude.engine.cpu.fast) against MLX's own, on random
inputs and through the tiny model."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.models import llama
from mlx_lm.models.cache import make_prompt_cache

from anyclaude.engine.cpu import fast as cpu

# MLX's own, as anyclaude.engine.cpu.fast kept them (an engine loaded in this process replaces them).
MLX = cpu._mlx_attention
MLX_SWIGLU = cpu._mlx_swiglu


def inputs(batch: int, heads: int, kv_heads: int, length: int, width: int, seed: int = 0):
    mx.random.seed(seed)
    q = mx.random.normal((batch, heads, length, 64))
    k = mx.random.normal((batch, kv_heads, width, 64))
    v = mx.random.normal((batch, kv_heads, width, 64))
    return q, k, v


@pytest.mark.parametrize(
    "shape",
    [
        (1, 9, 3, 169, 2569),  # a warm turn's chunk on top of a cached prefix (grouped heads)
        (1, 8, 8, 64, 64),  # a first chunk, one key head per query head
        (2, 4, 2, 7, 30),  # a batch
    ],
)
@pytest.mark.parametrize("mask", [None, "causal"])
def test_matches_mlx(shape, mask):
    q, k, v = inputs(*shape)
    expected = MLX(q, k, v, scale=0.125, mask=mask)
    got = cpu.attention(q, k, v, scale=0.125, mask=mask)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert mx.allclose(got, expected, atol=1e-5, rtol=1e-5).item()


def test_long_prompts_go_in_row_blocks(monkeypatch):
    q, k, v = inputs(1, 6, 3, 50, 80)
    monkeypatch.setattr(cpu, "_BLOCK", 6 * 80 * 7)  # 7 rows per block: 8 blocks, the last short
    got = cpu.attention(q, k, v, scale=0.125, mask="causal")
    assert mx.allclose(got, MLX(q, k, v, scale=0.125, mask="causal"), atol=1e-5, rtol=1e-5).item()


def test_inside_a_compiled_function_it_is_mlx_s_own():
    # mlx-vlm compiles the attention of Qwen's vision tower: nothing can be evaluated
    # while MLX traces it, so NumPy's softmax cannot run there.
    q, k, v = inputs(1, 2, 2, 16, 16)
    compiled = mx.compile(lambda q, k, v: cpu.attention(q, k, v, scale=0.125))
    assert mx.allclose(compiled(q, k, v), MLX(q, k, v, scale=0.125), atol=1e-5, rtol=1e-5).item()


def test_what_it_does_not_handle_goes_to_mlx(monkeypatch):
    calls = []
    monkeypatch.setattr(cpu, "_mlx_attention", lambda *a, **k: calls.append(k) or MLX(*a, **k))
    q, k, v = inputs(1, 4, 2, 1, 30)
    cpu.attention(q, k, v, scale=0.125, mask=None)  # decoding one token
    q, k, v = inputs(1, 4, 2, 5, 30)
    window = mx.arange(30)[None] > mx.arange(25, 30)[:, None] - 8  # an array mask (sliding window)
    assert mx.allclose(cpu.attention(q, k, v, scale=0.125, mask=window), MLX(q, k, v, scale=0.125, mask=window)).item()
    cpu.attention(q.astype(mx.float16), k.astype(mx.float16), v.astype(mx.float16), scale=0.125, mask="causal")
    assert len(calls) == 3
    cpu.attention(q, k, v, scale=0.125, mask="causal")
    assert len(calls) == 3


def test_swiglu_matches_mlx(monkeypatch):
    mx.random.seed(1)
    gate = mx.random.normal((1, 169, 1536)) * 40  # into the range where exp(-g) overflows
    x = mx.random.normal((1, 169, 1536))
    assert mx.allclose(cpu.swiglu(gate, x), MLX_SWIGLU(gate, x), atol=1e-5, rtol=1e-5).item()
    calls = []
    monkeypatch.setattr(cpu, "_mlx_swiglu", lambda g, y: calls.append(g.shape) or MLX_SWIGLU(g, y))
    cpu.swiglu(gate[:, :1], x[:, :1])  # decoding one token
    cpu.swiglu(gate.astype(mx.float16), x.astype(mx.float16))
    assert calls == [(1, 1, 1536), (1, 169, 1536)]


def test_the_tiny_model_predicts_the_same_tokens(monkeypatch, tiny_net):
    model, tokenizer = tiny_net
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "List three uses of a paperclip, briefly. " * 12}], add_generation_prompt=True)

    def logits():
        cache = make_prompt_cache(model)
        model(mx.array(prompt[:-40])[None], cache=cache)  # a cached prefix
        return model(mx.array(prompt[-40:])[None], cache=cache)[0]  # a warm chunk after it

    monkeypatch.setattr(mx.fast, "scaled_dot_product_attention", MLX)
    monkeypatch.setattr(llama, "swiglu", MLX_SWIGLU)
    expected = logits()
    cpu.use_numpy_exp()
    assert mx.fast.scaled_dot_product_attention is cpu.attention and llama.swiglu is cpu.swiglu
    got = logits()
    assert (got.argmax(axis=-1) == expected.argmax(axis=-1)).all().item()
    assert mx.abs(got - expected).max().item() < 1e-2
