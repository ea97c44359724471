"""The `anyclaude` command."""

from __future__ import annotations

import argparse
import os
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
    return args.run(args)


def _serve(args: argparse.Namespace) -> int:
    try:
        loaded = profiles.load(args.profile)
    except profiles.ProfileError as exc:
        print(f"anyclaude: {exc}", file=sys.stderr)
        return 2
    from . import blas

    blas.preload_and_reexec(sys.argv[1:])
    from granian import Granian
    from granian.constants import HTTPModes, Interfaces

    host = args.host or loaded.profile.server.host
    port = args.port or loaded.profile.server.port
    os.environ["ANYCLAUDE_PROFILE"] = str(loaded.path)
    print(f"anyclaude: profile {loaded.name} ({loaded.path})", flush=True)
    print(f"anyclaude: listening on http://{host}:{port} (the model is loading; GET /health says when it is ready)", flush=True)
    Granian(
        "anyclaude.app:create_app",
        factory=True,
        address=host,
        port=port,
        interface=Interfaces.ASGI,
        http=HTTPModes.http1,
        workers=1,
        log_access=False,
    ).serve()
    return 0


def _log_path(args: argparse.Namespace) -> Path:
    from . import logs

    if args.file:
        return args.file
    try:
        configured = profiles.load(args.profile).profile.log.path
    except profiles.ProfileError:
        configured = None
    return Path(configured).expanduser() if configured else logs.default_path()


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
