"""The LaunchAgent plist (generated and read back with plistlib) and the launchctl command lines."""

from __future__ import annotations

import argparse
import os
import plistlib
import subprocess
import sys
from pathlib import Path

import pytest

from anyclaude import launchd, profiles

SERVICE = "gui/501/com.anyclaude.daemon"
NOT_LOADED = (113, "", 'Could not find service "com.anyclaude.daemon" in domain for user gui: 501\n')
OK = (0, "", "")


def scripted(*replies: tuple[int, str, str]):
    """A launchctl Runner that records each command line and answers with `replies` in order."""
    calls: list[list[str]] = []
    queue = list(replies)

    def run(argv: list[str]) -> subprocess.CompletedProcess:
        calls.append(argv)
        code, out, err = queue.pop(0)
        return subprocess.CompletedProcess(argv, code, out, err)

    return run, calls


def parse(*argv: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="anyclaude")
    launchd.add_commands(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


@pytest.fixture
def plist(tmp_path) -> dict:
    return launchd.render(
        profiles.find("tiny"),
        home=tmp_path / "home",
        command=["/opt/anyclaude/bin/anyclaude"],
        environ={"ANYCLAUDE_HOME": "/srv/anyclaude", "HF_HOME": "/srv/hf", "UNRELATED": "x"},
    )


def test_plist_round_trips_with_the_fields_launchd_needs(plist, tmp_path):
    home = tmp_path / "home"
    assert plistlib.loads(launchd.dumps(plist)) == plist
    assert plist["Label"] == "com.anyclaude.daemon"
    assert plist["ProgramArguments"] == ["/opt/anyclaude/bin/anyclaude", "serve", "--profile", str(profiles.find("tiny"))]
    assert plist["RunAtLoad"] is True
    assert plist["KeepAlive"] == {"SuccessfulExit": False}  # restarted after a crash only
    assert plist["ThrottleInterval"] >= 10
    assert plist["ProcessType"] == "Interactive"
    assert plist["WorkingDirectory"] == str(home)
    logs = home / "Library" / "Logs" / "anyclaude" / "daemon.log"
    assert plist["StandardOutPath"] == plist["StandardErrorPath"] == str(logs)
    env = plist["EnvironmentVariables"]
    assert env["PATH"].split(":")[0] == "/opt/anyclaude/bin"
    assert "/usr/bin" in env["PATH"].split(":")
    assert env["HF_HUB_OFFLINE"] == env["TRANSFORMERS_OFFLINE"] == "1"
    assert env["ANYCLAUDE_HOME"] == "/srv/anyclaude" and env["HF_HOME"] == "/srv/hf"
    assert "UNRELATED" not in env
    # Every template marker filled in, every path absolute.
    assert not [s for s in _strings(plist) if "@" in s]
    for path in (plist["ProgramArguments"][0], plist["ProgramArguments"][3], plist["StandardOutPath"], plist["WorkingDirectory"]):
        assert Path(path).is_absolute()


def test_the_template_itself_is_a_plist():
    template = plistlib.loads(launchd.TEMPLATE.read_bytes())
    assert template["Label"] == launchd.LABEL
    assert "@PROGRAM@" in template["ProgramArguments"]


def test_default_program_is_an_absolute_executable():
    command = launchd.program()
    assert Path(command[0]).is_absolute() and os.access(command[0], os.X_OK)


def test_print_writes_the_plist_on_any_system(capsysbinary):
    args = parse("launchd", "print", "--profile", "tiny")
    assert args.run(args) == 0
    printed = plistlib.loads(capsysbinary.readouterr().out)
    assert printed["ProgramArguments"][-2:] == ["--profile", str(profiles.find("tiny"))]
    assert printed["ProgramArguments"][0] == launchd.program()[0]


def test_print_refuses_a_profile_that_does_not_load(capsys):
    args = parse("launchd", "print", "--profile", "no-such-profile")
    assert args.run(args) == 2
    assert "not found" in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "darwin", reason="the non-macOS message")
@pytest.mark.parametrize("command", ["install", "uninstall", "status"])
def test_elsewhere_launchd_commands_say_macos_only(command, capsys):
    args = parse("launchd", command)
    assert args.run(args) == 1
    assert "launchd is macOS-only" in capsys.readouterr().err


