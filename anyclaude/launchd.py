"""`anyclaude launchd`: the LaunchAgent that starts the daemon at login (macOS)."""

from __future__ import annotations

import argparse
import os
import plistlib
import re
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from . import doctor, profiles

LABEL = "com.anyclaude.daemon"
TEMPLATE = Path(__file__).resolve().parent.parent / "launchd" / f"{LABEL}.plist"
# Settings the daemon reads, carried from the installing shell into the agent's environment
# so that it finds the same profiles, model cache and log.
CARRIED = ("ANYCLAUDE_HOME", "ANYCLAUDE_CACHE", "ANYCLAUDE_LOG", "HF_HOME", "HF_HUB_CACHE")
_SYSTEM_PATH = ("/opt/homebrew/bin", "/usr/local/bin", "/usr/bin", "/bin", "/usr/sbin", "/sbin")

# Runs one command line (argv[0] is "launchctl") and returns its result; tests pass their own.
Runner = Callable[[list[str]], subprocess.CompletedProcess]


class LaunchdError(Exception):
    """launchctl refused, or the agent did not unload in time."""


def add_commands(subparsers) -> None:
    """Add `launchd install|uninstall|status|print` to the `anyclaude` command's subparsers."""
    launchd = subparsers.add_parser("launchd", help="the LaunchAgent that runs the daemon at login (macOS)")
    commands = launchd.add_subparsers(dest="launchd_command", required=True)
    install = commands.add_parser("install", help=f"write ~/Library/LaunchAgents/{LABEL}.plist and load it")
    show = commands.add_parser("print", help="print the plist that install would write (any system)")
    for sub in (install, show):
        sub.add_argument("--profile", default="tiny", help="the profile to serve (a name or a TOML file; default: tiny)")
    install.set_defaults(run=_run_install)
    show.set_defaults(run=_run_print)
    commands.add_parser("uninstall", help="unload the agent and remove its plist").set_defaults(run=_run_uninstall)
    commands.add_parser("status", help="whether the agent is installed, loaded and running").set_defaults(run=_run_status)


# --- the plist -------------------------------------------------------------------


def agent_path(home: Path | None = None) -> Path:
    return (home or Path.home()) / "Library" / "LaunchAgents" / f"{LABEL}.plist"


def log_dir(home: Path | None = None) -> Path:
    return (home or Path.home()) / "Library" / "Logs" / "anyclaude"


def program() -> list[str]:
    """The command that runs anyclaude, by absolute path: launchd has no PATH of ours."""
    # Not resolved: a virtualenv's python is a symlink that only works where it stands.
    script = Path(sys.executable).absolute().parent / "anyclaude"
    return [str(script)] if script.is_file() else [str(Path(sys.executable).absolute()), "-m", "anyclaude"]


