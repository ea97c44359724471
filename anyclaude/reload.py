"""Hot reload: watch the profiles folder and reload the active profile when it changes."""

from __future__ import annotations

import asyncio
from pathlib import Path

import watchfiles

from .server import Server


async def watch(server: Server, stop: asyncio.Event) -> None:
    """Until `stop`: each change to the active profile's file makes the server reload it.

    The folder is watched, not the file: editors save by writing a new file and
    renaming it over the old one, which a watch on the old file would not see.
    """
    path = server.loaded.path
    async for changes in watchfiles.awatch(path.parent, stop_event=stop, debounce=300, recursive=False):
        if any(Path(changed).name == path.name for _, changed in changes):
            await server.reload()
