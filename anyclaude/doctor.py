"""`anyclaude status` (what the running daemon says about itself) and `anyclaude doctor`
(whether this machine can run a profile), one line per fact with a verdict."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from . import launcher, logs, profiles
from .engine.metal import metal_info
from .models import ModelError, disk_size, gguf_directory, memory_budget, model_files

OK, WARN, FAIL, SKIP = "ok", "warn", "FAIL", "skip"
MISSING = "-"  # a field this daemon's /health does not report
Check = tuple[str, str, str]  # verdict, subject, detail


def add_commands(subparsers) -> None:
    """Add `status` and `doctor` to the `anyclaude` command's subparsers."""
    status = subparsers.add_parser(
        "status", help="the running daemon: profile, models, queue, cache, reload errors (exit code 0 when ready)"
    )
    doctor = subparsers.add_parser(
        "doctor", help="check this machine for a profile: device, memory, model, KV cache, port, claude, logs (exit code 1 on a FAIL)"
    )
    for sub in (status, doctor):
        sub.add_argument("--profile", default="tiny", help="a profile name or TOML file (default: tiny)")
        sub.add_argument("--port", type=int, help="the daemon's port (default: the profile's server.port)")
        sub.add_argument("--host", help="the daemon's address (default: the profile's server.host)")
    status.add_argument("--json", action="store_true", help="print GET /health as it came")
    status.set_defaults(run=_run_status)
    doctor.set_defaults(run=_run_doctor)


def _line(verdict: str, subject: str, detail: str) -> str:
    return f"{verdict:<5} {subject:<8} {detail}"


def human_bytes(n: float) -> str:
    units = ("bytes", "KB", "MB", "GB")
    i = 0
    while n >= 1024 and i < len(units) - 1:
        n, i = n / 1024, i + 1
    return f"{n:.0f} bytes" if i == 0 else f"{n:.1f} {units[i]}"


# --- status ------------------------------------------------------------------------


def status_lines(url: str, health: dict | None, status: int | None = None) -> list[str]:
    """The daemon's state as lines `subject  detail`; MISSING for what /health does not report."""
    if health is None and status is None:
        return [f"daemon    down: nothing answers at {url}"]
    if health is None:
        return [f"daemon    {url} answers HTTP {status}, not as anyclaude"]
    lines = [
        f"daemon    up at {url}, {health.get('status', MISSING)}",
        f"profile   {health.get('profile', MISSING)} ({health.get('profile_path', MISSING)})",
    ]
    models = health.get("models") or {}
    for key, m in models.items():
        state = m.get("state", MISSING)
        loaded = {"ready": "loaded", "loading": "not loaded yet", "failed": "not loaded"}.get(state, MISSING)
        context = f", {m['context_length']} tokens of context" if m.get("context_length") else ""
        device = f", {m['device']}" if m.get("device") else ""
        lines.append(f"model     {key}: {state} ({loaded}{context}{device})")
    for key, m in models.items():
        if m.get("upstream"):
            reach = {True: "reachable", False: f"not reachable ({m.get('error')})", None: "not asked yet"}.get(m.get("reachable"), MISSING)
            lines.append(f"upstream  {key}: {m.get('api', MISSING)} API at {m['upstream']}, {reach}")
    for key, m in models.items():
        lines.append(f"queue     {key}: {_count(m.get('running'))} running, {_count(m.get('waiting'))} waiting")
    for key, m in models.items():
        if m.get("upstream"):  # its cache is its server's
            continue
        cache = m.get("cache_bytes")
        lines.append(f"cache     {key}: {human_bytes(cache) if isinstance(cache, int) else MISSING}")
    reload_error = (health["reload_error"] or "none") if "reload_error" in health else MISSING
    lines.append(f"reload    last error: {reload_error}")
    lines.append(f"log       {health.get('log', MISSING)}")
    if health.get("log_error"):
        lines.append(f"log       last error: {health['log_error']}")
    return lines


def _count(value) -> str:
    # `running` is a bool while an engine runs one request at a time.
    return MISSING if value is None else str(int(value))