def render(
    profile_path: Path,
    *,
    home: Path | None = None,
    command: list[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> dict:
    """The agent's plist as a dict: the template with its @...@ values filled in."""
    home = home or Path.home()
    command = command or program()
    environ = os.environ if environ is None else environ
    bin_dir = str(Path(command[0]).parent)
    values = {
        "@PROFILE@": str(profile_path),
        "@HOME@": str(home),
        "@LOGS@": str(log_dir(home)),
        "@PATH@": ":".join(dict.fromkeys((bin_dir, *_SYSTEM_PATH))),
    }
    with open(TEMPLATE, "rb") as f:
        plist = _fill(plistlib.load(f), values)
    arguments = plist["ProgramArguments"]
    at = arguments.index("@PROGRAM@")
    plist["ProgramArguments"] = arguments[:at] + command + arguments[at + 1 :]
    plist["EnvironmentVariables"].update({k: environ[k] for k in CARRIED if environ.get(k)})
    return plist


def _fill(value, values: dict[str, str]):
    if isinstance(value, str):
        for marker, text in values.items():
            value = value.replace(marker, text)
        return value
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    return value


def dumps(plist: dict) -> bytes:
    return plistlib.dumps(plist, sort_keys=False)


# --- launchctl -----------------------------------------------------------------------


def launchctl(argv: list[str]) -> subprocess.CompletedProcess:
    """The default Runner: run the command line, capturing its output."""
    return subprocess.run(argv, check=False, capture_output=True, text=True)


def domain(uid: int | None = None) -> str:
    return f"gui/{os.getuid() if uid is None else uid}"


def service(uid: int | None = None) -> str:
    return f"{domain(uid)}/{LABEL}"


def is_loaded(run: Runner = launchctl, uid: int | None = None) -> bool:
    return run(["launchctl", "print", service(uid)]).returncode == 0


def install(
    plist: dict, *, path: Path | None = None, run: Runner = launchctl, uid: int | None = None, timeout: float = 30
) -> Path:
    """Write the plist and (re)load the agent; returns where the plist went."""
    path = path or agent_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    # launchd opens the log file but does not create its folder.
    Path(plist["StandardOutPath"]).parent.mkdir(parents=True, exist_ok=True)
    if is_loaded(run, uid):  # bootstrap refuses a loaded service: replace it
        unload(run=run, uid=uid, timeout=timeout)
    path.write_bytes(dumps(plist))
    # A service once disabled (launchctl disable) would make bootstrap fail with error 5.
    run(["launchctl", "enable", service(uid)])
    result = run(["launchctl", "bootstrap", domain(uid), str(path)])
    if result.returncode != 0:
        raise LaunchdError(f"launchctl bootstrap failed ({result.returncode}): {(result.stderr or result.stdout).strip()}")
    return path


def unload(*, run: Runner = launchctl, uid: int | None = None, timeout: float = 30, poll: float = 0.2) -> None:
    """bootout the agent, then wait until launchd no longer knows it (its process has exited)."""
    result = run(["launchctl", "bootout", service(uid)])
    deadline = time.monotonic() + timeout
    # bootout may return while the daemon is still stopping (error 36, "in progress").
    while is_loaded(run, uid):
        if time.monotonic() > deadline:
            detail = (result.stderr or result.stdout or "").strip()
            raise LaunchdError(f"{LABEL} is still loaded {timeout:.0f} s after launchctl bootout ({result.returncode}: {detail})")
        time.sleep(poll)


def uninstall(*, path: Path | None = None, run: Runner = launchctl, uid: int | None = None, timeout: float = 30) -> bool:
    """Unload the agent if loaded and remove its plist; False if there was nothing to remove."""
    path = path or agent_path()
    loaded = is_loaded(run, uid)
    if loaded:
        unload(run=run, uid=uid, timeout=timeout)
    existed = path.exists()
    path.unlink(missing_ok=True)
    return loaded or existed


def status(*, path: Path | None = None, run: Runner = launchctl, uid: int | None = None) -> list[str]:
    """Lines saying whether the agent is installed (and for which profile), loaded and running."""
    path = path or agent_path()
    lines = []
    if path.exists():
        try:
            arguments = plistlib.loads(path.read_bytes()).get("ProgramArguments", [])
            profile = arguments[arguments.index("--profile") + 1]
        except (plistlib.InvalidFileException, ValueError, IndexError):
            profile = "?"
        lines.append(f"plist    {path} (profile {profile})")
    else:
        lines.append(f"plist    not installed ({path} does not exist)")
    result = run(["launchctl", "print", service(uid)])
    if result.returncode != 0:
        lines.append(f"launchd  not loaded in {domain(uid)}")
        return lines
    fields = dict(re.findall(r"^\t(state|pid|last exit code|runs) = (.+)$", result.stdout, re.MULTILINE))
    described = [fields.get("state", "loaded")]
    if "pid" in fields:
        described.append(f"pid {fields['pid']}")
    if "last exit code" in fields:
        described.append(f"last exit code {fields['last exit code']}")
    if "runs" in fields:
        described.append(f"runs {fields['runs']}")
    lines.append(f"launchd  loaded as {service(uid)}: {', '.join(described)}")
    return lines


# --- the commands ------------------------------------------------------------------------


def _macos_only(what: str) -> int | None:
    if sys.platform == "darwin":
        return None
    print(
        f"anyclaude: launchd {what}: launchd is macOS-only. Here, run `anyclaude serve` under your own "
        "service manager (`anyclaude launchd print` still shows the plist).",
        file=sys.stderr,
    )
    return 1


def _run_print(args: argparse.Namespace) -> int:
    try:
        # Loaded, not only found: an agent for a profile that does not validate would never start.
        plist = render(profiles.load(args.profile).path)
    except profiles.ProfileError as exc:
        print(f"anyclaude: {exc}", file=sys.stderr)
        return 2
    sys.stdout.buffer.write(dumps(plist))
    return 0


def _run_install(args: argparse.Namespace) -> int:
    if (code := _macos_only("install")) is not None:
        return code
    try:
        loaded = profiles.load(args.profile)
        path = install(render(loaded.path))
    except (profiles.ProfileError, LaunchdError) as exc:
        print(f"anyclaude: {exc}", file=sys.stderr)
        return 1
    print(f"anyclaude: installed {path} and loaded it; the daemon's output goes to {log_dir() / 'daemon.log'}")
    # The agent runs offline: a model not downloaded yet would fail to load.
    for verdict, _, detail in doctor.check_models(loaded)[0]:
        if verdict != doctor.OK:
            print(f"anyclaude: {detail}", file=sys.stderr)
    return 0


def _run_uninstall(args: argparse.Namespace) -> int:
    if (code := _macos_only("uninstall")) is not None:
        return code
    try:
        removed = uninstall()
    except LaunchdError as exc:
        print(f"anyclaude: {exc}", file=sys.stderr)
        return 1
    print(f"anyclaude: {'unloaded and removed ' + LABEL if removed else LABEL + ' was not installed'}")
    return 0


def _run_status(args: argparse.Namespace) -> int:
    if (code := _macos_only("status")) is not None:
        return code
    lines = status()
    print("\n".join(lines))
    return 1 if "not loaded" in lines[-1] else 0
