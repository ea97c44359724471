"""`anyclaude claude` and `anyclaude env`, with a stand-in `claude` that records its arguments
and environment, against the real daemon."""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from anyclaude import launcher, profiles
from bench.harness import Daemon, free_port, profile_file, request


STAND_IN = """#!{python}
# A stand-in for Claude Code: records its arguments, its environment and what the daemon
# answers at the base URL with the token it was given; exits with 3.
import json, os, sys, urllib.request
request = urllib.request.Request(
    os.environ["ANTHROPIC_BASE_URL"] + "/v1/models",
    headers={{"authorization": "Bearer " + os.environ["ANTHROPIC_AUTH_TOKEN"]}},
)
models = json.load(urllib.request.urlopen(request, timeout=30))
with open(os.environ["CLAUDE_RECORD"], "w") as f:
    json.dump({{"argv": sys.argv[1:], "env": dict(os.environ), "models": models}}, f)
sys.exit(3)
"""


@pytest.fixture
def stand_in(tmp_path) -> dict[str, str]:
    """An environment whose PATH finds the stand-in claude first; it records to CLAUDE_RECORD."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    claude.write_text(STAND_IN.format(python=sys.executable))
    claude.chmod(0o755)
    return dict(
        os.environ,
        PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}",
        CLAUDE_RECORD=str(tmp_path / "record.json"),
        ANYCLAUDE_LOG=str(tmp_path / "logs" / "requests.jsonl"),
        ANTHROPIC_API_KEY="sk-ant-a-real-key",
    )


def run_anyclaude(*argv: str, env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    # A process of its own: `anyclaude claude` replaces itself with claude.
    command = [sys.executable, "-m", "anyclaude", *argv]
    return subprocess.run(command, check=False, env=env, capture_output=True, text=True, timeout=timeout)


def record(env: dict[str, str]) -> dict:
    return json.loads(Path(env["CLAUDE_RECORD"]).read_text())


# --- the environment, from the profile ------------------------------------------------------


def test_env_points_claude_code_at_the_profile_and_fits_the_model():
    profile = profiles.load("tiny").profile
    env = launcher.claude_env(profile, "http://127.0.0.1:8421", context=8192)
    assert env == {
        "ANTHROPIC_BASE_URL": "http://127.0.0.1:8421",
        "ANTHROPIC_AUTH_TOKEN": launcher.PLACEHOLDER_TOKEN,
        # Not claude- ids: for those Claude Code ignores CLAUDE_CODE_MAX_CONTEXT_TOKENS.
        "ANTHROPIC_DEFAULT_OPUS_MODEL": "anyclaude-smollm2",
        "ANTHROPIC_DEFAULT_SONNET_MODEL": "anyclaude-smollm2",
        "ANTHROPIC_DEFAULT_HAIKU_MODEL": "anyclaude-smollm2",
        "CLAUDE_CODE_ATTRIBUTION_HEADER": "0",
        "CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC": "1",
        "CLAUDE_CODE_MAX_CONTEXT_TOKENS": "8192",
        "CLAUDE_CODE_DISABLE_1M_CONTEXT": "1",
        "CLAUDE_CODE_MAX_OUTPUT_TOKENS": str(profiles.load("tiny").profile.models["smollm2"].max_tokens),
        # Claude Code keeps 13K tokens free before it compacts: more than this whole window.
        "DISABLE_AUTO_COMPACT": "1",
        "CLAUDE_CODE_GATEWAY_HINT_HEADERS": "1",
        "CLAUDE_CODE_ENABLE_GATEWAY_MODEL_DISCOVERY": "1",
        "ENABLE_TOOL_SEARCH": "true",
        "API_TIMEOUT_MS": "600000",  # timeouts.total = 600 s
        "CLAUDE_STREAM_IDLE_TIMEOUT_MS": "300000",  # first_token 120 s: Claude Code's 5 min minimum
    }


TWO_MODELS = b"""
[models.big]
path = "mlx-community/big"
context_length = 65536
max_tokens = 8192
[models.small]
path = "mlx-community/small"
max_tokens = 2048
[aliases]
"claude-sonnet-4-6" = "big"
"local-small" = "small"
"claude-*" = "big"
[timeouts]
first_token = 600
total = 1200.5
"""


def test_names_contexts_and_timeouts_from_a_profile_with_two_models():
    profile = profiles.parse(TWO_MODELS, Path("two.toml"))
    # No opus or haiku name listed: the first listed name stands in.
    assert launcher.family_names(profile) == dict.fromkeys(("opus", "sonnet", "haiku"), "claude-sonnet-4-6")
    assert launcher.context_window(profile) == 65536  # from the profile
    env = launcher.claude_env(profile, "http://h:1", 65536)
    assert env["ANTHROPIC_DEFAULT_HAIKU_MODEL"] == "anyclaude-big"
    # Claude Code keeps ~13K tokens plus the output limit free before it compacts.
    assert env["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "8192"
    assert launcher.output_limit(profile, 16384) == 2048
    # It compacts by itself at 65536 - 13000 - 8192 tokens; it would at 1336 of 16384, every turn.
    assert "DISABLE_AUTO_COMPACT" not in env
    assert launcher.claude_env(profile, "http://h:1", 16384)["DISABLE_AUTO_COMPACT"] == "1"
    assert "DISABLE_AUTO_COMPACT" not in launcher.claude_env(profile, "http://h:1", 32768)
    assert env["API_TIMEOUT_MS"] == "1200500"
    assert env["CLAUDE_STREAM_IDLE_TIMEOUT_MS"] == "630000"  # outlasts the daemon's 600 s prefill budget


def test_context_window_from_the_daemon_else_small():
    profile = profiles.parse(TWO_MODELS.replace(b'"local-small"', b'"claude-haiku-4-5"'), Path("two.toml"))
    assert launcher.family_names(profile)["haiku"] == "claude-haiku-4-5"
    # small has no context_length: the smallest window wins, from /health, /v1/models, or the fallback.
    assert launcher.context_window(profile) == launcher.FALLBACK_CONTEXT
    assert launcher.context_window(profile, served={"anyclaude-small": 32768}) == 32768
    health = {"models": {"small": {"state": "ready", "context_length": 16384}}}
    assert launcher.context_window(profile, health, served={"anyclaude-small": 32768}) == 16384
    assert launcher.claude_env(profile, "http://h:1", 16384)["CLAUDE_CODE_MAX_OUTPUT_TOKENS"] == "2048"


def test_base_url_reaches_a_wildcard_bind_on_loopback():
    assert launcher.base_url(profiles.Server(host="0.0.0.0", port=9000)) == "http://127.0.0.1:9000"
    assert launcher.base_url(profiles.Server(), host="::1", port=9001) == "http://[::1]:9001"


def test_leading_options_are_ours_the_rest_are_claudes():
    split = launcher._split_args
    assert split(["-p", "hi"]) == ([], ["-p", "hi"])
    mixed = ["--profile", "quick", "--port=9", "-p", "hi", "--port", "3"]
    assert split(mixed) == (["--profile", "quick", "--port=9"], ["-p", "hi", "--port", "3"])
    assert split(["--port", "9", "--", "--profile", "x"]) == (["--port", "9"], ["--profile", "x"])
    assert split(["--resume"]) == ([], ["--resume"])


def test_env_command_prints_exports_and_the_same_as_settings(capsys):
    parser = argparse.ArgumentParser(prog="anyclaude")
    launcher.add_commands(parser.add_subparsers(dest="command", required=True))
    outputs, port = {}, str(free_port())  # nothing there: the environment comes from the profile alone
    for form in ("--shell", "--settings", None):
        args = parser.parse_args(["env", "--profile", "tiny", "--port", port, *([form] if form else [])])
        assert args.run(args) == 0
        outputs[form] = capsys.readouterr().out
    # The exports, run by a shell, give the environment the settings snippet gives.
    shell = subprocess.run(["sh", "-c", outputs["--shell"] + "env"], check=True, env={}, capture_output=True, text=True)
    exported = dict(line.split("=", 1) for line in shell.stdout.splitlines())
    settings = json.loads(outputs["--settings"])["env"]
    assert {key: exported.get(key) for key in settings} == settings
    assert settings["ANTHROPIC_DEFAULT_OPUS_MODEL"] == "anyclaude-smollm2"
    assert outputs[None].index(outputs["--shell"]) < outputs[None].index(outputs["--settings"])


# --- claude, for real ---------------------------------------------------------------------------


def test_claude_runs_against_the_running_daemon(daemon, stand_in):
    result = run_anyclaude("claude", "--port", str(daemon.port), "-p", "say hi", "--model", "opus", env=stand_in)
    assert result.returncode == 3, result.stderr  # claude's own exit code
    assert "started" not in result.stderr
    seen = record(stand_in)
    assert seen["argv"] == ["-p", "say hi", "--model", "opus"]
    env = seen["env"]
    assert env["ANTHROPIC_BASE_URL"] == daemon.url
    assert env["ANTHROPIC_AUTH_TOKEN"] == launcher.PLACEHOLDER_TOKEN
    assert "ANTHROPIC_API_KEY" not in env
    assert {env[f"ANTHROPIC_DEFAULT_{f}_MODEL"] for f in ("OPUS", "SONNET", "HAIKU")} == {"anyclaude-smollm2"}
    assert env["CLAUDE_CODE_ATTRIBUTION_HEADER"] == "0" and env["CLAUDE_CODE_DISABLE_NONESSENTIAL_TRAFFIC"] == "1"
    # The tiny profile sets no context_length: the window is the one the daemon serves.
    served = {m["id"]: m["max_input_tokens"] for m in seen["models"]["data"]}
    assert env["CLAUDE_CODE_MAX_CONTEXT_TOKENS"] == str(served["anyclaude-smollm2"])
    assert "CLAUDE_CODE_AUTO_COMPACT_WINDOW" not in env  # Claude Code clamps it to 100K
    assert env["API_TIMEOUT_MS"] == "600000"
    assert env["PATH"] == stand_in["PATH"]  # the rest of the environment passes through
    assert daemon.process.poll() is None


def test_claude_refuses_a_daemon_serving_another_profile(daemon, stand_in, tmp_path):
    other = profile_file(tmp_path, "other")
    result = run_anyclaude("claude", "--profile", str(other), "--port", str(daemon.port), "-p", "hi", env=stand_in)
    assert result.returncode == 1
    assert f"{daemon.url} serves profile 'tiny'" in result.stderr and "not 'other'" in result.stderr
    assert not Path(stand_in["CLAUDE_RECORD"]).exists()


def test_claude_not_installed(stand_in, tmp_path):
    env = dict(stand_in, PATH=str(tmp_path / "empty"))
    result = run_anyclaude("claude", "--port", str(free_port()), "-p", "hi", env=env)
    assert result.returncode == 127
    assert "`claude` is not on PATH" in result.stderr
    assert "started" not in result.stderr


def test_claude_starts_the_daemon_in_the_background_and_leaves_it_running(stand_in, tmp_path, tiny_model):
    port = free_port()
    profile = profile_file(tmp_path, "background", server={"port": port})
    pid = None
    try:
        result = run_anyclaude("claude", "--profile", str(profile), "--wait", "240", "-p", "hi", env=stand_in)
        if m := re.search(r"\(pid (\d+);", result.stderr):
            pid = int(m[1])
        assert result.returncode == 3, result.stderr
        assert f"started the daemon for profile background on http://127.0.0.1:{port}" in result.stderr
        assert record(stand_in)["env"]["ANTHROPIC_BASE_URL"] == f"http://127.0.0.1:{port}"
        # anyclaude has exited; the daemon it started still serves.
        health = request(port, "GET", "/health")
        assert health.status == 200 and health.json()["profile"] == "background"
        assert "listening on" in (tmp_path / "logs" / "daemon-background.log").read_text()

        stopped = run_anyclaude("stop", "--profile", str(profile), env=stand_in)
        assert stopped.returncode == 0 and f"stopped the daemon for profile background at http://127.0.0.1:{port}" in stopped.stderr
        with pytest.raises(OSError):
            request(port, "GET", "/health")
        again = run_anyclaude("stop", "--profile", str(profile), env=stand_in)
        assert again.returncode == 1 and "no daemon answers" in again.stderr
    finally:
        if pid and _alive(pid):
            _stop_group(pid, port)


def _stop_group(pid: int, port: int) -> None:
    """SIGTERM the daemon's process group (it has its own session), wait until it is gone."""
    os.killpg(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.2)
    if _alive(pid):
        os.killpg(pid, signal.SIGKILL)
    with pytest.raises(OSError):
        request(port, "GET", "/health")


