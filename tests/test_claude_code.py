"""The newest Claude Code from the npm registry, run through `anyclaude claude` against the
real daemon: the window it believes in, and a print-mode turn as a user runs one.

Installed once per session with npm (Node.js and the npm registry are on CI's machines);
skipped where npm is missing. The version that ran is printed in the test summary."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

PACKAGE = "@anthropic-ai/claude-code@latest"


@pytest.fixture(scope="session")
def claude_bin(tmp_path_factory, report) -> Path:
    npm = shutil.which("npm")
    if npm is None:
        pytest.skip("npm is not installed: Claude Code cannot be fetched")
    prefix = tmp_path_factory.mktemp("claude-code")
    subprocess.run([npm, "install", "--prefix", str(prefix), "--no-audit", "--no-fund", "--loglevel=error", PACKAGE], check=True, timeout=600, capture_output=True)
    bin_dir = prefix / "node_modules" / ".bin"
    version = subprocess.run([str(bin_dir / "claude"), "--version"], check=True, capture_output=True, text=True, timeout=60).stdout.strip()
    report.append(f"Claude Code from npm: {version}")
    return bin_dir


def claude(daemon, claude_bin: Path, home: Path, *argv: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PATH=f"{claude_bin}{os.pathsep}{os.environ['PATH']}", HOME=str(home))
    env.pop("ANTHROPIC_API_KEY", None)
    command = [sys.executable, "-m", "anyclaude", "claude", "--port", str(daemon.port), *argv]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=600, cwd=home)


def test_claude_code_takes_the_model_s_window(daemon, claude_bin, tmp_path):
    result = claude(daemon, claude_bin, tmp_path, "-p", "/context")
    assert result.returncode == 0, result.stderr
    # The tiny model's 8,192 tokens, not the 100K Claude Code assumes for claude-* ids.
    assert re.search(r"\*\*Tokens:\*\* [\d.]+k / 8\.2k", result.stdout), result.stdout[:500]
    assert "anyclaude-smollm2" in result.stdout and "doesn't recognize" not in result.stderr


def test_a_print_mode_turn_streams_to_its_end(daemon, claude_bin, tmp_path):
    before = len(daemon.records())
    result = claude(daemon, claude_bin, tmp_path, "-p", "--bare", "--system-prompt", "Be brief.", "--tools", "Read", "--", "Say hi.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    turns = [r for r in daemon.records()[before:] if r["path"] == "/v1/messages"]
    assert turns and all(r["outcome"] in ("complete", "max_tokens") and r["ended"] == "message_stop" for r in turns), turns
    assert {(r["model"], r["resolved_model"]) for r in turns} == {("anyclaude-smollm2", "smollm2")}
    # An answer Claude Code samples may run to max_tokens; it then compacts and asks again.
    classes = [r.get("request_class") for r in turns]
    assert "main" in classes and set(classes) <= {"main", "compaction"}, classes