def _target(args: argparse.Namespace) -> tuple[profiles.Loaded | None, str, str | None]:
    """The profile (None if it does not load), the daemon's URL, and the profile's error."""
    try:
        loaded = profiles.load(args.profile)
    except profiles.ProfileError as exc:
        return None, launcher.base_url(profiles.Server(), args.host, args.port), str(exc)
    return loaded, launcher.base_url(loaded.profile.server, args.host, args.port), None


def _run_status(args: argparse.Namespace) -> int:
    loaded, url, error = _target(args)
    if error:  # the daemon may still run an earlier, valid version of it
        print(f"anyclaude: {error}", file=sys.stderr)
    token = launcher.auth_token(loaded.profile) if loaded else None
    reply = launcher.fetch_json(url, "/health", token)
    status, health = reply if reply else (None, None)
    if health is not None and "profile" not in health:
        health = None
    if args.json:
        print(json.dumps(health))
    else:
        print("\n".join(status_lines(url, health, status)))
    return 0 if health and health.get("status") == "ready" else 1


# --- doctor ------------------------------------------------------------------------


def check_device() -> Check:
    try:
        import mlx.core  # noqa: F401
    except ImportError as exc:
        return FAIL, "device", f"MLX does not import: {exc}"
    metal = metal_info()
    if metal is not None:
        return OK, "device", f"Metal ({metal.get('device_name', 'GPU')})"
    from .engine.cpu import blas

    found = blas.openblas_path()
    if found:
        return WARN, "device", f"CPU only (no Metal): slow; the daemon uses OpenBLAS ({found}), several times faster than without"
    faster = " (apt-get install libopenblas0-pthread makes it several times faster)" if sys.platform == "linux" else ""
    return WARN, "device", f"CPU only (no Metal): slow{faster}"


def check_models(loaded: profiles.Loaded) -> tuple[list[Check], int | None]:
    """One line per model, and the bytes of those on disk (None if any is not there yet)."""
    checks, total = [], 0
    for key, model in loaded.profile.models.items():
        if model.upstream is not None:
            checks.append(check_upstream(key, model))
            continue
        try:
            path, from_hub = model_files(model.path, loaded.path.parent)
        except ModelError as exc:
            checks.append((FAIL, "model", f"{key}: {exc}"))
            total = None
            continue
        if path is None:
            detail = (
                f"{key}: {model.path} is not downloaded yet: the first `anyclaude serve` downloads it "
                "(the launchd agent runs offline, so start it by hand once)"
            )
            checks.append((WARN, "model", detail))
            total = None
            continue
        size = disk_size(path)
        total = None if total is None else total + size
        where = "in the Hugging Face cache" if from_hub else "on disk"
        note = ""
        if path.suffix == ".gguf":
            imported = (gguf_directory(path) / "config.json").exists()
            note = "; imported" if imported else "; imported into MLX's format on first start"
        checks.append((OK, "model", f"{key}: {where}, {human_bytes(size)} ({path}){note}"))
    return checks, total


def check_memory(model_bytes: int | None, loaded: profiles.Loaded) -> Check:
    budget, what = memory_budget()
    if model_bytes is None:
        return SKIP, "memory", f"{human_bytes(budget)} of {what}; the model's size is known once it is on disk"
    share = model_bytes / budget
    detail = f"the model takes {human_bytes(model_bytes)} of {human_bytes(budget)} {what} ({share:.0%}), plus its KV cache"
    if loaded.profile.engine.cpu_dequantize and metal_info() is None and _openblas():
        detail += "; on the CPU, quantized weights are dequantized on load (several times larger)"
    if share < 0.6:
        return OK, "memory", detail
    return (WARN if share < 0.85 else FAIL), "memory", detail + ": little room left"


def _openblas() -> bool:
    # The daemon dequantizes on the CPU only with OpenBLAS to run the float32 matmuls.
    from .engine.cpu import blas

    return blas.openblas_path() is not None


def check_port(loaded: profiles.Loaded, url: str, host: str, port: int) -> Check:
    where = f"{host}:{port}"
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as the server binds
        try:
            s.bind((host, port))
            return OK, "port", f"{where} is free"
        except OSError as exc:
            bind_error = exc
    reply = launcher.fetch_json(url, "/health", launcher.auth_token(loaded.profile), timeout=1.0)
    health = reply[1] if reply else None
    if not health or "profile" not in health:
        return FAIL, "port", f"{where} is taken by another program ({bind_error.strerror}); set [server] port or pass --port"
    if launcher.same_profile(health, loaded):
        return OK, "port", f"{where}: the daemon for this profile is already running there"
    return WARN, "port", f"{where}: a daemon for profile {health['profile']!r} runs there; stop it or use another port"


