"""A tiny random-weight Gemma 3 vision model, from mlx-vlm's own classes, written to a folder
as a Hugging Face checkpoint is: config, weights, a real processor (transformers' Gemma 3
image processor at 56x56 pixels, 16 image tokens) and the tiny model's tokenizer with
Gemma's turn and image tokens added, under Gemma 3's real chat template.

Two text layers of width 64 and a one-layer vision tower of width 32: an image costs a
few milliseconds on the CPU.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TEMPLATES = Path(__file__).resolve().parent / "templates"

IMAGE_TOKENS = 16  # per image: 56/14 = 4 patches a side, pooled 1:1
SPECIAL = ["<start_of_turn>", "<end_of_turn>", "<start_of_image>", "<end_of_image>", "<image_soft_token>"]


def build(out: Path, tokenizer_dir: Path, seed: int = 0, *, sliding_window: int = 512) -> Path:
    """Write the model into `out` (a new folder); `tokenizer_dir` holds the tiny model's tokenizer."""
    import mlx.core as mx
    from mlx_vlm.models import gemma3
    from mlx_vlm.utils import save_weights, update_module_configs
    from tokenizers import AddedToken, Tokenizer

    out.mkdir(parents=True)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in SPECIAL}
    vocab = tokenizer.get_vocab_size()
    base = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    template = (TEMPLATES / "google-gemma-3-it.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False,
        "model_max_length": 8192,
        "bos_token": base["bos_token"], "eos_token": "<end_of_turn>", "unk_token": base["unk_token"], "pad_token": base["pad_token"],
        # What Gemma 3's processor reads from its tokenizer: the image tokens by role.
        "extra_special_tokens": {"boi_token": "<start_of_image>", "eoi_token": "<end_of_image>", "image_token": "<image_soft_token>"},
        "chat_template": template,
    }))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Gemma3ImageProcessor", "processor_class": "Gemma3Processor",
        "size": {"height": 56, "width": 56}, "resample": 2, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_convert_rgb": True,
        "do_pan_and_scan": False,
    }))
    (out / "processor_config.json").write_text(json.dumps({"processor_class": "Gemma3Processor", "image_seq_length": IMAGE_TOKENS}))
    config = {
        "model_type": "gemma3",
        "architectures": ["Gemma3ForConditionalGeneration"],
        "image_token_index": ids["<image_soft_token>"],
        "boi_token_index": ids["<start_of_image>"],
        "eoi_token_index": ids["<end_of_image>"],
        "eos_token_id": [ids["<end_of_turn>"]],
        "mm_tokens_per_image": IMAGE_TOKENS,
        "hidden_size": 64,
        "vocab_size": vocab,  # mlx-lm's gemma3 (the text-only reading) takes it from here
        "text_config": {
            "model_type": "gemma3_text", "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "query_pre_attn_scalar": 32,
            "vocab_size": vocab, "sliding_window": sliding_window, "sliding_window_pattern": 2,
            "mm_tokens_per_image": IMAGE_TOKENS, "max_position_embeddings": 8192,
        },
        "vision_config": {
            "model_type": "siglip_vision_model", "num_hidden_layers": 1, "hidden_size": 32, "intermediate_size": 64,
            "num_attention_heads": 2, "patch_size": 14, "image_size": 56,
        },
    }
    (out / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    model_config = update_module_configs(gemma3.ModelConfig.from_dict(config), gemma3, config, ["text", "vision"])
    model = gemma3.Model(model_config)
    # Random projections: the default ones-matrix would give every image the same tokens.
    projector = model.multi_modal_projector
    projector.mm_input_projection_weight = mx.random.normal(projector.mm_input_projection_weight.shape) * 0.5
    mx.eval(model.parameters())
    save_weights(out, model)
    return out


def tokenizer_files(model_dir: Path, out: Path) -> Path:
    """The tokenizer files of a model folder, copied into `out`."""
    out.mkdir(parents=True, exist_ok=True)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(model_dir / name, out / name)
    return out


# --- Qwen: Qwen3.5 (hybrid linear attention), Qwen2-VL, Qwen2.5-VL, Qwen3-VL ------------

QWEN_SPECIAL = ["<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>"]
# A 40x30 image becomes 64x96 pixels (the processor's sides are multiples of 32, its area at
# least MIN_PIXELS), 4x6 patches of 16 pixels, merged 2x2: 2x3 = 6 image tokens, in a grid
# whose height and width differ (so a wrong position in either shows).
QWEN_MIN_PIXELS = 64 * 96


def _qwen_text(kind: str, vocab: int) -> dict:
    common = {"hidden_size": 64, "intermediate_size": 128, "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32,
              "rms_norm_eps": 1e-6, "vocab_size": vocab, "max_position_embeddings": 8192, "tie_word_embeddings": False}
    if kind in ("qwen3_5", "qwen3_5_moe"):
        text = common | {
            "model_type": kind if kind == "qwen3_5" else "qwen3_5_moe_text",
            # Layer 0 linear attention (a gated delta net), layer 1 full attention.
            "num_hidden_layers": 2, "full_attention_interval": 2,
            "linear_num_value_heads": 2, "linear_num_key_heads": 1, "linear_key_head_dim": 16, "linear_value_head_dim": 16,
            "linear_conv_kernel_dim": 4,
            "rope_parameters": {"type": "default", "mrope_section": [4, 2, 2], "mrope_interleaved": True, "rope_theta": 10000.0, "partial_rotary_factor": 0.5},
        }
        if kind == "qwen3_5_moe":
            text |= {"num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 32, "shared_expert_intermediate_size": 32, "decoder_sparse_step": 1, "norm_topk_prob": True}
        return text
    return common | {"model_type": kind if kind != "qwen3_vl" else "qwen3_vl_text", "num_hidden_layers": 2, "rope_theta": 10000.0,
                     "rope_scaling": {"type": "mrope", "mrope_section": [8, 4, 4]}}


def _qwen_vision(kind: str) -> dict:
    if kind == "qwen2_vl":
        return {"model_type": "qwen2_vl", "depth": 1, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                "patch_size": 16, "spatial_patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "in_channels": 3}
    if kind == "qwen2_5_vl":
        return {"model_type": "qwen2_5_vl", "depth": 1, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64, "num_heads": 2,
                "patch_size": 16, "spatial_patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2, "window_size": 64,
                "fullatt_block_indexes": [0], "in_chans": 3}
    return {"model_type": kind if kind != "qwen3_5_moe" else "qwen3_5_moe", "depth": 1, "hidden_size": 32, "intermediate_size": 64,
            "out_hidden_size": 64, "num_heads": 2, "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2,
            "num_position_embeddings": 64, "deepstack_visual_indexes": [0] if kind == "qwen3_vl" else [], "in_channels": 3}


def build_qwen(out: Path, tokenizer_dir: Path, kind: str = "qwen3_5", seed: int = 0) -> Path:
    """A tiny `kind` model (mlx-vlm's classes) under Qwen3.5's real chat template, written into `out`."""
    import importlib

    import mlx.core as mx
    from mlx_vlm.utils import save_weights, update_module_configs
    from tokenizers import AddedToken, Tokenizer

    module = importlib.import_module(f"mlx_vlm.models.{kind}")
    out.mkdir(parents=True)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL])
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in QWEN_SPECIAL}
    vocab = tokenizer.get_vocab_size()
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        "bos_token": None, "eos_token": "<|im_end|>", "pad_token": "<|im_end|>", "unk_token": None,
        "chat_template": (TEMPLATES / "Qwen3.5-4B.jinja").read_text(),
    }))
    (out / "preprocessor_config.json").write_text(json.dumps({
        "image_processor_type": "Qwen2VLImageProcessor", "processor_class": {"qwen2_vl": "Qwen2VLProcessor", "qwen2_5_vl": "Qwen2_5_VLProcessor"}.get(kind, "Qwen3VLProcessor"),
        "patch_size": 16, "temporal_patch_size": 2, "merge_size": 2, "min_pixels": QWEN_MIN_PIXELS, "max_pixels": 4 * QWEN_MIN_PIXELS,
        "size": {"shortest_edge": QWEN_MIN_PIXELS, "longest_edge": 4 * QWEN_MIN_PIXELS},
        "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": True, "do_convert_rgb": True,
    }))
    config = {
        "model_type": kind,
        "image_token_id": ids["<|image_pad|>"], "video_token_id": ids["<|video_pad|>"],
        "vision_start_token_id": ids["<|vision_start|>"], "vision_end_token_id": ids["<|vision_end|>"],
        "eos_token_id": [ids["<|im_end|>"]], "vocab_size": vocab, "tie_word_embeddings": False,
        "text_config": _qwen_text(kind, vocab) | {"eos_token_id": [ids["<|im_end|>"]]},
        "vision_config": _qwen_vision(kind),
    }
    if kind in ("qwen2_vl", "qwen2_5_vl"):
        config |= {k: v for k, v in config["text_config"].items() if k not in ("model_type", "eos_token_id")}
    (out / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    model_config = update_module_configs(module.ModelConfig.from_dict(config), module, config, ["text", "vision"])
    model = module.Model(model_config)
    mx.eval(model.parameters())
    save_weights(out, model)
    return out


# --- Gemma 4: image tokens that attend to each other both ways --------------------------

GEMMA4_SPECIAL = [
    "<|turn>", "<turn|>", "<|image>", "<image|>", "<|image|>", "<|audio>", "<audio|>", "<|audio|>", "<|video|>",
    "<|channel>", "<channel|>", "<|tool>", "<tool|>", "<|tool_call>", "<tool_call|>", "<|tool_response>", "<tool_response|>",
    '<|"|>', "<|think|>",
]
# The processor resizes an image (aspect kept) to sides that are multiples of 16 pixels, at
# most GEMMA4_TOKENS x 4 patches of 8 pixels, pooled 2x2 into image tokens: a 40x30 image
# becomes 64x48 pixels, 12 image tokens.
GEMMA4_TOKENS = 16


def build_gemma4(out: Path, tokenizer_dir: Path, seed: int = 0, *, sliding_window: int = 512) -> Path:
    """A tiny Gemma 4 (mlx-vlm's classes) under Gemma 4's real chat template, written into
    `out`: four text layers of width 64 (sliding, full, sliding, full: the last two use the
    first two's keys and values, as Gemma 4's small models share them), per-layer inputs,
    image tokens that attend to each other both ways, and a one-layer vision tower of
    width 32."""
    import mlx.core as mx
    from mlx_vlm.models import gemma4
    from mlx_vlm.utils import save_weights, update_module_configs
    from tokenizers import AddedToken, Tokenizer

    out.mkdir(parents=True)
    tokenizer = Tokenizer.from_file(str(tokenizer_dir / "tokenizer.json"))
    tokenizer.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in GEMMA4_SPECIAL])
    tokenizer.save(str(out / "tokenizer.json"))
    ids = {t: tokenizer.token_to_id(t) for t in GEMMA4_SPECIAL}
    vocab = tokenizer.get_vocab_size()
    base = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "add_bos_token": False, "add_eos_token": False, "clean_up_tokenization_spaces": False, "model_max_length": 8192,
        "bos_token": base["bos_token"], "eos_token": "<turn|>", "unk_token": base["unk_token"], "pad_token": base["pad_token"],
        # What Gemma 4's processor reads from its tokenizer: the image and audio tokens by role.
        "extra_special_tokens": {"image_token": "<|image|>", "boi_token": "<|image>", "eoi_token": "<image|>",
                                 "audio_token": "<|audio|>", "boa_token": "<|audio>", "eoa_token": "<audio|>"},
        "chat_template": (TEMPLATES / "google-gemma-4-31B-it-interleaved.jinja").read_text(),
    }))
    (out / "processor_config.json").write_text(json.dumps({
        "processor_class": "Gemma4Processor",
        "image_processor": {"image_processor_type": "Gemma4ImageProcessor", "patch_size": 8, "max_soft_tokens": GEMMA4_TOKENS,
                            "pooling_kernel_size": 2, "do_resize": True, "do_rescale": True, "rescale_factor": 1 / 255, "do_normalize": False},
    }))
    config = {
        "model_type": "gemma4",
        "architectures": ["Gemma4ForConditionalGeneration"],
        "image_token_id": ids["<|image|>"], "boi_token_id": ids["<|image>"], "eoi_token_id": ids["<image|>"],
        "audio_token_id": ids["<|audio|>"], "boa_token_id": ids["<|audio>"], "eoa_token_id": ids["<audio|>"],
        "eos_token_id": [ids["<turn|>"]], "vocab_size": vocab, "hidden_size": 64,
        "vision_soft_tokens_per_image": GEMMA4_TOKENS,
        "text_config": {
            "model_type": "gemma4_text", "hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128,
            "num_attention_heads": 2, "num_key_value_heads": 1, "head_dim": 32, "global_head_dim": 32,
            "vocab_size": vocab, "vocab_size_per_layer_input": vocab, "hidden_size_per_layer_input": 8,
            "num_kv_shared_layers": 2, "layer_types": ["sliding_attention", "full_attention"] * 2,
            "sliding_window": sliding_window, "max_position_embeddings": 8192,
            "use_bidirectional_attention": "vision", "use_double_wide_mlp": False, "eos_token_id": [ids["<turn|>"]],
        },
        "vision_config": {
            "model_type": "gemma4_vision", "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 1,
            "num_attention_heads": 2, "num_key_value_heads": 2, "head_dim": 16, "global_head_dim": 16,
            "patch_size": 8, "position_embedding_size": 64, "pooling_kernel_size": 2, "default_output_length": GEMMA4_TOKENS,
        },
    }
    (out / "config.json").write_text(json.dumps(config))
    mx.random.seed(seed)
    model_config = update_module_configs(gemma4.ModelConfig.from_dict(config), gemma4, config, ["text", "vision"])
    model = gemma4.Model(model_config)
    # Random position embeddings: the default ones would give every patch the same large
    # offset, and every image nearly the same tokens.
    patches = model.vision_tower.patch_embedder
    patches.position_embedding_table = mx.random.normal(patches.position_embedding_table.shape) * 0.1
    mx.eval(model.parameters())
    save_weights(out, model)
    return out


