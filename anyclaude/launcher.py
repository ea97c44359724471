"""`anyclaude claude`, `env` and `stop`: Claude Code pointed at the daemon, started in the
background if need be, and the daemon stopped."""

from __future__ import annotations

import argparse
import http.client
import json
import math
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlsplit

from . import logs, profiles

# Claude Code needs some credential; a daemon without [server] auth_token accepts any.
PLACEHOLDER_TOKEN = "anyclaude-local"
# The context window assumed when neither the profile nor the daemon says: small, so
# that Claude Code compacts too early rather than overflowing the model.
FALLBACK_CONTEXT = 8192
FAMILIES = ("opus", "sonnet", "haiku")
# Options of `anyclaude claude` itself (each takes a value); they come before claude's own.
_OWN_OPTIONS = ("--profile", "--port", "--host", "--wait")


class DaemonError(Exception):
    """The daemon cannot be reached or started, or serves another profile."""


def add_commands(subparsers) -> None:
    """Add `claude`, `env` and `stop` to the `anyclaude` command's subparsers."""
    # No option parsing here: every argument goes to claude (`anyclaude claude -p hi`),
    # except leading anyclaude options, which _split_args takes off first.
    claude = subparsers.add_parser(
        "claude",
        prefix_chars="\0",
        add_help=False,
        help="run Claude Code against the profile's daemon (started in the background if need be); "
        "`anyclaude claude --help` for its options",
    )
    claude.add_argument("args", nargs=argparse.REMAINDER)
    claude.set_defaults(run=_run_claude)

    env = subparsers.add_parser("env", help="the environment `anyclaude claude` gives Claude Code, to copy")
    _add_target_options(env)
    form = env.add_mutually_exclusive_group()
    form.add_argument("--shell", action="store_true", help="only the shell exports (for eval)")
    form.add_argument("--settings", action="store_true", help="only the settings.json snippet")
    env.set_defaults(run=_run_env)

    stop = subparsers.add_parser("stop", help="stop the daemon of a profile (one started by `anyclaude claude`, say)")
    _add_target_options(stop)
    stop.add_argument("--wait", type=float, default=30, help="seconds to wait for it to exit (default: 30)")
    stop.set_defaults(run=_run_stop)


def _add_target_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default="tiny", help="a profile name or TOML file (default: tiny)")
    parser.add_argument("--port", type=int, help="the daemon's port (default: the profile's server.port)")
    parser.add_argument("--host", help="the daemon's address (default: the profile's server.host)")


def _claude_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="anyclaude claude",
        usage="%(prog)s [--profile P] [--port N] [--host H] [--wait S] [--] [CLAUDE ARGS...]",
        description="Make sure the profile's daemon is up, then run `claude` (the first one on PATH: "
        "PATH=DIR:$PATH picks another) with the environment that points it there. Options after the "
        "first one not listed here (or after `--`) go to claude.",
    )
    _add_target_options(parser)
    parser.add_argument("--wait", type=float, default=900, help="seconds to wait for the model to load (default 900)")
    return parser


def _split_args(args: list[str]) -> tuple[list[str], list[str]]:
    """Leading anyclaude options, and the rest (claude's arguments)."""
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--":
            return args[:i], args[i + 1 :]
        if arg in ("-h", "--help"):
            i += 1
        elif arg.split("=", 1)[0] in _OWN_OPTIONS:
            i += 1 if "=" in arg else 2
        else:
            break
    return args[:i], args[i:]


# --- the environment ---------------------------------------------------------


def base_url(server: profiles.Server, host: str | None = None, port: int | None = None) -> str:
    """The URL a client uses for a daemon with these [server] settings (a wildcard bind is
    reached on loopback); host and port override them."""
    host = host or server.host
    if host in ("", "0.0.0.0", "::"):
        host = "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"http://{host}:{port or server.port}"


def auth_token(profile: profiles.Profile) -> str:
    return getattr(profile.server, "auth_token", None) or PLACEHOLDER_TOKEN


def family_names(profile: profiles.Profile) -> dict[str, str]:
    """For opus, sonnet and haiku, the listed model name that picks their model."""
    listed = profile.listed_names()
    if not listed:
        raise profiles.ProfileError("the profile lists no model names: add a claude-style name under [aliases]")
    return {family: next((n for n in listed if family in n.lower()), listed[0]) for family in FAMILIES}


