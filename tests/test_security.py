"""Safe by default: loopback unless a token is set, tokens checked, bodies bounded."""

from __future__ import annotations

import json
import subprocess
import sys

import anthropic
import pytest

from bench.harness import REPO, Daemon, profile_file, request

BODY = json.dumps({"model": "claude-opus-4-8", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}).encode()


def test_a_public_address_without_a_token_is_refused(tmp_path):
    path = profile_file(tmp_path, "open")
    out = subprocess.run(
        [sys.executable, "-m", "anyclaude", "serve", "--profile", str(path), "--host", "0.0.0.0"],
        capture_output=True, text=True, cwd=REPO, timeout=60,
    )  # fmt: skip
    assert out.returncode == 2 and "refusing to listen on 0.0.0.0 without an auth token" in out.stderr


@pytest.fixture(scope="module")
def guarded(tmp_path_factory, model_cache, tiny_model):
    directory = tmp_path_factory.mktemp("guarded")
    path = profile_file(directory, "guarded", server={"auth_token": "s3cret-token", "max_body_mb": 1})
    daemon = Daemon(str(path), model_cache, directory / "daemon.log")
    try:
        daemon.wait_ready()
        yield daemon
    finally:
        daemon.stop()


@pytest.mark.parametrize(
    ("headers", "status"),
    [({}, 401), ({"x-api-key": "wrong"}, 401), ({"authorization": "Bearer wrong"}, 401), ({"x-api-key": "s3cret-token"}, 200), ({"authorization": "Bearer s3cret-token"}, 200)],
    ids=["none", "wrong-key", "wrong-bearer", "key", "bearer"],
)
def test_requests_need_the_token(guarded, headers, status):
    reply = request(guarded.port, "POST", "/v1/messages", BODY, headers)
    assert reply.status == status
    if status == 401:
        assert reply.json()["error"]["type"] == "authentication_error"
    assert request(guarded.port, "GET", "/health").status == 200  # probes need no token


def test_the_sdk_with_the_token_works_and_without_it_gets_401(guarded):
    good = anthropic.Anthropic(base_url=guarded.url, api_key="s3cret-token", max_retries=0)
    assert good.models.list().data
    with pytest.raises(anthropic.AuthenticationError):
        anthropic.Anthropic(base_url=guarded.url, api_key="nope", max_retries=0).models.list()


def test_the_body_limit_comes_from_the_profile(guarded):
    reply = request(guarded.port, "POST", "/v1/messages", b"x" * (2 * 1024 * 1024), {"x-api-key": "s3cret-token"})
    assert reply.status == 413 and reply.json()["error"]["type"] == "request_too_large"


@pytest.mark.parametrize("exposed", [True, False])
def test_a_reload_keeps_the_token_of_a_daemon_beyond_loopback(tmp_path, exposed):
    import asyncio

    from anyclaude import profiles
    from anyclaude.server import Server

    log = {"path": str(tmp_path / "requests.jsonl")}  # not the user's own log
    path = profile_file(tmp_path, "exposed", server={"auth_token": "s3cret-token"}, log=log)
    server = Server(profiles.load(str(path)), make_engine=lambda *a: None, exposed=exposed)
    profile_file(tmp_path, "exposed", server={"auth_token": ""}, log=log)  # the token removed
    asyncio.run(server.reload())
    if exposed:
        assert "server.auth_token" in server.reload_error
        assert server.profile.server.auth_token == "s3cret-token"
    else:
        assert server.reload_error is None and not server.profile.server.auth_token