def _alive(pid: int) -> bool:
    if Path("/proc/self").exists():  # a zombie (no parent reaps it in some containers) is gone
        try:
            return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
        except OSError:
            return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_stop_stops_a_worker_whose_serve_process_is_gone(tmp_path, model_cache, tiny_model):
    # The lifeline off, the worker of a SIGKILLed serve process serves on: stop finds it by
    # the worker_pid of /health.
    daemon = Daemon("tiny", model_cache, tmp_path / "daemon.log", env={"ANYCLAUDE_LIFELINE": "0"})
    worker = None
    try:
        daemon.wait_ready()
        health = request(daemon.port, "GET", "/health").json()
        pid, worker = health["pid"], health["worker_pid"]
        os.kill(pid, signal.SIGKILL)
        daemon.process.wait()
        assert request(daemon.port, "GET", "/health").json()["worker_pid"] == worker  # an orphan, serving

        stopped = run_anyclaude("stop", "--port", str(daemon.port), env=dict(os.environ))
        assert stopped.returncode == 0, stopped.stderr
        assert f"(worker pid {worker}; its serve process, pid {pid}, was gone)" in stopped.stderr
        assert not _alive(worker)
        with pytest.raises(OSError):
            request(daemon.port, "GET", "/health")
    finally:
        daemon.stop()
        if worker and _alive(worker):
            os.kill(worker, signal.SIGKILL)