def model_ids(profile: profiles.Profile) -> dict[str, str]:
    """For opus, sonnet and haiku, the id Claude Code sends: `anyclaude-<model>`. Not a
    `claude-` id, for which Claude Code would take its own idea of the context window
    over CLAUDE_CODE_MAX_CONTEXT_TOKENS; still one with "claude" in it, which its model
    discovery keeps."""
    return {family: profiles.model_id(profile.resolve(name)) for family, name in family_names(profile).items()}


def context_window(profile: profiles.Profile, health: dict | None = None, served: dict[str, int] | None = None) -> int:
    """The smallest context among the models behind the three names: from the profile, else
    as the daemon reports it (GET /health, then GET /v1/models), else FALLBACK_CONTEXT."""
    reported = (health or {}).get("models") or {}
    sizes = []
    for name in family_names(profile).values():
        key = profile.resolve(name)
        size = profile.models[key].context_length or (reported.get(key) or {}).get("context_length")
        sizes.append(size or (served or {}).get(profiles.model_id(key)) or (served or {}).get(name) or FALLBACK_CONTEXT)
    return min(sizes)


# What Claude Code keeps free, beside the output limit, before it compacts on its own.
COMPACT_RESERVE = 13_000


def output_limit(profile: profiles.Profile, context: int) -> int:
    """The output limit Claude Code asks for. It reserves COMPACT_RESERVE tokens plus this
    limit before it compacts, so a limit near the window would leave no room for a
    conversation: at most an eighth of the window (and never more than the models give)."""
    models = [profile.models[profile.resolve(n)] for n in family_names(profile).values()]
    return min(min(m.max_tokens for m in models), max(1024, context // 8))


def compacts_too_soon(context: int, output: int) -> bool:
    """Whether Claude Code would compact by itself before a quarter of the window is used:
    below about 20K tokens it would summarise the conversation on every turn (an 8K model,
    on every turn from the second), so it is left to stop at the window for a `/compact`."""
    return context - COMPACT_RESERVE - output < context // 4


def claude_env(profile: profiles.Profile, url: str, context: int) -> dict[str, str]:
    """The variables that point Claude Code at the daemon and fit it to the local model."""
    timeouts = profile.timeouts
    output = output_limit(profile, context)
    return {
        "ANTHROPIC_BASE_URL": url,
        "ANTHROPIC_AUTH_TOKEN": auth_token(profile),
        **{f"ANTHROPIC_DEFAULT_{family.upper()}_MODEL": name for family, name in model_ids(profile).items()},
        # The billing header changes per request and would break the prefix cache.
        "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        # The model's window (honoured for ids that do not start with claude-).
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": str(context),
        "CLAUDE_CODE_DISABLE_1M_CONTEXT": "1",
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(output),
        **({"DISABLE_AUTO_COMPACT": "1"} if compacts_too_soon(context, output) else {}),
        # What kind of request each is (main, subagent, auxiliary...), and the models listed.
        "CLAUDE_CODE_GATEWAY_HINT_HEADERS": "1",
        "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1",
        # MCP tools stay out of the prompt until the model searches for them.
        "ENABLE_TOOL_SEARCH": "true",
        "API_TIMEOUT_MS": str(math.ceil(timeouts.total * 1000)),
        # Claude Code's stream watchdog (5 min at least) must outlast the daemon's own
        # prefill budget, so that the daemon, which ends the stream properly, gives up first.
        "CLAUDE_STREAM_IDLE_TIMEOUT_MS": str(max(300_000, math.ceil((max(timeouts.first_token, timeouts.idle) + 30) * 1000))),
    }


def shell_exports(env: dict[str, str]) -> str:
    return "".join(f"export {key}={shlex.quote(value)}\n" for key, value in env.items())


def settings_snippet(env: dict[str, str]) -> str:
    return json.dumps({"env": env}, indent=2) + "\n"


# --- the daemon ----------------------------------------------------------------


def fetch_json(url: str, path: str, token: str | None = None, timeout: float = 3.0) -> tuple[int, dict | None] | None:
    """GET a JSON document: (status, body or None if not a JSON object); None if nothing answers.
    http.client, not urllib: a proxy from the environment must not see loopback requests."""
    where = urlsplit(url)
    conn = http.client.HTTPConnection(where.hostname, where.port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"authorization": f"Bearer {token}"} if token else {})
        response = conn.getresponse()
        status, data = response.status, response.read()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()
    try:
        body = json.loads(data)
    except ValueError:
        body = None
    return status, body if isinstance(body, dict) else None


def served_contexts(url: str, token: str | None) -> dict[str, int]:
    """Context sizes the daemon lists in GET /v1/models (max_input_tokens), by model name."""
    reply = fetch_json(url, "/v1/models", token)
    if not reply or reply[0] != 200 or not reply[1]:
        return {}
    return {m["id"]: m["max_input_tokens"] for m in reply[1].get("data", []) if m.get("max_input_tokens")}


def daemon_log(loaded: profiles.Loaded) -> Path:
    """Where a daemon started in the background writes its output: beside the request log."""
    return logs.location(loaded.profile.log.path).parent / f"daemon-{loaded.name}.log"


def start_daemon(loaded: profiles.Loaded, port: int, host: str | None = None) -> tuple[subprocess.Popen, Path]:
    """`anyclaude serve` for the profile, detached: it outlives this command and its terminal."""
    log = daemon_log(loaded)
    log.parent.mkdir(parents=True, exist_ok=True)
    command = [sys.executable, "-m", "anyclaude", "serve", "--profile", str(loaded.path), "--port", str(port)]
    if host:
        command += ["--host", host]
    with open(log, "ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C in the claude session must not reach it
            cwd=Path.home(),
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
    return process, log


def same_profile(health: dict, loaded: profiles.Loaded) -> bool:
    """Whether a daemon's GET /health is that of this profile (by file when it says which)."""
    if health.get("profile_path"):
        return Path(health["profile_path"]).resolve() == loaded.path.resolve()
    return health.get("profile") == loaded.name


def _check(reply: tuple[int, dict | None], loaded: profiles.Loaded, url: str) -> None:
    status, body = reply
    if status in (401, 403):
        raise DaemonError(f"{url} refuses the auth token (HTTP {status}); check [server] auth_token in {loaded.path}")
    if not body or "profile" not in body:
        raise DaemonError(f"{url} answers, but not as anyclaude (GET /health gave HTTP {status}); pick another port with --port")
    if not same_profile(body, loaded):
        where = body.get("profile_path") or "?"
        raise DaemonError(
            f"{url} serves profile {body['profile']!r} ({where}), not {loaded.name!r} ({loaded.path}); "
            "stop that daemon, or use another port with --port"
        )
    failed = {key: m for key, m in (body.get("models") or {}).items() if m.get("state") == "failed"}
    if failed:
        raise DaemonError(f"model {', '.join(failed)} failed to load (see the daemon's output)")


def _tail(path: Path, lines: int = 20) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def ensure_daemon(loaded: profiles.Loaded, url: str, *, port: int, host: str | None = None, wait: float = 900) -> dict:
    """GET /health of the profile's daemon once it is ready; starts one in the background when
    nothing answers at `url`. DaemonError if it cannot, or another profile answers there."""
    token = auth_token(loaded.profile)
    reply = fetch_json(url, "/health", token)
    process = log = None
    if reply is None:
        process, log = start_daemon(loaded, port, host)
        _say(f"started the daemon for profile {loaded.name} on {url} (pid {process.pid}; output in {log})")
    started = time.monotonic()
    said = started
    while True:
        if reply is not None:
            try:
                _check(reply, loaded, url)
            except DaemonError:
                if process is not None:  # ours, and of no use: don't leave it holding the port
                    process.terminate()
                raise
            if reply[0] == 200:
                return reply[1]
        if process is not None and process.poll() is not None:
            raise DaemonError(f"the daemon exited with code {process.returncode}; the end of {log}:\n{_tail(log)}")
        now = time.monotonic()
        if now - started > wait:
            raise DaemonError(f"{url} is not ready after {wait:.0f} s (still loading?); run again to keep waiting")
        if now - said >= 10:
            said = now
            _say(f"waiting for the model to load ({now - started:.0f} s)")
        time.sleep(0.25)
        reply = fetch_json(url, "/health", token)


def _say(message: str) -> None:
    # stderr: claude's stdout may be a pipe (`anyclaude claude -p ... | jq`).
    print(f"anyclaude: {message}", file=sys.stderr, flush=True)


# --- the commands ----------------------------------------------------------------


def _load(name: str) -> profiles.Loaded:
    loaded = profiles.load(name)
    try:
        family_names(loaded.profile)
    except profiles.ProfileError as exc:
        raise profiles.ProfileError(f"{loaded.path}: {exc}") from None
    return loaded


def _run_claude(args: argparse.Namespace) -> int:
    own, claude_args = _split_args(args.args)
    options = _claude_parser().parse_args(own)
    loaded = _load(options.profile)
    program = shutil.which("claude")
    if program is None:
        _say("`claude` is not on PATH; install Claude Code (https://docs.claude.com/en/docs/claude-code)")
        return 127
    port = options.port or loaded.profile.server.port
    url = base_url(loaded.profile.server, options.host, port)
    try:
        health = ensure_daemon(loaded, url, port=port, host=options.host, wait=options.wait)
    except DaemonError as exc:
        _say(str(exc))
        return 1
    token = auth_token(loaded.profile)
    env = claude_env(loaded.profile, url, context_window(loaded.profile, health, served_contexts(url, token)))
    # A real API key beside the token makes Claude Code warn of an auth conflict.
    child = {k: v for k, v in os.environ.items() if k != "ANTHROPIC_API_KEY"} | env
    sys.stdout.flush()
    # exec, not a child process: claude gets the terminal, the signals and the exit code as is.
    os.execve(program, ["claude", *claude_args], child)
    return 0  # not reached


def _run_stop(args: argparse.Namespace) -> int:
    loaded = profiles.load(args.profile)
    url = base_url(loaded.profile.server, args.host, args.port)
    reply = fetch_json(url, "/health", auth_token(loaded.profile), timeout=1.0)
    health = reply[1] if reply else None
    if not health or "profile" not in health:
        _say(f"no daemon answers at {url}" if reply is None else f"{url} is not an anyclaude daemon")
        return 1
    pid, worker = health.get("pid"), health.get("worker_pid")
    # A pid means something only on this machine, and only for an anyclaude process (not this
    # one: a pid may be reused). The serve process first, which stops its worker; the worker
    # alone when it serves on without it.
    local = profiles.loopback(urlsplit(url).hostname or "")
    candidates = (p for p in (pid, worker) if local and isinstance(p, int) and p != os.getpid())
    target = next((p for p in candidates if "anyclaude" in _ps(p, "command")), None)
    if target is None:
        _say(f"the daemon at {url} is not an `anyclaude serve` of this machine that this command can signal: stop it where it runs")
        return 1
    which = f"pid {target}" if target == pid else f"worker pid {target}; its serve process, pid {pid}, was gone"
    try:
        os.kill(target, signal.SIGTERM)  # as Ctrl-C: the requests in hand end, logged
    except OSError as exc:
        _say(f"cannot signal the daemon at {url} ({which}): {exc.strerror}")
        return 1
    deadline = time.monotonic() + args.wait
    while _ps(target, "stat")[:1] not in ("", "Z"):  # gone, or a zombie nobody has reaped yet
        if time.monotonic() > deadline:
            _say(f"the daemon at {url} ({which}) is still running {args.wait:.0f} s after SIGTERM")
            return 1
        time.sleep(0.2)
    _say(f"stopped the daemon for profile {health['profile']} at {url} ({which})")
    return 0


def _ps(pid: int, field: str) -> str:
    """A field of `ps` for a process ("" if there is none): Linux and macOS alike."""
    result = subprocess.run(["ps", "-o", f"{field}=", "-p", str(pid)], capture_output=True, text=True)
    return result.stdout.strip()


def _run_env(args: argparse.Namespace) -> int:
    loaded = _load(args.profile)
    url = base_url(loaded.profile.server, args.host, args.port)
    token = auth_token(loaded.profile)
    # The daemon, if it is up and serves this profile, knows the context; never started from here.
    reply = fetch_json(url, "/health", token, timeout=1.0)
    health = reply[1] if reply and reply[1] and same_profile(reply[1], loaded) else None
    served = served_contexts(url, token) if health else {}
    env = claude_env(loaded.profile, url, context_window(loaded.profile, health, served))
    if args.shell:
        print(shell_exports(env), end="")
    elif args.settings:
        print(settings_snippet(env), end="")
    else:
        print(f"# profile {loaded.name}: shell exports\n{shell_exports(env)}")
        print(f"# or in ~/.claude/settings.json (or a project's .claude/settings.json):\n{settings_snippet(env)}", end="")
    return 0
