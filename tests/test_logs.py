"""The request log: lines, rotation, stats and tail; and disconnects recorded as cancelled."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading

import pytest

from anyclaude import logs
from bench.harness import REPO


def test_concurrent_writers_leave_whole_lines_and_rotation_keeps_three(tmp_path):
    log = logs.RequestLog(tmp_path / "requests.jsonl", max_bytes=20_000)

    def write(worker: int) -> None:
        for i in range(200):
            log.write(logs.Record(ts=logs.now(), request_id=f"req_{worker}_{i}", outcome="complete", error="x" * (i % 50)))

    threads = [threading.Thread(target=write, args=(w,)) for w in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    files = sorted(tmp_path.iterdir())
    assert [f.name for f in files] == ["requests.jsonl", "requests.jsonl.1", "requests.jsonl.2", "requests.jsonl.3"]
    assert all(f.stat().st_size <= 20_000 for f in files)
    for f in files:
        for line in f.read_bytes().splitlines():
            assert json.loads(line)["outcome"] == "complete"
    records = logs.read(tmp_path / "requests.jsonl")
    assert len({r["request_id"] for r in records}) == len(records) > 100


def test_stats_count_truncation_and_percentiles(tmp_path):
    path = tmp_path / "requests.jsonl"
    rows = [
        {"outcome": "complete", "stream": True, "ended": "message_stop", "ttft_s": 1.0, "decode_tps": 10, "prompt_tokens": 100, "cached_tokens": 50},
        {"outcome": "timeout_first_token", "stream": True, "ended": "error", "prompt_tokens": 100, "cached_tokens": 0},
        {"outcome": "cancelled", "stream": True, "ended": "content_block_delta", "ttft_s": 3.0},
        {"outcome": "complete", "stream": True, "ended": "content_block_delta", "ttft_s": 2.0},  # cut off by the server
        {"outcome": "complete", "stream": False, "ttft_s": 4.0, "decode_tps": 20},
    ]
    path.write_text("".join(json.dumps({"ts": logs.now(), "request_id": f"req_{i}", "path": "/v1/messages", "status": 200, **r}) + "\n" for i, r in enumerate(rows)) + "{broken\n")
    figures = logs.stats(logs.read(path))
    assert figures["requests"] == 5 and figures["streams"] == 4
    assert figures["truncated"] == 1 and figures["truncation_rate"] == 0.25
    assert figures["outcomes"] == {"complete": 3, "timeout_first_token": 1, "cancelled": 1}
    assert (figures["ttft_p50_s"], figures["ttft_p95_s"]) == (3.0, 4.0)
    assert figures["cache_hit_ratio"] == 0.25
    out = subprocess.run([sys.executable, "-m", "anyclaude", "logs", "stats", "--file", str(path)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0 and "truncated         1 (25.00%)" in out.stdout


def test_stats_count_how_each_request_was_served_beside_the_token_ratio(tmp_path):
    # A 20K checkpoint reused every turn, the conversation after it prefilled again: the
    # token ratio reads high, the count per request says what happened.
    base = {"path": "/v1/messages", "status": 200, "outcome": "complete", "checkpoint_tokens": 20000}
    rows = [
        {"prompt_tokens": 30000, "cached_tokens": 0},  # cold
        {"prompt_tokens": 30000, "cached_tokens": 20000, "cache_source": "checkpoint"},
        {"prompt_tokens": 30000, "cached_tokens": 20000, "cache_source": "conversation"},  # shares the prefix only
        {"prompt_tokens": 30500, "cached_tokens": 29999, "cache_source": "conversation"},
        {"prompt_tokens": 30000, "cached_tokens": 9, "cache_source": "conversation"},  # the template's first tokens
        {"prompt_tokens": 30000, "outcome": "overloaded", "status": 529},  # never prefilled
    ]
    records = [{"ts": logs.now(), "request_id": f"req_{i}", **base, **r} for i, r in enumerate(rows)]
    figures = logs.stats(records)
    assert figures["served"] == {"conversation": 1, "checkpoint": 2, "cold": 2}
    assert round(figures["cache_hit_ratio"], 2) == 0.39
    text = logs.format_stats(figures)
    assert "  conversation reused   1 (20% of requests)" in text and "  cold                  2 (40% of requests)" in text
    evict = {"ts": logs.now(), "event": "cache.evict", "model": "m", "entry": {"kind": "conversation", "tokens": 25000, "reason": "live", "kept": 20000}}
    assert logs.format_record(evict).endswith("cache.evict  m  conversation of 25000 tokens (live, cut back to 20000)")


def test_tail_follows_appends_and_rotation(tmp_path):
    path = tmp_path / "requests.jsonl"
    log = logs.RequestLog(path, max_bytes=400)
    stop = threading.Event()
    seen: list[str] = []
    got = threading.Condition()

    def follow():
        for record in logs.follow(path, stop=stop):
            with got:
                seen.append(record["request_id"])
                got.notify_all()

    thread = threading.Thread(target=follow)
    thread.start()
    try:
        for i in range(6):  # 6 records of ~130 bytes: rotates at least once
            log.write(logs.Record(ts=logs.now(), request_id=f"req_{i}", outcome="complete", error="y" * 40))
            with got:
                assert got.wait_for(lambda: len(seen) == i + 1, timeout=10), seen
    finally:
        stop.set()
        thread.join(timeout=10)
    assert seen == [f"req_{i}" for i in range(6)]
    assert path.with_name("requests.jsonl.1").exists()


def test_a_client_that_goes_away_is_logged_cancelled_and_frees_the_engine(daemon):
    body = json.dumps({"model": "claude-opus-4-8", "max_tokens": 500, "stream": True, "messages": [{"role": "user", "content": "Write a very long story."}]}).encode()
    with socket.create_connection(("127.0.0.1", daemon.port)) as s:
        s.sendall(b"POST /v1/messages HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(body) + body)
        received = b""
        while b"text_delta" not in received:
            received += s.recv(4096)
        request_id = [l for l in received.split(b"\r\n") if l.lower().startswith(b"request-id:")][0].split(b":")[1].strip().decode()
    # Gone: the engine stops within one decode step.
    assert daemon.wait_idle(timeout=10) < 5
    (record,) = [r for r in daemon.records() if r["request_id"] == request_id]
    assert record["outcome"] == "cancelled" and record["output_tokens"] < 500
    assert record["cache_store"] == "stored"  # what it computed is kept, and its line says so


# Run in a child, because a file size limit is per process: a record written whole, one
# that crosses the limit (a short write, then EFBIG, as a full disk gives a short write
# then ENOSPC), one that fits beneath it, and one after the limit is lifted.
FULL_DISK = """
import json, resource, signal, sys
from pathlib import Path
from anyclaude import logs

