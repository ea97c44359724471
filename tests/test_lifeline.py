"""The worker of `anyclaude serve` ends when the serve process dies, even by SIGKILL."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

import pytest
import sse_grammar
from test_launcher import _alive

from anyclaude import lifeline
from bench.harness import Daemon, request

LONG = {
    "model": "claude-haiku-4-5",
    "max_tokens": 2000,
    "stream": True,
    "messages": [{"role": "user", "content": "Count from 1 to 1000, one number per line."}],
}


def test_the_worker_ends_when_the_serve_process_is_killed(tmp_path, model_cache, tiny_model):
    daemon = Daemon("tiny", model_cache, tmp_path / "daemon.log")
    worker = None
    conn = http.client.HTTPConnection("127.0.0.1", daemon.port, timeout=120)
    try:
        daemon.wait_ready()
        health = request(daemon.port, "GET", "/health").json()
        pid, worker = health["pid"], health["worker_pid"]
        assert pid == daemon.process.pid != worker  # the exec for OpenBLAS keeps the pid

        conn.request("POST", "/v1/messages", body=json.dumps(LONG), headers={"content-type": "application/json"})
        stream = conn.getresponse()
        body = b""
        while b"content_block_delta" not in body:  # generating
            line = stream.readline()
            assert line, f"the stream ended before any text: {body!r}"
            body += line
        os.kill(pid, signal.SIGKILL)  # no chance to stop its worker
        daemon.process.wait()

        # The worker stops as on SIGTERM: the stream in hand ends with an error event, not cut.
        events = sse_grammar.check(body + stream.read())
        assert events[-1]["type"] == "error" and "stopping" in events[-1]["error"]["message"]
        assert _gone(worker, within=60), f"the worker (pid {worker}) still runs:\n{daemon.output()}"
        with pytest.raises(OSError):
            request(daemon.port, "GET", "/health")
        assert f"the serve process (pid {pid}) is gone" in daemon.output()
    finally:
        conn.close()
        daemon.stop()
        if worker and _alive(worker):
            os.kill(worker, signal.SIGKILL)


def test_nothing_to_watch_outside_the_worker(monkeypatch):
    # As the tests run the app: in this process, with no serve process (or as it).
    before = threading.active_count()
    monkeypatch.delenv("ANYCLAUDE_PID", raising=False)
    lifeline.watch_parent()
    monkeypatch.setenv("ANYCLAUDE_PID", str(os.getpid()))
    lifeline.watch_parent()
    assert threading.active_count() == before


def _gone(pid: int, within: float) -> bool:
    deadline = time.monotonic() + within
    while _alive(pid):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True
