"""The `anyclaude` command."""

from __future__ import annotations

import argparse
import os
import re
import sys
from pathlib import Path

from . import profiles


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="anyclaude", description="The Anthropic Messages API from local MLX models.")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument("--profile", default="tiny", help="a profile name (profiles/NAME.toml) or a TOML file")
    serve.add_argument("--host", help="address to bind (default: the profile's server.host)")
    serve.add_argument("--port", type=int, help="port to bind (default: the profile's server.port)")
    serve.set_defaults(run=_serve)

    models = commands.add_parser("models", help="model files").add_subparsers(dest="models_command", required=True)
    gguf = models.add_parser("import-gguf", help="convert a GGUF file into an MLX model directory")
    gguf.add_argument("file", type=Path)
    gguf.add_argument("--out", type=Path, required=True, help="the MLX model directory to write")
    gguf.set_defaults(run=_import_gguf)

    prof = commands.add_parser("profiles", help="list, show, create and edit profiles").add_subparsers(dest="profiles_command", required=True)
    prof.add_parser("list", help="every profile and its models").set_defaults(run=_profiles_list)
    show = prof.add_parser("show", help="a profile with every default spelled out")
    show.add_argument("name")
    show.set_defaults(run=_profiles_show)
    new = prof.add_parser("new", help="a new profile in the user's config dir")
    new.add_argument("name")
    new.add_argument("--from", dest="source", default="tiny", help="the profile to copy (default: tiny)")
    new.add_argument("--model", help="the model path for it (repo id, MLX directory or .gguf)")
    new.set_defaults(run=_profiles_new)
    edit = prof.add_parser("set", help="change keys: anyclaude profiles set NAME sampling.temperature=0.2")
    edit.add_argument("name")
    edit.add_argument("assignments", nargs="+", metavar="KEY=VALUE")
    edit.set_defaults(run=_profiles_set)

    log = commands.add_parser("logs", help="the request log").add_subparsers(dest="logs_command", required=True)
    stats = log.add_parser("stats", help="outcomes, truncation, time to first token, decode speed, cache hits")
    stats.add_argument("--since", help="30m, 2h, 1d, or an ISO date/time")
    tail = log.add_parser("tail", help="follow the log, one readable line per request")
    tail.add_argument("-n", type=int, default=10, help="show the last N requests first (default 10)")
    for sub in (stats, tail):
        sub.add_argument("--profile", default="tiny", help="whose log (profiles may set [log] path)")
        sub.add_argument("--file", type=Path, help="a log file (instead of the profile's)")
        sub.add_argument("--json", action="store_true", help="print JSON")
    stats.set_defaults(run=_logs_stats)
    tail.set_defaults(run=_logs_tail)

    from . import doctor, launchd, launcher

    for module in (launcher, doctor, launchd):
        module.add_commands(commands)

    args = parser.parse_args(argv)
    try:
        return args.run(args)
    except profiles.ProfileError as exc:  # a profile that cannot be found or does not validate
        print(f"anyclaude: {exc}", file=sys.stderr)
        return 2


def _serve(args: argparse.Namespace) -> int:
    loaded = profiles.load(args.profile)
    host = args.host or loaded.profile.server.host
    port = args.port or loaded.profile.server.port
    if not profiles.loopback(host) and not loaded.profile.server.auth_token:
        print(
            f"anyclaude: refusing to listen on {host} without an auth token: anyone who can reach it "
            f"could use your model. Set server.auth_token in {loaded.path}, or bind 127.0.0.1.",
            file=sys.stderr,
        )
        return 2
    from .engine.cpu import blas

    blas.preload_and_reexec(sys.argv[1:])
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces

    os.environ["ANYCLAUDE_PROFILE"] = str(loaded.path)
    os.environ["ANYCLAUDE_PID"] = str(os.getpid())
    os.environ["ANYCLAUDE_HOST"] = host  # a reload must not drop the token of an exposed daemon
    print(f"anyclaude: profile {loaded.name} ({loaded.path})", flush=True)
    print(f"anyclaude: listening on http://{host}:{port} (the model is loading; GET /health says when it is ready)", flush=True)
    Granian(
        "anyclaude.http.app:create_app",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        workers=1,
        log_access=False,
    ).serve()
    return 0


def _profiles_list(args: argparse.Namespace) -> int:
    for name, path in profiles.names().items():
        try:
            models = ", ".join(m.where for m in profiles.load(str(path)).profile.models.values())
        except profiles.ProfileError as exc:
            models = f"INVALID: {exc}"
        print(f"{name:<16}{models}\n{'':<16}{path}")
    return 0


def _profiles_show(args: argparse.Namespace) -> int:
    loaded = profiles.load(args.name)
    print(f"# {loaded.path}\n{profiles.to_toml(loaded.profile)}", end="")
    return 0


def _profiles_new(args: argparse.Namespace) -> int:
    target = profiles.config_home() / "profiles" / f"{args.name}.toml"
    if target.exists():
        print(f"anyclaude: {target} exists already; edit it, or `profiles set` it", file=sys.stderr)
        return 2
    data = profiles.read(profiles.find(args.source))
    if args.model:
        # One model, named after its path, with every alias pointing at it.
        key = re.sub(r"[^a-z0-9-]+", "-", Path(args.model).name.lower().removesuffix(".gguf")).strip("-") or "model"
        old = next(iter(data["models"].values()))
        data["models"] = {key: {"path": args.model, "max_tokens": old.get("max_tokens", 4096)}}
        data["aliases"] = {name: key for name in data.get("aliases", {})} or {"claude-*": key}
    profiles.write(target, data)
    print(f"anyclaude: wrote {target}")
    return 0


def _profiles_set(args: argparse.Namespace) -> int:
    path = profiles.find(args.name)
    data = profiles.read(path)
    for assignment in args.assignments:
        key, sep, value = assignment.partition("=")
        if not sep:
            raise profiles.ProfileError(f"{assignment}: expected KEY=VALUE")
        profiles.set_key(data, key.strip(), value.strip())
    profiles.write(path, data)  # validated first: a bad value leaves the file as it was
    print(f"anyclaude: updated {path}")
    return 0


def _log_path(args: argparse.Namespace) -> Path:
    from . import logs

    if args.file:
        return args.file
    try:
        configured = profiles.load(args.profile).profile.log.path
    except profiles.ProfileError:
        configured = None
    return logs.location(configured)


def _logs_stats(args: argparse.Namespace) -> int:
    import json

    from . import logs

    since = logs.parse_since(args.since) if args.since else None
    figures = logs.stats(logs.read(_log_path(args), since))
    print(json.dumps(figures) if args.json else logs.format_stats(figures))
    return 0


def _logs_tail(args: argparse.Namespace) -> int:
    import json

    from . import logs

    path = _log_path(args)
    show = (lambda r: json.dumps(r)) if args.json else logs.format_record
    seen = path.read_bytes() if path.exists() else b""
    for line in seen.splitlines()[-args.n :] if args.n else []:
        try:
            print(show(json.loads(line)), flush=True)
        except ValueError:
            continue
    try:
        for record in logs.follow(path, start=len(seen)):
            print(show(record), flush=True)
    except KeyboardInterrupt:
        pass
    return 0


def _import_gguf(args: argparse.Namespace) -> int:
    from .gguf import import_gguf

    try:
        out = import_gguf(args.file, args.out)
    except (OSError, ValueError) as exc:
        print(f"anyclaude: {exc}", file=sys.stderr)
        return 1
    print(f"anyclaude: wrote {out}")
    return 0
