"""`anyclaude status` against the real daemon, and `anyclaude doctor`'s verdicts."""

from __future__ import annotations

import argparse
import os
import socket
import sys

import pytest

from anyclaude import doctor, profiles
from bench.harness import free_port, profile_file


def run(*argv: str) -> int:
    parser = argparse.ArgumentParser(prog="anyclaude")
    doctor.add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    return args.run(args)


def verdicts(output: str) -> dict[str, tuple[str, str]]:
    """doctor's lines by subject: (verdict, detail)."""
    lines = [line.split(None, 1) for line in output.splitlines()]
    found = {}
    for verdict, rest in lines:
        subject = "log dir" if rest.startswith("log dir") else rest.split()[0]
        found[subject] = (verdict, rest[len(subject) :].strip())
    return found


@pytest.fixture
def stand_in_claude(tmp_path, monkeypatch):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    claude = bin_dir / "claude"
    claude.write_text(f"#!{sys.executable}\nprint('2.1.197 (Claude Code)')\n")
    claude.chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setenv("ANYCLAUDE_LOG", str(tmp_path / "logs" / "requests.jsonl"))
    return claude


# --- status --------------------------------------------------------------------------------


def test_status_of_the_running_daemon(daemon, capsys):
    daemon.wait_idle()
    assert run("status", "--port", str(daemon.port)) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"daemon    up at {daemon.url}, ready"
    assert lines[1].startswith("profile   tiny (") and lines[1].endswith("profiles/tiny.toml)")
    assert lines[2].startswith("model     smollm2: ready (loaded")
    assert "queue     smollm2: 0 running, 0 waiting" in lines
    assert any(line.startswith("cache     smollm2: ") for line in lines)
    assert any(line.startswith("reload    last error: ") for line in lines)
    assert lines[-1] == f"log       {daemon.requests}"


def test_status_when_nothing_runs(capsys):
    port = free_port()
    assert run("status", "--port", str(port)) == 1
    assert capsys.readouterr().out == f"daemon    down: nothing answers at http://127.0.0.1:{port}\n"


def test_status_shows_a_dash_for_what_health_does_not_report():
    lines = doctor.status_lines("http://h:1", {"status": "loading", "profile": "x", "models": {"m": {"state": "loading"}}})
    assert lines == [
        "daemon    up at http://h:1, loading",
        "profile   x (-)",
        "model     m: loading (not loaded yet)",
        "queue     m: - running, - waiting",
        "cache     m: -",
        "reload    last error: -",
        "log       -",
    ]


def test_status_shows_cache_context_and_reload_error_when_reported():
    health = {
        "status": "ready",
        "profile": "x",
        "models": {"m": {"state": "ready", "running": True, "waiting": 2, "cache_bytes": 3 * 1024**2, "context_length": 8192}},
        "reload_error": "x.toml: models.m.path: required key missing",
    }
    lines = doctor.status_lines("http://h:1", health)
    assert "model     m: ready (loaded, 8192 tokens of context)" in lines
    assert "queue     m: 1 running, 2 waiting" in lines
    assert "cache     m: 3.0 MB" in lines
    assert "reload    last error: x.toml: models.m.path: required key missing" in lines
    assert "reload    last error: none" in doctor.status_lines("http://h:1", dict(health, reload_error=None))


# --- doctor --------------------------------------------------------------------------------


def test_doctor_on_a_machine_that_can_run_the_tiny_profile(stand_in_claude, tiny_model, tmp_path, capsys):
    port = free_port()
    assert run("doctor", "--profile", "tiny", "--port", str(port)) == 0
    found = verdicts(capsys.readouterr().out)
    assert list(found) == ["profile", "device", "memory", "model", "kv", "fits", "port", "claude", "log dir"]
    assert found["profile"][0] == "ok"
    import mlx.core as mx

    verdict, word = ("ok", "Metal") if mx.metal.is_available() else ("warn", "CPU only")
    assert found["device"][0] == verdict and word in found["device"][1]
    assert found["memory"][0] == "ok" and "of" in found["memory"][1]
    assert found["model"][0] == "ok" and "smollm2: on disk" in found["model"][1]
    # 30 layers of 3 KV heads of 64: float32 when dequantized on a CPU, else 16 bits.
    size, dtype = ("45.0 KB", "float32") if found["kv"][1].endswith("float32)") else ("22.5 KB", "float16")
    assert found["kv"] == ("ok", f"smollm2: {size} per token (30 attention layers x 3 KV heads x 64, keys and values in {dtype})")
    assert found["fits"][0] == "ok" and "([cache] max_gb)" in found["fits"][1] and "8,192-token window" in found["fits"][1]
    assert found["port"] == ("ok", f"127.0.0.1:{port} is free")
    assert found["claude"] == ("ok", f"2.1.197 (Claude Code) ({stand_in_claude})")
    assert found["log dir"][0] == "ok" and str(tmp_path / "logs") in found["log dir"][1]