@contextmanager
def serving(where: Path, model_cache, models: dict[str, dict], **sections) -> Iterator:
    """The real daemon on a profile of these models (greedy, `claude-*` the first), stopped after."""
    import tomli_w

    from bench.harness import Daemon

    profile = {"models": models, "aliases": {"claude-*": next(iter(models))}, "sampling": {"temperature": 0.0}, **sections}
    path = where / "vision.toml"
    path.write_text(tomli_w.dumps(profile))
    daemon = Daemon(str(path), model_cache, where / "daemon.log")
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.output()


def logged(daemon, reply) -> dict:
    """A reply's line in the daemon's request log."""
    (found,) = [r for r in daemon.records() if r["request_id"] == reply._request_id]
    return found


def said(reply) -> str:
    return "".join(b.text for b in reply.content if b.type == "text")


def processed_once(v, render, image) -> None:
    """A conversation's images are processed once: the next turn sends them again and only
    its new image is processed, and the prompt is what processing them all anew gives.
    `render(messages)` renders with `v`; `image(seed, shape)` is an image block."""
    import numpy as np

    first = [{"role": "user", "content": [{"type": "text", "text": "Look:"}, image(11, (40, 30)), {"type": "text", "text": "?"}]}]
    later = [*first, {"role": "assistant", "content": "A picture."}, {"role": "user", "content": [image(12, (64, 30)), {"type": "text", "text": "And this?"}]}]
    render(first)
    before = v.remembered.processed
    again = render(later)
    assert v.remembered.processed - before == 1
    kept, v.processor.image_processor = v.processor.image_processor, v.remembered.inner
    try:
        anew = render(later)
    finally:
        v.processor.image_processor = kept
    assert again.ids == anew.ids and again.cache_key == anew.cache_key
    a, b = again.seen_images, anew.seen_images
    assert len(a.spans) == 2 and a.spans == b.spans and a.grids == b.grids
    assert [p.shape for p in a.pixels] == [p.shape for p in b.pixels]
    assert all(np.array_equal(x, y) for x, y in zip(a.pixels, b.pixels))