def test_install_writes_the_plist_and_bootstraps_it(plist, tmp_path):
    path = tmp_path / "home" / "Library" / "LaunchAgents" / "com.anyclaude.daemon.plist"
    run, calls = scripted(NOT_LOADED, OK, OK)
    assert launchd.install(plist, path=path, run=run, uid=501) == path
    assert calls == [
        ["launchctl", "print", SERVICE],
        ["launchctl", "enable", SERVICE],
        ["launchctl", "bootstrap", "gui/501", str(path)],
    ]
    assert plistlib.loads(path.read_bytes()) == plist
    assert Path(plist["StandardOutPath"]).parent.is_dir()


def test_install_replaces_a_loaded_agent_once_it_is_gone(plist, tmp_path):
    path = tmp_path / "agent.plist"
    run, calls = scripted(OK, OK, OK, NOT_LOADED, OK, OK)
    launchd.install(plist, path=path, run=run, uid=501)
    assert calls == [
        ["launchctl", "print", SERVICE],
        ["launchctl", "bootout", SERVICE],
        ["launchctl", "print", SERVICE],  # still stopping
        ["launchctl", "print", SERVICE],
        ["launchctl", "enable", SERVICE],
        ["launchctl", "bootstrap", "gui/501", str(path)],
    ]


def test_install_reports_a_bootstrap_failure(plist, tmp_path):
    run, _ = scripted(NOT_LOADED, OK, (5, "", "Bootstrap failed: 5: Input/output error\n"))
    with pytest.raises(launchd.LaunchdError, match="bootstrap failed \\(5\\): Bootstrap failed: 5"):
        launchd.install(plist, path=tmp_path / "agent.plist", run=run, uid=501)


def test_uninstall_boots_out_and_waits_until_unloaded(plist, tmp_path):
    path = tmp_path / "agent.plist"
    path.write_bytes(launchd.dumps(plist))
    in_progress = (36, "", "Boot-out failed: 36: Operation now in progress\n")
    run, calls = scripted(OK, in_progress, OK, OK, NOT_LOADED)
    assert launchd.uninstall(path=path, run=run, uid=501) is True
    assert calls == [["launchctl", "print", SERVICE], ["launchctl", "bootout", SERVICE]] + [["launchctl", "print", SERVICE]] * 3
    assert not path.exists()


def test_uninstall_gives_up_on_an_agent_that_stays_loaded(tmp_path):
    calls = []

    def always_loaded(argv):
        calls.append(argv)
        return subprocess.CompletedProcess(argv, 0, "", "")

    with pytest.raises(launchd.LaunchdError, match="still loaded"):
        launchd.uninstall(path=tmp_path / "agent.plist", run=always_loaded, uid=501, timeout=0.3)
    assert ["launchctl", "bootout", SERVICE] in calls


def test_uninstall_of_nothing(tmp_path):
    run, calls = scripted(NOT_LOADED)
    assert launchd.uninstall(path=tmp_path / "agent.plist", run=run, uid=501) is False
    assert calls == [["launchctl", "print", SERVICE]]


def test_status_reads_launchctl_print(plist, tmp_path):
    path = tmp_path / "agent.plist"
    path.write_bytes(launchd.dumps(plist))
    printed = (
        f"{SERVICE} = {{\n\tactive count = 1\n\tpath = {path}\n\tstate = running\n\n"
        "\tprogram = /opt/anyclaude/bin/anyclaude\n\tenvironment = {\n\t\tstate = nested\n\t}\n"
        "\truns = 2\n\tpid = 4242\n\tlast exit code = 0\n}\n"
    )
    run, calls = scripted((0, printed, ""))
    lines = launchd.status(path=path, run=run, uid=501)
    assert calls == [["launchctl", "print", SERVICE]]
    assert lines[0] == f"plist    {path} (profile {profiles.find('tiny')})"
    assert lines[1] == f"launchd  loaded as {SERVICE}: running, pid 4242, last exit code 0, runs 2"

    run, _ = scripted(NOT_LOADED)
    assert launchd.status(path=tmp_path / "none.plist", run=run, uid=501)[-1] == "launchd  not loaded in gui/501"
