"""The newest Claude Code from the npm registry, run through `anyclaude claude` against the
real daemon: the window it believes in, and a print-mode turn as a user runs one; and
against the scripted engine (tests/fake_app.py), an agent loop: a prompt, a Read call,
its result, an answer (the tiny model never calls a tool).

Installed once per session with npm (Node.js and the npm registry are on CI's machines);
skipped where npm is missing. The version that ran is printed in the test summary."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from bench.harness import Daemon, profile_file

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
    # Claude Code's own compaction would keep 13K tokens free, more than the window: it is off.
    assert "Compact buffer" in result.stdout and "Autocompact buffer" not in result.stdout, result.stdout[:1000]


def test_a_print_mode_turn_streams_to_its_end(daemon, claude_bin, tmp_path):
    before = len(daemon.records())
    result = claude(daemon, claude_bin, tmp_path, "-p", "--bare", "--system-prompt", "Be brief.", "--tools", "Read", "--", "Say hi.")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    turns = [r for r in daemon.records()[before:] if r["path"] == "/v1/messages"]
    assert turns and all(r["outcome"] in ("complete", "max_tokens") and r["ended"] == "message_stop" for r in turns), turns
    assert {(r["model"], r["resolved_model"]) for r in turns} == {("anyclaude-smollm2", "smollm2")}
    # An answer may run to max_tokens; Claude Code then asks again, and never compacts the
    # tiny model's window by itself (before the launcher said not to, it did on most turns).
    assert {r.get("request_class") for r in turns} == {"main"}, [r.get("request_class") for r in turns]


@pytest.fixture(scope="module")
def scripted(tmp_path_factory, model_cache, tiny_model):
    """The real app and Granian with the scripted engine, logging bodies; and its profile."""
    directory = tmp_path_factory.mktemp("scripted")
    profile = profile_file(directory, "agentloop", log={"bodies": True})
    d = Daemon(str(profile), model_cache, directory / "daemon.log", fake=True, env={"FAKE_TOKENIZER_DIR": str(tiny_model)})
    try:
        d.wait_ready()
        yield d, profile
    finally:
        assert d.stop() == 0, d.output()


def test_an_agent_loop_reads_a_file_and_answers_from_it(scripted, claude_bin, tmp_path):
    daemon, profile = scripted
    secret = f"plum-{uuid.uuid4().hex[:12]}"  # in the file only: not in the prompt, not in the script
    notes = tmp_path / "notes.txt"
    notes.write_text(f"The code word is {secret}.\n")
    before = len(daemon.records())
    ask = f"SCRIPT:read-file {notes} What is the code word in that file?"
    # Claude Code 2.1.332 reads a file of its working directory unasked; --allowedTools says so anyway.
    result = claude(
        daemon, claude_bin, tmp_path, "--profile", str(profile), "--",
        "-p", "--bare", "--system-prompt", "Be brief.", "--tools", "Read", "--allowedTools", "Read", "--output-format", "json", "--", ask,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert answer["is_error"] is False and secret in answer["result"], answer
    assert answer["num_turns"] >= 2, answer

    turns = [r for r in daemon.records()[before:] if r["path"] == "/v1/messages" and r.get("request_class") == "main"]
    assert len(turns) == 2, [(r.get("request_class"), r.get("stop_reason")) for r in daemon.records()[before:]]
    call, reply = turns
    # What `anyclaude claude` set is what Claude Code ran with: the model id, the output limit
    # (the tiny model's 256, not Claude Code's own), the hint header that says "main".
    assert {r["model"] for r in turns} == {"anyclaude-smollm2"} and {r["resolved_model"] for r in turns} == {"smollm2"}
    assert {r["request"]["max_tokens"] for r in turns} == {256}
    assert [t["name"] for t in call["request"]["tools"]] == ["Read"]
    # The first ends with the model's call to Read (the log keeps the streamed answer put
    # together); the second sends it back as Claude Code took it from the stream, then the
    # call's result: the file, as Claude Code's Read tool gave it.
    assert call["stop_reason"] == "tool_use" and call["ended"] == "message_stop", call
    (sent,) = [b for b in call["response"]["content"] if b["type"] == "tool_use"]
    said, last = reply["request"]["messages"][-2:]
    (use,) = [b for b in said["content"] if b["type"] == "tool_use"]
    assert said["role"] == "assistant" and use["name"] == "Read" and use["input"] == {"file_path": str(notes)}, said
    assert (sent["id"], sent["name"], sent["input"]) == (use["id"], use["name"], use["input"]), sent
    assert secret in "".join(b.get("text", "") for b in reply["response"]["content"]), reply["response"]
    (done,) = [b for b in last["content"] if b.get("type") == "tool_result"]
    assert done["tool_use_id"] == use["id"] and not done.get("is_error"), done
    assert secret in json.dumps(done["content"]), done
    assert reply["stop_reason"] == "end_turn" and reply["ended"] == "message_stop", reply