def check_claude() -> Check:
    program = shutil.which("claude")
    if program is None:
        return WARN, "claude", "not on PATH: install Claude Code to use `anyclaude claude`"
    try:
        result = subprocess.run([program, "--version"], check=False, capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return WARN, "claude", f"{program} does not answer `--version`: {exc}"
    version = (result.stdout or result.stderr).strip().splitlines()
    if result.returncode != 0 or not version:
        return WARN, "claude", f"{program} --version exited with {result.returncode}"
    return OK, "claude", f"{version[0]} ({program})"


def log_folder(loaded: profiles.Loaded) -> Path:
    return logs.location(loaded.profile.log.path).parent


def check_log_dir(folder: Path) -> Check:
    if folder.is_dir():
        probe = folder / f".anyclaude-doctor-{os.getpid()}"
        try:
            probe.write_bytes(b"")
            probe.unlink()
        except OSError as exc:
            return FAIL, "log dir", f"{folder} is not writable: {exc.strerror}"
        return OK, "log dir", f"{folder} is writable"
    # Not there yet: the daemon creates it, if its nearest existing ancestor lets it.
    ancestor = next(p for p in folder.parents if p.exists())
    if not ancestor.is_dir():
        return FAIL, "log dir", f"{folder} cannot be created: {ancestor} is not a directory"
    if not os.access(ancestor, os.W_OK | os.X_OK):
        return FAIL, "log dir", f"{folder} cannot be created: {ancestor} is not writable"
    return OK, "log dir", f"{folder} will be created on first start"


# --- KV cache sizing ---------------------------------------------------------------

CLAUDE_CODE_PREFIX = 12_000  # tokens of Claude Code's system+tools prefix (2.1.332: 12-20K by tools)
_DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}


def kv_per_token(config: dict, dtype: str) -> tuple[int, str]:
    """A model's KV bytes per token of context, from its config.json, and how they add up.
    Attention layers count; sliding-window and linear-attention layers, which do not
    grow with the context, do not."""
    c = config.get("text_config", config) | config
    layers = c.get("num_hidden_layers") or c.get("n_layer") or 0
    heads = c.get("num_attention_heads") or 1
    kv_heads = c.get("num_key_value_heads") or heads
    head_dim = c.get("head_dim") or (c.get("hidden_size") or 0) // heads
    if isinstance(c.get("layer_types"), list):
        full = sum(1 for t in c["layer_types"] if t == "full_attention")
    elif c.get("full_attention_interval"):
        full = layers // c["full_attention_interval"]
    else:
        full = layers
    how = f"{full} attention layers x {kv_heads} KV heads x {head_dim}, keys and values in {dtype}"
    return full * kv_heads * head_dim * 2 * _DTYPE_BYTES[dtype], how


def check_upstream(key: str, model: profiles.Model) -> Check:
    """A model on another server: whether it answers, and serves the model named."""
    from .upstream import make

    upstream = make(key, model)
    upstream.refresh().join()  # its /v1/models only (its tokenizer is not needed here)
    if not upstream.reachable:
        return FAIL, "upstream", f"{key}: {model.upstream} is not reachable ({upstream.last_error}); requests get 529" + (f" or go to {model.fallback}" if model.fallback else "")
    if model.api_key_env and not os.environ.get(model.api_key_env):
        return WARN, "upstream", f"{key}: {model.upstream} answers, but ${model.api_key_env} (api_key_env) is not set"
    served = upstream.served
    if model.upstream_model and served and model.upstream_model not in served:
        return WARN, "upstream", f"{key}: {model.upstream} serves {', '.join(served)}, not {model.upstream_model!r} (upstream_model)"
    context = upstream.loaded.context_length
    return OK, "upstream", f"{key}: {model.api} API at {model.upstream}" + (f", {context} tokens of context" if context else "")


