"""A faster path for running mlx-lm models on MLX's CPU backend.

On the CPU, MLX's quantized matmul is slower than a plain float32 matmul, and the
`mlx-cpu` wheel bundles the reference BLAS. Dequantizing on load and preloading an
optimised BLAS (OpenBLAS) into the process address both.

MLX's CPU `exp` is the other cost: it is scalar, about 25 times slower than NumPy's.
Over a prompt, the softmax of attention takes most of a layer's time once the context
is a few thousand tokens, and SwiGLU's sigmoid a quarter of the MLP's. `use_numpy_exp`
computes both with NumPy (the softmax in place, in the scores' own buffer).
"""

from __future__ import annotations

import functools
import os
import sys
from concurrent.futures import ThreadPoolExecutor

import mlx.core as mx
import numpy as np
from mlx import nn
from mlx.utils import tree_map_with_path
from mlx_lm.models import activations

# Scores computed at once, in elements (64 MiB of float32): longer prompts go in row blocks.
_BLOCK = 1 << 24
# Below this many gate values (a token or two) MLX's own SwiGLU is quicker.
_SWIGLU_MIN = 1 << 14
_mlx_attention = mx.fast.scaled_dot_product_attention
_mlx_swiglu = activations.swiglu


def use_numpy_exp() -> None:
    """Route attention and SwiGLU through `attention` and `swiglu` in this process.

    For MLX's CPU backend only (on Metal the fused kernels are the fast ones). mlx-lm's
    models call attention through `mx.fast`, so every architecture gets it; SwiGLU is
    replaced in the model modules imported so far (call this after loading).
    """
    mx.fast.scaled_dot_product_attention = attention
    for name, module in list(sys.modules.items()):
        if name.startswith("mlx_lm.models.") and getattr(module, "swiglu", None) is _mlx_swiglu:
            module.swiglu = swiglu


def swiglu(gate: mx.array, x: mx.array) -> mx.array:
    """mlx-lm's `swiglu` (silu(gate) * x) with the sigmoid in NumPy, for prompts."""
    if gate.dtype != mx.float32 or gate.size < _SWIGLU_MIN:
        return _mlx_swiglu(gate, x)
    mx.eval(gate)
    g = np.asarray(gate)
    with np.errstate(over="ignore"):  # exp(-g) = inf for g < -88: g / inf is the right 0
        return mx.array(g / (1.0 + np.exp(-g))) * x


