"""A faster path for running mlx-lm models on MLX's CPU backend.

On the CPU, MLX's quantized matmul is slower than a plain float32 matmul, and the
`mlx-cpu` wheel bundles the reference BLAS. Dequantizing on load and preloading an
optimised BLAS (OpenBLAS) into the process address both.
"""

from __future__ import annotations


import mlx.core as mx
from mlx import nn
from mlx.utils import tree_map_with_path

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
