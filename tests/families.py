"""Tiny random-weight models of the architectures people run, from mlx-lm's own classes.

A few layers of width 64 (heads of 32, as KV quantization needs) and the tiny model's tokenizer: they run in a second on the
CPU and exercise the real cache types (KVCache, RotatingKVCache, ArraysCache, MambaCache,
CacheList, QuantizedKVCache).
"""

from __future__ import annotations

import importlib

VOCAB = 49152  # the tiny model's tokenizer
COMMON = {"vocab_size": VOCAB, "hidden_size": 64, "num_attention_heads": 2, "num_key_value_heads": 1, "max_position_embeddings": 8192}

ARCHITECTURES: dict[str, dict] = {
    "llama": {"num_hidden_layers": 2, "intermediate_size": 128, "rms_norm_eps": 1e-5, "rope_theta": 10000.0, "tie_word_embeddings": True},
    "qwen3_next": {
        "num_hidden_layers": 4, "intermediate_size": 128, "linear_num_value_heads": 4, "linear_num_key_heads": 2,
        "linear_key_head_dim": 16, "linear_value_head_dim": 16, "linear_conv_kernel_dim": 4, "num_experts": 4,
        "num_experts_per_tok": 2, "decoder_sparse_step": 1, "shared_expert_intermediate_size": 64, "mlp_only_layers": [],
        "moe_intermediate_size": 64, "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "partial_rotary_factor": 0.25,
        "head_dim": 32, "full_attention_interval": 2,
    },
    # A sliding window shorter than the test prompts: the cache wraps and cannot be trimmed.
    "gemma3_text": {"num_hidden_layers": 3, "intermediate_size": 128, "head_dim": 32, "query_pre_attn_scalar": 32, "sliding_window": 32, "sliding_window_pattern": 3},
    "lfm2": {
        "num_hidden_layers": 3, "norm_eps": 1e-5, "conv_bias": False, "conv_L_cache": 3, "block_dim": 64, "block_multiple_of": 16,
        "block_ffn_dim_multiplier": 1.0, "block_auto_adjust_ff_dim": False, "block_ff_dim": 128, "full_attn_idxs": [1],
    },
    "nemotron_h": {
        "intermediate_size": 128, "attention_bias": False, "mamba_num_heads": 4, "mamba_head_dim": 16, "mamba_proj_bias": False,
        "ssm_state_size": 16, "conv_kernel": 4, "n_groups": 1, "mlp_bias": False, "layer_norm_epsilon": 1e-5, "use_bias": False,
        "use_conv_bias": True, "hybrid_override_pattern": ["M", "*", "-"], "head_dim": 32,
    },
    "gpt_oss": {"num_hidden_layers": 2, "num_local_experts": 4, "num_experts_per_tok": 2, "intermediate_size": 64, "head_dim": 32, "sliding_window": 32, "layer_types": ["sliding_attention", "full_attention"]},
}


def build(architecture: str, seed: int = 0, **overrides):
    """A random-weight model of `architecture` (a module of mlx_lm.models), evaluated."""
    import mlx.core as mx

    module = importlib.import_module(f"mlx_lm.models.{architecture}")
    args = module.ModelArgs.from_dict({"model_type": architecture, **COMMON, **ARCHITECTURES[architecture], **overrides})
    mx.random.seed(seed)
    model = module.Model(args)
    mx.eval(model.parameters())
    return model
