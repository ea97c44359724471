"""Hot reload: watch the profiles folder and reload the active profile when it changes."""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import watchfiles

from .server import Server

# How often a vanished profiles folder is looked for again.
POLL_S = 0.5


async def watch(server: Server, stop: asyncio.Event) -> None:
    """Until `stop`: each change to the active profile's file makes the server reload it.

    The folder is watched, not the file: editors save by writing a new file and
    renaming it over the old one, which a watch on the old file would not see. If the
    folder goes away, the watch waits for it to come back, reloads and goes on.
    """
    path = server.loaded.path
    resumed = False
    while not stop.is_set():
        try:
            watched = _identity(path.parent)
            # An empty batch each second without changes, to notice the folder gone: on
            # Linux the watch of a deleted folder neither ends nor hears anything again.
            batches = watchfiles.awatch(
                path.parent, stop_event=stop, debounce=300, recursive=False, rust_timeout=1000, yield_on_timeout=True
            )
            error = "the watch ended"
            async with contextlib.aclosing(batches):
                async for changes in batches:
                    # After a resume the first wake-up reloads: the new watch is in place
                    # by then, so a file written meanwhile is not missed.
                    if resumed or any(Path(changed).name == path.name for _, changed in changes):
                        resumed = False
                        await server.reload()
                    # Its deletion seen, or another folder there now (which may have
                    # the old one's inode number: hence both).
                    gone = (watchfiles.Change.deleted, str(path.parent)) in changes
                    if gone or _identity(path.parent) != watched:
                        error = "the folder was deleted or replaced"
                        break
        except Exception as exc:  # a missing folder, or the watch failed: wait, then watch again
            error = str(exc) or type(exc).__name__
        if stop.is_set():
            return
        server._event("profile.watch.lost", error=f"{path.parent}: {error}")
        if not await _reappeared(path.parent, stop):
            return
        server._event("profile.watch.resumed")
        resumed = True


async def _reappeared(folder: Path, stop: asyncio.Event) -> bool:
    # Waits at least once, so a watch that fails at once on a folder that is there
    # retries at this pace rather than in a busy loop. False: stopped meanwhile.
    while True:
        try:
            await asyncio.wait_for(stop.wait(), POLL_S)
            return False
        except TimeoutError:
            if folder.is_dir():
                return True


def _identity(folder: Path) -> tuple[int, int] | None:
    try:
        stat = folder.stat()
    except OSError:
        return None
    return stat.st_dev, stat.st_ino
