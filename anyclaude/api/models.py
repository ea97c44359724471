"""/v1/models and /health: what the daemon serves, and how each model is doing."""

from __future__ import annotations

import os
from typing import TYPE_CHECKING

import msgspec

from .. import profiles, upstream
from . import wire
from .errors import NotFound

if TYPE_CHECKING:
    from ..server import Server

_CREATED = "2026-01-01T00:00:00Z"


def model_list(server: Server) -> wire.ModelList:
    data = [_info(server, name) for name in server.profile.listed_names()]
    return wire.ModelList(data=data, has_more=False, first_id=data[0].id if data else None, last_id=data[-1].id if data else None)


def model_info(server: Server, name: str) -> wire.ModelInfo:
    if server.profile.resolve(name) is None:
        raise NotFound(f"model: {name} not found")
    return _info(server, name)


def _info(server: Server, name: str) -> wire.ModelInfo:
    key = server.profile.resolve(name)
    model = server.profile.models[key]
    loaded = getattr(server.engines.get(key), "loaded", None)  # read once, as in /health
    context = loaded.context_length if loaded else model.context_length
    return wire.ModelInfo(
        id=name,
        display_name=model.display_name or f"{name} ({key})",
        created_at=_CREATED,
        max_input_tokens=context,
        max_tokens=model.max_tokens,
    )


def health(server: Server) -> tuple[int, dict]:
    """/health's status (200 once every model is loaded, else 503) and body."""
    models = {key: _model_health(e, server.schedulers[key], server.profile.models[key]) for key, e in server.engines.items()}
    p = server.profile
    body = {
        "status": "ready" if server.ready else "loading",
        "profile": server.loaded.name,
        "profile_path": str(server.loaded.path),
        "revision": server.revision,
        "reload_error": server.reload_error,
        "reloading": server.reloading,
        # Requests being decoded and rendered (in threads of their own).
        "preparing": server.preparing,
        "models": models,
        "sampling": msgspec.to_builtins(p.sampling),
        "timeouts": msgspec.to_builtins(p.timeouts),
        "log": str(server.log.path),
        # The last failure to write the request log (a full disk, a read-only folder), or None.
        "log_error": server.log.error,
        # The `anyclaude serve` process (Granian's, which runs this worker), for `anyclaude stop`.
        "pid": int(os.environ["ANYCLAUDE_PID"]) if os.environ.get("ANYCLAUDE_PID") else None,
        # This process: Granian's worker under `anyclaude serve`, for a stop after the serve process died.
        "worker_pid": os.getpid(),
    }
    return (200 if server.ready else 503), body


def _model_health(engine, scheduler, model: profiles.Model) -> dict:
    if isinstance(engine, upstream.Upstream):
        return engine.health(scheduler)
    # Read once: an engine being replaced lets go of its model on its own thread.
    loaded, cache = engine.loaded, engine.cache
    return {
        "state": "failed" if engine.load_error else "ready" if loaded else "loading",
        "running": scheduler.running,
        "waiting": scheduler.waiting,
        "context_length": loaded.context_length if loaded else None,
        "device": loaded.device if loaded else None,
        "cache_types": loaded.cache_types if loaded else None,
        # Whether it sees images (the mlx-vlm model type it was loaded as), or reads them as a note.
        "vision": (loaded.vision.kind if loaded.vision else None) if loaded else None,
        "cache_bytes": cache.bytes if cache else 0,
        "cache_peak_bytes": cache.peak_bytes if cache else 0,
        "cache_budget_bytes": cache.max_bytes if cache else 0,
        "cache_entries": cache.entries if cache else 0,
        "prefill_step": getattr(engine, "prefill_step", None),
        "max_batch": engine.max_batch,
        # KV copied to merge requests into a batch and out of it again, since the start.
        "batch_copied_bytes": getattr(engine, "batch_copied", 0),
        # Metal's wired limit while the model is loaded, in bytes (None: not on Metal).
        "wired_limit_bytes": getattr(engine, "wired_limit", None),
        "error": engine.load_error,
        "warning": getattr(engine, "warning", None),
        "path": model.path,
    }
