"""The worker's tie to `anyclaude serve`: when the serve process dies, its worker goes too.

Granian runs the app in a worker process, a child of the serve process (the same pid
before and after `blas.preload_and_reexec`: exec keeps it). Killed with SIGKILL, the serve
process cannot stop its worker, which would serve on, holding the port beside any new daemon
(SO_REUSEPORT). So the worker watches its parent and, once it is gone, ends itself as SIGTERM
ends it: the requests in hand end well-formed and logged.

ANYCLAUDE_LIFELINE=0 turns this off: a test and debug switch, to get an orphaned worker.
"""

from __future__ import annotations

import os
import signal
import sys
import threading
import time

# Seconds between looks at the parent: how late, at worst, an orphaned worker notices.
POLL = 0.25
# Seconds the worker has to stop after its own SIGTERM before it is ended outright.
GRACE = 10.0


def watch_parent() -> None:
    """In the worker of `anyclaude serve` (ANYCLAUDE_PID names it, another process), end this
    process through SIGTERM once the serve process dies. Does nothing anywhere else."""
    serve = os.environ.get("ANYCLAUDE_PID", "")
    if not serve.isdigit() or os.environ.get("ANYCLAUDE_LIFELINE") == "0":
        return
    serve_pid = int(serve)
    if serve_pid == os.getpid():  # the app runs in the serve process itself (Granian's thread workers)
        return
    if os.getppid() != serve_pid and _alive(serve_pid):
        return  # not its child: nothing of ours to watch
    # A daemon thread: it must not keep a worker that is exiting anyway alive.
    threading.Thread(target=_watch, args=(serve_pid,), name="anyclaude-lifeline", daemon=True).start()


def _watch(serve_pid: int) -> None:
    # getppid changes the moment the parent exits (to init or a subreaper), zombie or not;
    # if the serve process died before this started, it has changed already.
    while os.getppid() == serve_pid:
        time.sleep(POLL)
    print(f"anyclaude: the serve process (pid {serve_pid}) is gone; stopping its worker", file=sys.stderr, flush=True)
    os.kill(os.getpid(), signal.SIGTERM)
    time.sleep(GRACE)
    os._exit(1)  # still here: something holds the shutdown up, and nobody will stop us otherwise


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # there, but someone else's
        pass
    return True