log = logs.RequestLog(Path(sys.argv[1]))
def record(name, size):
    return logs.Record(ts=logs.now(), request_id=name, outcome="complete", error="x" * size)
def attempt(name, size):
    try:
        log.write(record(name, size))
        return None
    except OSError:
        return log.error

report = {"before": attempt("req_before", 10)}
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of being killed
soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
resource.setrlimit(resource.RLIMIT_FSIZE, (log.path.stat().st_size + 100, hard))
report["crossing"] = attempt("req_crossing", 1000)
report["beneath"] = attempt("req_beneath", 1)
report["error_after_beneath"] = log.error
resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
report["after"] = attempt("req_after", 1000)
report["error_after"] = log.error
print(json.dumps(report))
"""


def test_a_line_that_does_not_fit_is_cut_back_out_and_the_error_kept_until_a_write_succeeds(tmp_path):
    path = tmp_path / "requests.jsonl"
    out = subprocess.run([sys.executable, "-c", FULL_DISK, str(path)], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["before"] is None
    assert report["crossing"] == f"cannot write the request log {path}: [Errno 27] File too large"
    assert report["beneath"] is None and report["error_after_beneath"] is None
    assert report["after"] is None and report["error_after"] is None
    lines = path.read_bytes().split(b"\n")
    assert lines[-1] == b""  # ends with a whole line
    assert [json.loads(line)["request_id"] for line in lines[:-1]] == ["req_before", "req_beneath", "req_after"]


@pytest.mark.parametrize("cause", ["read-only folder", "folder is a file"])
def test_a_log_that_cannot_be_written_says_why_in_status(tmp_path, cause):
    from anyclaude import doctor

    folder = tmp_path / "logs"
    if cause == "read-only folder":
        if os.geteuid() == 0:
            pytest.skip("root ignores permissions")
        folder.mkdir(mode=0o500)  # mkdir succeeds (it is there), open fails
    else:
        folder.write_text("not a folder")  # mkdir fails
    log = logs.RequestLog(folder / "requests.jsonl")
    record = logs.Record(ts=logs.now(), request_id="req_1", outcome="complete")
    with pytest.raises(OSError):
        log.write(record)
    assert log.error is not None and log.error.startswith(f"cannot write the request log {log.path}: [Errno ")
    assert f"log       last error: {log.error}" in doctor.status_lines("http://h:1", {"log": str(log.path), "log_error": log.error})

    folder.chmod(0o700) if folder.is_dir() else folder.unlink()  # put right: the next write clears it
    log.write(record)
    assert log.error is None
    assert doctor.status_lines("http://h:1", {"log": str(log.path), "log_error": None})[-1] == f"log       {log.path}"
    assert [r["request_id"] for r in logs.read(log.path)] == ["req_1"]