def test_doctor_finds_the_daemon_on_its_port(daemon, stand_in_claude, capsys):
    run("doctor", "--port", str(daemon.port))
    port = verdicts(capsys.readouterr().out)["port"]
    assert port == ("ok", f"127.0.0.1:{daemon.port}: the daemon for this profile is already running there")


def test_doctor_fails_what_cannot_work(stand_in_claude, tmp_path, capsys, monkeypatch):
    not_a_dir = tmp_path / "file"
    not_a_dir.write_text("")
    profile = profile_file(
        tmp_path,
        "broken",
        models={"smollm2": {"path": str(tmp_path / "missing.gguf")}, "hub": {"path": "anyclaude-tests/not-downloaded"}},
        log={"path": str(not_a_dir / "logs" / "requests.jsonl")},
    )
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert run("doctor", "--profile", str(profile), "--port", str(port)) == 1
    out = capsys.readouterr().out
    lines = [line.split(None, 2) for line in out.splitlines()]
    by_detail = {(verdict, detail.split(":")[0]): detail for verdict, _, detail in lines}
    assert ("FAIL", "smollm2") in by_detail and "model file not found" in by_detail["FAIL", "smollm2"]
    assert ("warn", "hub") in by_detail and "not downloaded yet" in by_detail["warn", "hub"]
    assert [line[0] for line in lines if line[1] == "memory"] == ["skip"]
    taken_line = f"127.0.0.1:{port} is taken by another program (Address already in use); set [server] port or pass --port"
    assert [(v, d) for v, s, d in lines if s == "port"] == [("FAIL", taken_line)]
    assert [v for v, s, _ in lines if s == "claude"] == ["warn"]
    assert f"FAIL  log dir  {not_a_dir / 'logs'} cannot be created: {not_a_dir} is not a directory" in out


QWEN3_4B = {  # Qwen3-4B-Instruct-2507's config.json, the keys that size its KV cache
    "model_type": "qwen3", "num_hidden_layers": 36, "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 128,
    "hidden_size": 2560, "max_position_embeddings": 262144, "torch_dtype": "bfloat16", "quantization": {"group_size": 64, "bits": 4},
}  # fmt: skip


@pytest.mark.parametrize("max_gb, verdict, holds", [(4, "FAIL", "29,127 tokens, less than a request filling the 65,536-token window (9.0 GB)"),
                                                    (16, "ok", "116,508 tokens: a request filling the 65,536-token window (9.0 GB) and 4 checkpoints of Claude Code's 12K-token prefix (1.6 GB) beside it")])
def test_doctor_sizes_the_kv_cache_of_the_profile_s_model(tmp_path, max_gb, verdict, holds):
    import json

    model = tmp_path / "qwen3-4b"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(QWEN3_4B))
    (model / "model.safetensors").write_bytes(b"\0" * 1000)
    profile = profile_file(tmp_path, "q", models={"smollm2": {"path": str(model), "context_length": 65536}}, cache={"max_gb": max_gb}, engine={"cpu_dequantize": False})
    checks = {subject: (v, detail) for v, subject, detail in doctor.check_kv(profiles.load(str(profile)))}
    assert checks["kv"] == ("ok", "smollm2: 144.0 KB per token (36 attention layers x 8 KV heads x 128, keys and values in bfloat16)")
    assert checks["fits"] == (verdict, f"smollm2: KV budget {max_gb:.1f} GB ([cache] max_gb), {holds}" + (": lower context_length, set [engine] kv_bits, or raise [cache] max_gb" if verdict == "FAIL" else ""))


def test_doctor_names_a_profile_that_does_not_load(capsys):
    assert run("doctor", "--profile", "no-such-profile") == 1
    assert capsys.readouterr().out.startswith("FAIL  profile  profile 'no-such-profile' not found")


def test_a_repo_in_the_hugging_face_cache_is_found_as_the_daemon_finds_it(tmp_path, monkeypatch):
    import huggingface_hub.constants

    from anyclaude import models

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    repo = tmp_path / "models--anyclaude-tests--cached"
    revision = "0" * 40
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(revision)
    (repo / "blobs").mkdir()
    snapshot = repo / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name, blob, size in (("config.json", "c" * 40, 20), ("model.safetensors", "w" * 40, 1000)):
        (repo / "blobs" / blob).write_bytes(b"x" * size)
        (snapshot / name).symlink_to(repo / "blobs" / blob)
    (repo / "blobs" / "old-revision").write_bytes(b"x" * 5000)  # not part of the snapshot
    assert models.model_files("anyclaude-tests/cached", tmp_path) == (snapshot, True)
    assert models.size_on_disk(profiles.Model(path="anyclaude-tests/cached"), tmp_path) == 1020
    assert models.download("anyclaude-tests/cached") == snapshot  # what the daemon loads, offline
    assert models.model_files("anyclaude-tests/elsewhere", tmp_path) == (None, True)
