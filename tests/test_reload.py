"""Hot reload against the real daemon: edits apply, mistakes are shown and harm nothing."""

from __future__ import annotations

import json
import shutil
import threading
import time
import tomllib
from pathlib import Path

import anthropic
import pytest

from anyclaude import profiles
from bench.harness import Daemon, profile_file, request
from sse_grammar import check


def health(daemon) -> dict:
    return request(daemon.port, "GET", "/health").json()


def until(daemon, condition, timeout: float = 60) -> dict:
    """Poll /health (the daemon's own report of what is in effect) until `condition` holds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = health(daemon)
        if condition(state):
            return state
    raise TimeoutError(f"/health never satisfied the condition: {state}")


class Traffic(threading.Thread):
    """A client streaming small requests back to back, counting any that fail."""

    def __init__(self, daemon):
        super().__init__()
        self.daemon, self.stop, self.done, self.failures = daemon, threading.Event(), 0, []

    def run(self):
        body = json.dumps({"model": "claude-opus-4-8", "max_tokens": 2, "stream": True, "messages": [{"role": "user", "content": "Hi"}]}).encode()
        while not self.stop.is_set():
            reply = request(self.daemon.port, "POST", "/v1/messages", body)
            try:
                assert reply.status == 200, reply.body
                assert check(reply.body)[-1]["type"] == "message_stop"
                self.done += 1
            except AssertionError as exc:
                self.failures.append(str(exc))


def test_edits_apply_and_broken_edits_are_reported_while_a_client_streams(tmp_path, model_cache, tiny_model):
    path = profile_file(tmp_path, "live")
    daemon = Daemon(str(path), model_cache, tmp_path / "daemon.log")
    traffic = Traffic(daemon)
    try:
        daemon.wait_ready()
        first = health(daemon)["revision"]
        # Not set in the profile: the CPU's prefill step; no wired limit off Metal.
        assert health(daemon)["models"]["smollm2"]["prefill_step"] == 512
        assert health(daemon)["models"]["smollm2"]["wired_limit_bytes"] is None
        traffic.start()

        data = tomllib.loads(path.read_text())
        data["sampling"]["temperature"] = 0.5
        data["timeouts"]["idle"] = 25
        data.setdefault("cache", {})["max_gb"] = 0.5
        data.setdefault("engine", {})["prefill_step"] = 300
        profiles.write(path, data)  # temporary file, then rename: as editors save
        state = until(daemon, lambda h: h["revision"] != first)
        assert state["sampling"]["temperature"] == 0.5 and state["timeouts"]["idle"] == 25
        assert state["models"]["smollm2"]["cache_budget_bytes"] == 2**29
        assert state["models"]["smollm2"]["prefill_step"] == 300  # the profile's wins
        assert state["reload_error"] is None
        edited = state["revision"]

        path.write_text(path.read_text().replace("[sampling]\n", '[sampling]\ncolour = "red"\n'))
        state = until(daemon, lambda h: h["reload_error"] is not None)
        assert str(path) in state["reload_error"] and "sampling.colour: unknown key" in state["reload_error"]
        assert "line " in state["reload_error"] and state["revision"] == edited

        path.write_text("[models.smollm2\npath = ")
        state = until(daemon, lambda h: "invalid TOML" in (h["reload_error"] or ""))
        assert state["revision"] == edited and state["sampling"]["temperature"] == 0.5

        data["sampling"]["temperature"] = 0.6
        profiles.write(path, data)
        state = until(daemon, lambda h: h["reload_error"] is None and h["sampling"]["temperature"] == 0.6)
        fixed = state["revision"]
        served = json.loads(request(daemon.port, "POST", "/v1/messages", json.dumps({"model": "claude-opus-4-8", "max_tokens": 1, "messages": [{"role": "user", "content": "Hi"}]}).encode()).body)
        assert served["type"] == "message"
    finally:
        traffic.stop.set()
        traffic.join()
        assert daemon.stop() == 0
    assert traffic.failures == [] and traffic.done > 0
    records = daemon.lines()
    assert not [r for r in records if r.get("event") == "profile.reload.loading"]  # no edit needed the model loaded again
    errors = [r for r in records if r.get("event") == "profile.reload.error"]
    assert len(errors) >= 2 and all(r["file"] == str(path) for r in errors)
    assert {r["revision"] for r in records if r.get("path") == "/v1/messages"} >= {first, fixed}


def test_a_model_swap_lets_the_stream_in_flight_finish_on_the_old_model(tmp_path, model_cache, tiny_model):
    old, new = tmp_path / "old-model", tmp_path / "new-model"
    shutil.copytree(tiny_model, old)
    shutil.copytree(tiny_model, new)
    config = json.loads((new / "config.json").read_text())
    config["max_position_embeddings"] = 4096  # the same weights, told apart by their context
    (new / "config.json").write_text(json.dumps(config))
    path = profile_file(tmp_path, "swap", models={"smollm2": {"path": str(old), "max_tokens": 400}})
    daemon = Daemon(str(path), model_cache, tmp_path / "daemon.log")
    try:
        daemon.wait_ready()
        client = anthropic.Anthropic(base_url=daemon.url, api_key="x", max_retries=0)
        with client.messages.stream(model="claude-opus-4-8", max_tokens=150, messages=[{"role": "user", "content": "Write a long story about a ship."}], extra_body={"temperature": 0.8}) as stream:
            in_flight = stream.response.headers["request-id"]
            events = iter(stream)
            next(e for e in events if e.type == "content_block_delta")
            data = tomllib.loads(path.read_text())
            data["models"]["smollm2"]["path"] = str(new)
            profiles.write(path, data)
            state = until(daemon, lambda h: h["models"]["smollm2"]["path"] == str(new))
            assert state["models"]["smollm2"]["context_length"] == 4096
            for _ in events:  # the rest of the stream, after the swap
                pass
            message = stream.get_final_message()
        assert message.stop_reason in ("end_turn", "max_tokens") and message.usage.output_tokens > 1
        after = client.messages.create(model="claude-opus-4-8", max_tokens=2, messages=[{"role": "user", "content": "Hi"}])
        records = {r["request_id"]: r for r in daemon.records() if "request_id" in r}
        assert records[in_flight]["model_path"] == str(old) and records[in_flight]["outcome"] in ("complete", "max_tokens")
        assert records[after._request_id]["model_path"] == str(new)
    finally:
        assert daemon.stop() == 0


class Sized:
    """Behind the engine interface, for a machine with little memory: a model's weights
    take what its file takes on disk (a missing file fails to load); loading and letting
    go are recorded."""

    def __init__(self, model, budget: int, events: list, growth: int = 1):
        from anyclaude.engine.engine import Loaded

        self.path, self.events, self.cache = model.path, events, None
        found = Path(model.path).exists()
        self.load_error = None if found else f"{model.path}: not found"
        self.loaded = Loaded(model=None, tokenizer=None, context_length=8192, eos_ids=frozenset(), weight_bytes=growth * Path(model.path).stat().st_size, memory_budget=budget) if found else None
        self.ready = found
        self.max_batch = 1

    def start(self):
        self.events.append(("load", Path(self.path).name))

    def stop(self):
        self.events.append(("unload", Path(self.path).name))

    def wait_ready(self, timeout=None):
        return True

    def wait_stopped(self, timeout=None):
        pass

    def set_prefill_step(self, tokens):
        pass

    def set_max_batch(self, sequences):
        pass

    def configure_cache(self, max_bytes, persist):
        pass


@pytest.mark.parametrize(
    "budget, growth, order",
    [
        (2000, 1, ["load a", "load b"]),
        (1000, 1, ["load a", "unload a", "load b"]),
        (2000, 2, ["load a", "unload a", "load b"]),  # weights twice their files' size once loaded (dequantized)
    ],
)
def test_a_model_swap_unloads_the_old_model_first_when_memory_cannot_hold_both(tmp_path, budget, growth, order):
    import asyncio

    from anyclaude.api.errors import Overloaded
    from anyclaude.server import Server

    for name in ("a", "b"):
        (tmp_path / name).write_bytes(b"w" * 600)  # 600 bytes of "weights" each
    log = {"path": str(tmp_path / "requests.jsonl")}  # not the user's own log
    path = profile_file(tmp_path, "small", models={"smollm2": {"path": str(tmp_path / "a")}}, log=log)
    events: list = []

    async def swap() -> None:
        server = Server(profiles.load(str(path)), make_engine=lambda key, model, profile: Sized(model, budget, events, growth))
        server.start()
        old = server.schedulers["smollm2"]
        profile_file(tmp_path, "small", models={"smollm2": {"path": str(tmp_path / "b")}}, log=log)
        await server.reload()
        assert server.reload_error is None and server.profile.models["smollm2"].path == str(tmp_path / "b")
        if "unload a" in order:  # requests that came while the old model went were told to retry
            with pytest.raises(Overloaded, match="being replaced"):
                old.submit(None)

    asyncio.run(swap())
    # When both fit, the old model goes only after the swap (retired once idle).
    assert [" ".join(e) for e in events][: len(order)] == order


def test_a_broken_model_does_not_hold_other_edits_back_and_a_stopping_daemon_refuses_work(tmp_path):
    import asyncio

    from anyclaude.api.errors import Overloaded
    from anyclaude.server import Server

    log = {"path": str(tmp_path / "requests.jsonl")}
    path = profile_file(tmp_path, "broken", models={"smollm2": {"path": str(tmp_path / "missing")}}, log=log)

    async def edits() -> None:
        server = Server(profiles.load(str(path)), make_engine=lambda key, model, profile: Sized(model, 0, []))
        server.start()
        profile_file(tmp_path, "broken", models={"smollm2": {"path": str(tmp_path / "missing")}}, log=log, sampling={"temperature": 0.3})
        await server.reload()
        assert server.profile.sampling.temperature == 0.3  # applied, though the model fails again
        assert "missing: not found" in server.reload_error
        server.stopping()
        with pytest.raises(Overloaded, match="stopping"):
            server.engine_for("claude-opus-4-8")
        profile_file(tmp_path, "broken", models={"smollm2": {"path": str(tmp_path / "missing")}}, log=log, sampling={"temperature": 0.9})
        await server.reload()
        assert server.profile.sampling.temperature == 0.3  # a stopping daemon takes no more edits

    asyncio.run(edits())


def test_the_watch_survives_its_folder_being_deleted_and_restored(tmp_path):
    import asyncio

    from anyclaude import logs, reload
    from anyclaude.server import Server

    folder = tmp_path / "profiles"
    folder.mkdir()
    (tmp_path / "weights").write_bytes(b"w")
    log = {"path": str(tmp_path / "requests.jsonl")}  # outside the folder that goes away
    sections = {"models": {"smollm2": {"path": str(tmp_path / "weights")}}, "log": log}
    path = profile_file(folder, "gone", **sections)

    class Observed(Server):
        """The real server, telling the test each event it logs."""

        def _event(self, name: str, **fields) -> None:
            super()._event(name, **fields)
            self.events.put_nowait(name)

    async def scenario() -> None:
        server = Observed(profiles.load(str(path)), make_engine=lambda key, model, profile: Sized(model, 0, []))
        server.events = asyncio.Queue()
        server.start()
        stop = asyncio.Event()
        watching = asyncio.create_task(reload.watch(server, stop))

        async def until(name: str) -> None:
            # The next event `name`; the watch ending first is the failure under test.
            while True:
                event = asyncio.create_task(server.events.get())
                await asyncio.wait({event, watching}, timeout=60, return_when=asyncio.FIRST_COMPLETED)
                if not event.done():
                    event.cancel()
                    raise AssertionError(f"no {name} event; the watch {'ended' if watching.done() else 'hangs'}")
                if event.result() == name:
                    return

        first = server.revision
        # Gone before or after the watch began (the task has not run yet): lost either way.
        shutil.rmtree(folder)
        await until("profile.watch.lost")
        folder.mkdir()  # restored as a checkout does it: the folder, then its file
        profile_file(folder, "gone", **sections, sampling={"temperature": 0.7})
        await until("profile.watch.resumed")
        await until("profile.reload")  # made once the new watch is in place
        assert server.reload_error is None and server.profile.sampling.temperature == 0.7
        assert server.revision != first

        data = tomllib.loads(path.read_text())
        data["sampling"]["temperature"] = 0.9
        profiles.write(path, data)  # watched again, and an editor's save (a rename) still seen
        await until("profile.reload")
        assert server.profile.sampling.temperature == 0.9

        shutil.rmtree(folder)  # this time while watched
        await until("profile.watch.lost")
        await server.reload()  # while the folder is gone: reported, and the old profile stays
        assert "gone.toml" in server.reload_error and server.profile.sampling.temperature == 0.9
        folder.mkdir()
        profile_file(folder, "gone", **sections, sampling={"temperature": 0.4})
        await until("profile.watch.resumed")
        await until("profile.reload")
        assert server.reload_error is None and server.profile.sampling.temperature == 0.4

        shutil.rmtree(folder)
        await until("profile.watch.lost")
        stop.set()  # while it waits for the folder: it ends, and cleanly
        await asyncio.wait_for(watching, timeout=60)

    asyncio.run(scenario())
    events = [r["event"] for r in logs.read(tmp_path / "requests.jsonl") if "event" in r]
    assert events.count("profile.watch.lost") == 3 and events.count("profile.watch.resumed") == 2
    lost = next(r for r in logs.read(tmp_path / "requests.jsonl") if r.get("event") == "profile.watch.lost")
    assert str(folder) in lost["error"]