def attention(queries, keys, values, *, scale, mask=None, **kwargs) -> mx.array:
    """`mx.fast.scaled_dot_product_attention` with the softmax in NumPy, for prefill.

    Handles float32 prompts of more than one token with no mask or the causal one
    (what mlx-lm passes for prefill); anything else goes to MLX's own.
    """
    batch, heads, length, depth = queries.shape
    kv_heads, width = keys.shape[1], keys.shape[2]
    if (
        length == 1
        or kwargs.get("sinks") is not None
        or not (mask is None or (isinstance(mask, str) and mask == "causal"))
        or queries.dtype != mx.float32
        or keys.dtype != mx.float32
        or heads % kv_heads
    ):
        return _mlx_attention(queries, keys, values, scale=scale, mask=mask, **kwargs)
    group = heads // kv_heads
    # Query heads grouped by the key/value head they share: (batch, kv_heads, group *
    # rows, depth) against (batch, kv_heads, width, depth), one matmul per key head.
    q = (queries * scale).reshape(batch, kv_heads, group, length, depth)
    k = keys.swapaxes(-1, -2)
    rows = max(1, _BLOCK // (batch * heads * width))
    out = []
    for start in range(0, length, rows):
        stop = min(length, start + rows)
        scores = q[..., start:stop, :].reshape(batch, kv_heads, group * (stop - start), depth) @ k
        try:
            mx.eval(scores)
        except ValueError:
            if start:
                raise
            # Inside a function MLX traces (mx.compile: mlx-vlm's Qwen vision tower
            # compiles its attention), nothing can be evaluated: MLX's own, then.
            return _mlx_attention(queries, keys, values, scale=scale, mask=mask, **kwargs)
        _softmax(np.asarray(scores).reshape(-1, stop - start, width), start, length if mask == "causal" else None)
        # The buffer now holds the probabilities.
        out.append((scores @ values).reshape(batch, kv_heads, group, stop - start, depth))
    attended = out[0] if len(out) == 1 else mx.concatenate(out, axis=3)
    return attended.reshape(batch, heads, length, depth)


def _softmax(scores: np.ndarray, start: int, causal_length: int | None) -> None:
    # In place, over the last axis of (heads, rows, width), the heads split between
    # threads (NumPy lets go of the GIL in its loops).
    # Row r is the prompt's token start + r; with the causal mask it sees every key up
    # to its own position, which is width - causal_length + start + r (the keys end
    # with the prompt).
    hidden = None
    if causal_length is not None:
        rows, width = scores.shape[-2], scores.shape[-1]
        first = width - causal_length + start
        hidden = (first, np.triu(np.ones((rows, width - first), dtype=bool), 1))
    parts = min(_threads(), len(scores))
    if parts == 1:
        _softmax_rows(scores, hidden)
        return
    bounds = [len(scores) * i // parts for i in range(parts + 1)]
    pieces = [scores[a:b] for a, b in zip(bounds, bounds[1:])]
    list(_pool().map(lambda piece: _softmax_rows(piece, hidden), pieces))


def _softmax_rows(scores: np.ndarray, hidden: tuple[int, np.ndarray] | None) -> None:
    if hidden is not None:
        first, mask = hidden
        scores[..., first:][..., mask] = -np.inf
    np.subtract(scores, scores.max(axis=-1, keepdims=True), out=scores)
    np.exp(scores, out=scores)
    scores /= scores.sum(axis=-1, keepdims=True)


@functools.cache
def _threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1)


@functools.cache
def _pool() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(_threads(), thread_name_prefix="anyclaude-softmax")


def dequantize(model: nn.Module, dtype: mx.Dtype = mx.float32) -> None:
    """Replace every QuantizedLinear/QuantizedEmbedding of `model` by a float one, in place.

    Only worth it with an optimised BLAS (see `blas`): with MLX's bundled reference
    BLAS, float32 matmuls decode slower than the quantized kernels.
    The new layers hold the dequantized weights in `dtype` (float32 by default: on
    the CPU float16 arithmetic is slower, not faster). Other modules are untouched.
    """

    def convert(_path: str, module: nn.Module) -> nn.Module:
        if isinstance(module, nn.QuantizedLinear):
            return _linear(module, dtype)
        if isinstance(module, nn.QuantizedEmbedding):
            return _embedding(module, dtype)
        return module

    leaves = tree_map_with_path(convert, model.leaf_modules(), is_leaf=nn.Module.is_module)
    model.update_modules(leaves)
    # Materialise now so the packed arrays are freed and the first request pays nothing.
    mx.eval(model.parameters())


def _weight(module: nn.Module, dtype: mx.Dtype) -> mx.array:
    weight = mx.dequantize(
        module.weight,
        module.scales,
        module.get("biases"),
        group_size=module.group_size,
        bits=module.bits,
        mode=module.mode,
    )
    return weight.astype(dtype)


def _linear(module: nn.QuantizedLinear, dtype: mx.Dtype) -> nn.Linear:
    weight = _weight(module, dtype)
    has_bias = "bias" in module
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=has_bias)
    linear.weight = weight
    if has_bias:
        linear.bias = module.bias.astype(dtype)
    return linear


def _embedding(module: nn.QuantizedEmbedding, dtype: mx.Dtype) -> nn.Embedding:
    weight = _weight(module, dtype)
    embedding = nn.Embedding(weight.shape[0], weight.shape[1])
    embedding.weight = weight
    return embedding