def check_kv(loaded: profiles.Loaded) -> list[Check]:
    """Per model: its KV bytes per token, and what the KV budget holds (the context
    window, Claude Code's prefix as checkpoints)."""
    from .engine.cache import default_budget

    checks = []
    memory, what = memory_budget()
    models = loaded.profile.models
    for key, model in models.items():
        if model.upstream is not None:  # its server's memory, not this machine's
            continue
        try:
            path, _ = model_files(model.path, loaded.path.parent)
        except ModelError:
            path = None
        folder = gguf_directory(path) if path is not None and path.suffix == ".gguf" else path
        try:
            config = json.loads((folder / "config.json").read_text())
        except (OSError, ValueError, TypeError):
            checks.append((SKIP, "kv", f"{key}: KV size known once the model is on disk (and imported)"))
            continue
        dequantized = loaded.profile.engine.cpu_dequantize and metal_info() is None and _openblas()
        # Activations (and so keys and values) are float32 once dequantized on a CPU.
        dtype = "float32" if dequantized else str(config.get("torch_dtype", "")).removeprefix("torch.")
        dtype = dtype if dtype in _DTYPE_BYTES else "float16"
        rate, how = kv_per_token(config, dtype)
        if not rate:
            checks.append((SKIP, "kv", f"{key}: KV size unknown from its config.json"))
            continue
        checks.append((OK, "kv", f"{key}: {human_bytes(rate)} per token ({how})"))
        weights = _weight_bytes(path, config, dequantized)
        if loaded.profile.cache.max_gb is not None:
            budget, source = int(loaded.profile.cache.max_gb * 2**30), "[cache] max_gb"
        else:
            budget, source = default_budget(memory, weights, len(models)), f"{what} less the weights and a reserve"
        context = model.context_length or _own_context(config) or 8192
        window = context * rate
        prefix = CLAUDE_CODE_PREFIX * rate
        beside = max(0, (budget - window) // prefix)
        held = f"{budget // rate:,} tokens"
        request = f"a request filling the {context:,}-token window ({human_bytes(window)})"
        checkpoint = f"Claude Code's {CLAUDE_CODE_PREFIX // 1000}K-token prefix ({human_bytes(prefix)})"
        if budget < window:
            verdict = FAIL
            detail = f"{held}, less than {request}: lower context_length, set [engine] kv_bits, or raise [cache] max_gb"
        else:
            verdict = OK if beside >= 1 else WARN
            detail = f"{held}: {request} and {beside} checkpoint{'' if beside == 1 else 's'} of {checkpoint} beside it"
        detail = f"{key}: KV budget {human_bytes(budget)} ({source}), {detail}"
        checks.append((verdict, "fits", detail))
    return checks


def _own_context(config: dict) -> int | None:
    c = config.get("text_config", config) | config
    return next((c[k] for k in ("max_position_embeddings", "max_seq_len", "n_positions") if isinstance(c.get(k), int)), None)


def _weight_bytes(path: Path, config: dict, dequantized: bool) -> int:
    # About the files' size; dequantized on a CPU, each b-bit weight (with its group's
    # scale and bias in 16 bits) becomes 32 bits.
    size = disk_size(path)
    q = config.get("quantization") or {}
    if dequantized and q.get("bits"):
        return int(size * 32 / (q["bits"] + 32 / q.get("group_size", 64)))
    return size


def doctor(loaded: profiles.Loaded, host: str | None = None, port: int | None = None) -> list[Check]:
    """Every check for a loaded profile, in the order a user would fix them."""
    server = loaded.profile.server
    url = launcher.base_url(server, host, port)
    checks: list[Check] = [(OK, "profile", f"{loaded.name} ({loaded.path})"), check_device()]
    model_checks, model_bytes = check_models(loaded)
    checks.append(check_memory(model_bytes, loaded))
    checks += model_checks
    checks += check_kv(loaded)
    checks.append(check_port(loaded, url, host or server.host, port or server.port))
    checks.append(check_claude())
    checks.append(check_log_dir(log_folder(loaded)))
    return checks


def _run_doctor(args: argparse.Namespace) -> int:
    try:
        loaded = profiles.load(args.profile)
    except profiles.ProfileError as exc:
        print(_line(FAIL, "profile", str(exc)))
        return 1
    checks = doctor(loaded, args.host, args.port)
    for check in checks:
        print(_line(*check), flush=True)
    return 1 if any(verdict == FAIL for verdict, _, _ in checks) else 0
