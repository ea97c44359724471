"""Running the daemon from tests and benchmarks: a subprocess on a free port, raw HTTP, profiles."""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Reply:
    def __init__(self, status: int, headers: dict[str, str], body: bytes):
        self.status, self.headers, self.body = status, headers, body

    def json(self):
        return json.loads(self.body)


def request(port: int, method: str, path: str, body: bytes | None = None, headers: dict | None = None) -> Reply:
    """A raw HTTP/1.1 exchange, to see exactly the bytes the daemon sends."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=300)
    try:
        conn.request(method, path, body=body, headers={"content-type": "application/json", **(headers or {})})
        response = conn.getresponse()
        return Reply(response.status, {k.lower(): v for k, v in response.getheaders()}, response.read())
    finally:
        conn.close()


class Daemon:
    """`anyclaude serve` in a subprocess; or, with `fake=True`, Granian serving the same app
    with a scripted engine (tests/fake_app.py) for fault injection."""

    def __init__(self, profile: str, cache: Path, log: Path, *, fake: bool = False, env: dict | None = None):
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = log
        self.requests = log.with_name("requests.jsonl")
        env = dict(os.environ, ANYCLAUDE_CACHE=str(cache), ANYCLAUDE_LOG=str(self.requests), PYTHONUNBUFFERED="1", **(env or {}))
        if fake:
            from anyclaude import profiles

            env.update(ANYCLAUDE_PROFILE=str(profiles.find(profile)), PYTHONPATH=str(REPO / "tests"))
            command = ["-m", "granian", "--interface", "asgi", "--http", "1", "--port", str(self.port), "--factory", "fake_app:create_app"]
        else:
            command = ["-m", "anyclaude", "serve", "--profile", profile, "--port", str(self.port)]
        self._out = open(log, "wb")
        self.process = subprocess.Popen([sys.executable, *command], cwd=REPO, env=env, stdout=self._out, stderr=subprocess.STDOUT)

    def wait_idle(self, timeout: float = 30) -> float:
        """Seconds until no engine runs or waits (read from /health, which reports exactly that)."""
        started = time.monotonic()
        while time.monotonic() - started < timeout:
            models = request(self.port, "GET", "/health").json()["models"].values()
            if not any(m["running"] or m["waiting"] for m in models):
                return time.monotonic() - started
        raise TimeoutError(f"engine still busy after {timeout}s")

    def records(self) -> list[dict]:
        """The request log's requests (not its events: reloads, cache evictions)."""
        return [r for r in self.lines() if "request_id" in r]

    def events(self) -> list[dict]:
        return [r for r in self.lines() if "event" in r]

    def lines(self) -> list[dict]:
        if not self.requests.exists():
            return []
        return [json.loads(line) for line in self.requests.read_text().splitlines()]

    def wait_ready(self, timeout: float = 300) -> None:
        # Polls /health, the readiness signal the daemon exposes for exactly this.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"daemon exited with {self.process.returncode}:\n{self.output()}")
            try:
                if request(self.port, "GET", "/health").status == 200:
                    return
            except OSError:
                pass
            time.sleep(0.2)
        raise TimeoutError(f"daemon not ready after {timeout}s:\n{self.output()}")

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        try:
            return self.process.wait(timeout=30)
        finally:
            self._out.close()


def serving(directory: Path, cache: Path, name: str, /, **sections):
    """A daemon on a copy of the tiny profile with `sections` changed, ready, and stopped
    (cleanly, or the caller hears of it) once the generator is closed: for fixtures.
    (Positional parameters: a `cache` section is one of `sections`.)"""
    daemon = Daemon(str(profile_file(directory, name, **sections)), cache, directory / "daemon.log")
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        assert daemon.stop() == 0, daemon.output()


def profile_file(directory: Path, name: str, **sections) -> Path:
    """A copy of the tiny profile with some keys changed: profile_file(d, "x", timeouts={"idle": 1})."""
    import tomllib

    import tomli_w

    from anyclaude import profiles

    data = tomllib.loads(profiles.find("tiny").read_text())
    for section, values in sections.items():
        data.setdefault(section, {}).update(values)
    path = directory / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def from_tests(name: str):
    """A module of tests/ (model builders, architectures' arguments), loaded by its path:
    a bench script's own folder comes first on sys.path, and may hold a file of that name."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(f"tests_{name}", Path(__file__).resolve().parent.parent / "tests" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module
