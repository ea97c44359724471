"""The daemon's state: the profile in effect, an engine and its queue per model, the log;
and swapping all of it when the profile changes."""

from __future__ import annotations

import asyncio
import hashlib
import sys
from collections.abc import Callable
from pathlib import Path

from . import logs, misses, profiles, upstream
from .engine.cache import PrefixCache
from .engine.engine import Engine, KVQuantization
from .api.errors import ApiError, NotFound, NotReady
from .models import loader, size_on_disk
from .engine.scheduler import Scheduler


class Server:
    """The profile in effect and what serves it. Requests take the engine and scheduler
    they start with, so a swap never touches a request in flight."""

    def __init__(
        self,
        loaded: profiles.Loaded,
        make_engine: Callable[[str, profiles.Model, profiles.Profile], Engine] | None = None,
        *,
        exposed: bool = False,
    ):
        self.loaded = loaded
        # Listening beyond this machine: only with an auth token, which a reload keeps.
        self.exposed = exposed
        self.revision = _revision(loaded.path)
        self._make_engine = make_engine or self._real_engine
        self.engines: dict[str, Engine] = {}
        self.schedulers: dict[str, Scheduler] = {}
        self.sessions = misses.Sessions()
        self.warned_images: set[str] = set()  # models whose image warning was given
        self.log = _request_log(loaded.profile)
        self.reload_error: str | None = None
        self.reloading: str | None = None
        self.preparing = 0  # requests being decoded and rendered
        self._stopping: str | None = None
        self._retiring: set[Scheduler] = set()
        self._reloads = 0

    @property
    def profile(self) -> profiles.Profile:
        return self.loaded.profile

    def _real_engine(self, key: str, model: profiles.Model, profile: profiles.Profile) -> Engine:
        settings, cache = profile.engine, profile.cache
        quantize = KVQuantization(settings.kv_bits, settings.kv_group_size, settings.quantized_kv_start) if settings.kv_bits else None
        return Engine(
            loader(model, settings, self.loaded.path.parent),
            prefill_step=settings.prefill_step,
            kv_quantization=quantize,
            max_batch=settings.max_batch,
            cache=PrefixCache(_budget(cache), models=len(profile.models), on_evict=lambda e: self._event("cache.evict", model=key, entry=e)),
            persist=cache.persist,
            name=f"engine-{key}",
        )

    def _engine(self, key: str, model: profiles.Model, profile: profiles.Profile):
        if model.upstream is not None:  # another server runs it: nothing loads here
            return upstream.make(key, model)
        return self._make_engine(key, model, profile)

    def start(self) -> None:
        for key, model in self.profile.models.items():
            engine = self._engine(key, model, self.profile)
            self.engines[key] = engine
            self.schedulers[key] = _queue(engine, self.profile.engine.queue_size)
            engine.start()

    def stop(self) -> None:
        for engine in self.engines.values():
            engine.stop()

    def stopping(self) -> None:
        """The daemon was told to exit: end the requests in hand at once, refuse new ones."""
        self._stopping = "the daemon is stopping; retry once it is back"
        for scheduler in [*self.schedulers.values(), *self._retiring]:
            scheduler.close(self._stopping)

    def engine_for(self, requested: str, key: str | None = None) -> tuple[str, Engine, Scheduler]:
        """What serves a requested model name (or the model `key`, a fallback)."""
        key = key or self.profile.resolve(requested)
        if key is None:
            raise NotFound(f"model: {requested} is not served by profile {self.loaded.name!r}")
        engine, scheduler = self.engines[key], self.schedulers[key]
        scheduler.check_open()  # the model is being replaced, or the daemon is stopping
        if engine.load_error:
            raise ApiError(f"model {key!r} failed to load: {engine.load_error}")
        if not engine.ready:
            raise NotReady("the model is still loading; try again shortly")
        return key, engine, scheduler

    @property
    def ready(self) -> bool:
        return all(e.ready for e in self.engines.values())

    # --- reloading ------------------------------------------------------------

    async def reload(self) -> None:
        """Read the profile file again. Invalid: keep serving the old one, and say why.
        Valid: settings apply from the next request; changed models load in the
        background and take over once ready, while requests in flight finish on the old.
        Where memory cannot hold both, the old go first: their requests finish, new ones
        are told to retry (529) until the new models are loaded."""
        if self._stopping:
            return
        self._reloads += 1
        attempt = self._reloads
        path = self.loaded.path
        try:
            loaded = profiles.Loaded(name=self.loaded.name, path=path, profile=profiles.parse(path.read_bytes(), path))
            if self.exposed and not loaded.profile.server.auth_token:
                raise profiles.ProfileError(f"{path}: server.auth_token: the daemon listens beyond this machine and needs one")
        except (OSError, profiles.ProfileError) as exc:
            self._event("profile.reload.error", error=str(exc))
            self.reload_error = str(exc)
            return
        old = self.profile
        # A model loads again when its table changed, or the way models are loaded did.
        # (so do [engine] kv_ settings: the cached entries are of the other kind)
        reload_all = _load_settings(old.engine) != _load_settings(loaded.profile.engine)
        # A model that failed to load is tried again (its files may be there now); failing
        # again, it does not hold the rest of the edit back.
        broken = {k for k, e in self.engines.items() if e.load_error}
        changed = [k for k, m in loaded.profile.models.items() if reload_all or old.models.get(k) != m or k in broken]
        engines = {k: e for k, e in self.engines.items() if k in loaded.profile.models and k not in changed}
        in_turn = False
        if changed:
            replaced = [k for k in self.engines if k not in engines]
            in_turn = bool(replaced) and not self._room_for(changed, loaded.profile)
            if in_turn:
                self.reloading = f"unloading {', '.join(replaced)}: no room for both"
                self._event("profile.reload.unloading", models=replaced)
                for k in replaced:
                    self.schedulers[k].drain(f"model {k!r} is being replaced; retry shortly")
                await asyncio.gather(*(self.schedulers[k].idle() for k in replaced))
                for k in replaced:
                    self.engines[k].stop()
                await asyncio.gather(*(asyncio.to_thread(self.engines[k].wait_stopped) for k in replaced))
            self.reloading = f"loading {', '.join(changed)}"
            self._event("profile.reload.loading", models=changed)
            fresh = {k: self._engine(k, loaded.profile.models[k], loaded.profile) for k in changed}
            for engine in fresh.values():
                engine.start()
            await asyncio.gather(*(asyncio.to_thread(e.wait_ready) for e in fresh.values()))
            failed = {k: e.load_error for k, e in fresh.items() if e.load_error and k not in broken}
            if not in_turn and (attempt != self._reloads or failed):  # superseded by a newer edit, or broken
                for engine in fresh.values():
                    engine.stop()
                if failed and attempt == self._reloads:
                    self.reloading = None
                    self.reload_error = "; ".join(f"model {k!r} failed to load: {e}" for k, e in failed.items())
                    self._event("profile.reload.error", error=self.reload_error)
                return
            engines.update(fresh)
        if self._stopping:
            return
        self._swap(loaded, engines)
        # Models that could not load (the old ones gone already, or broken before): the
        # new profile stays, and says what is wrong.
        if errors := [f"model {k!r} failed to load: {e.load_error}" for k, e in engines.items() if e.load_error]:
            self.reload_error = "; ".join(errors)
            self._event("profile.reload.error", error=self.reload_error)

    def _room_for(self, keys: list[str], profile: profiles.Profile) -> bool:
        """Whether models `keys` of `profile` fit in memory beside all that is loaded now."""
        held = {k: e.loaded for k, e in self.engines.items() if e.loaded is not None and not isinstance(e, upstream.Upstream)}
        budget = max((m.memory_budget for m in held.values()), default=0)
        sizes = [size_on_disk(profile.models[k], self.loaded.path.parent) for k in keys]
        if not budget or None in sizes:
            # Not known (a model not on disk yet): it loads beside, so that the old model
            # serves through a download, and stays if the new one fails to load.
            return True
        # Weights take about their files' size, unless loading changes them (on a CPU,
        # quantized weights are dequantized): as much more as the models loaded now take.
        files = {k: size_on_disk(self.profile.models[k], self.loaded.path.parent) for k in held}
        growth = max([1.0] + [m.weight_bytes / files[k] for k, m in held.items() if files[k]])
        caches = sum(e.cache.bytes for e in self.engines.values() if e.cache)
        return sum(m.weight_bytes for m in held.values()) + caches + growth * sum(sizes) <= budget

    def _swap(self, loaded: profiles.Loaded, engines: dict[str, Engine]) -> None:
        retired = [(e, self.schedulers[k]) for k, e in self.engines.items() if engines.get(k) is not e]
        queue_size = loaded.profile.engine.queue_size
        schedulers = {}
        for key, engine in engines.items():
            kept = self.schedulers.get(key)
            schedulers[key] = kept if kept is not None and kept.engine is engine else _queue(engine, queue_size)
            schedulers[key].queue_size = queue_size
            engine.set_prefill_step(loaded.profile.engine.prefill_step)
            engine.set_max_batch(loaded.profile.engine.max_batch)
            engine.configure_cache(_budget(loaded.profile.cache), loaded.profile.cache.persist)
            if isinstance(schedulers[key], Scheduler):
                schedulers[key].admit()  # a larger max_batch lets the waiting in now
        if loaded.profile.log != self.profile.log:
            self.log = _request_log(loaded.profile)
        # One assignment each, on the event loop: a request sees the old set or the new.
        self.engines, self.schedulers, self.loaded = engines, schedulers, loaded
        self.revision = _revision(loaded.path)
        self.reload_error = self.reloading = None
        self._event("profile.reload", revision=self.revision)
        for engine, scheduler in retired:
            self._retiring.add(scheduler)
            asyncio.get_running_loop().create_task(self._retire(engine, scheduler))

    async def _retire(self, engine: Engine, scheduler: Scheduler) -> None:
        """Stop an engine once the requests it started with are done; its memory goes with it."""
        await scheduler.idle()
        self._retiring.discard(scheduler)
        engine.stop()

    def _event(self, name: str, **fields) -> None:
        record = logs.Event(ts=logs.now(), event=name, profile=self.loaded.name, file=str(self.loaded.path), **fields)
        print(f"anyclaude: {name}: {fields.get('error') or fields}", file=sys.stderr, flush=True)
        try:
            self.log.write(record)
        except OSError:
            pass


def _queue(engine, queue_size: int):
    """The queue in front of an engine; an upstream queues on its own (a Gate counts its calls)."""
    return upstream.Gate(engine) if isinstance(engine, upstream.Upstream) else Scheduler(engine, queue_size=queue_size)


def _budget(cache: profiles.Cache) -> int | None:
    # None: from the device's memory, once the model is loaded.
    return None if cache.max_gb is None else int(cache.max_gb * 2**30)


def _load_settings(engine: profiles.Engine) -> tuple:
    return engine.cpu_dequantize, engine.kv_bits, engine.kv_group_size, engine.quantized_kv_start


def _request_log(profile: profiles.Profile) -> logs.RequestLog:
    return logs.RequestLog(logs.location(profile.log.path), max_bytes=profile.log.max_mb * 1024 * 1024)


def _revision(path: Path) -> str:
    """A short digest of the profile file in effect (what /health and the log show)."""
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    except OSError:
        return "unreadable"
