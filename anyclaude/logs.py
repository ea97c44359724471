"""The JSONL request log: one line per request, written when it ends, however it ends."""

from __future__ import annotations

import errno
import os
import sys
import threading
import time
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import msgspec
from msgspec import Struct

MAX_BYTES = 50 * 1024 * 1024
KEEP = 3  # rotated files: requests.jsonl.1 .. .3


class Record(Struct, omit_defaults=True):
    ts: str
    request_id: str
    outcome: str
    profile: str = ""
    # Digest of the profile file in effect (see /health).
    revision: str = ""
    path: str = ""
    status: int = 0
    session_id: str | None = None
    # Claude Code's hint headers: main, subagent, workflow, compaction or auxiliary;
    # the subagent's own id and its parent's.
    request_class: str | None = None
    agent_id: str | None = None
    parent_agent_id: str | None = None
    # Queued after main requests, cached apart (see anyclaude.engine.scheduler).
    side: bool | None = None
    model: str | None = None
    resolved_model: str | None = None
    model_path: str | None = None
    # A model on another server: its base URL, its HTTP status, the seconds to its response
    # headers; and the local model that served the request instead, when it could not.
    upstream: str | None = None
    upstream_status: int | None = None
    upstream_s: float | None = None
    fallback: str | None = None
    stream: bool | None = None
    system_chars: int | None = None
    tools: int | None = None
    messages: int | None = None
    prompt_tokens: int | None = None
    # How calls were held to their tools' schemas: forced (tool_choice any or tool) or
    # held (from the marker that opens one on; None: calls come whole, if at all).
    call_grammar: str | None = None
    # Images the model could not see (given to it as a note).
    images_unseen: int | None = None
    cached_tokens: int | None = None
    # Tokens of its system+tools prefix (what a checkpoint holds).
    checkpoint_tokens: int | None = None
    # Entries of the conversation a compaction replaced, now the first to be evicted.
    cache_demoted: int | None = None
    # The kind of prefix-cache entry they came from: conversation or checkpoint.
    cache_source: str | None = None
    # Why no more came from the cache: hit (all any entry shares), no_entries, no_prefix,
    # not_trimmable (an entry shares more, but can only be extended).
    cache_lookup: str | None = None
    # What became of the request's own entry: stored, too_large (over [cache] max_gb
    # alone), over_budget (the checkpoints kept fill it), miscounted, empty, failed.
    cache_store: str | None = None
    queue_wait_s: float | None = None
    prefill_s: float | None = None
    ttft_s: float | None = None
    output_tokens: int | None = None
    decode_tps: float | None = None
    stop_reason: str | None = None
    # The last event a stream sent: message_stop, error, or None (cut off).
    ended: str | None = None
    duration_s: float | None = None
    error: str | None = None
    # Tool calls that could not be made valid and were shown as text instead.
    tool_parse_errors: list[str] | None = None
    # A session's prompt that did not extend its previous turn: where, and in which part.
    cache_miss: Any = None
    request: Any = None
    response: Any = None


class Event(Struct, omit_defaults=True):
    """Something the daemon did, not a request: profile reloads and their errors, cache evictions."""

    ts: str
    event: str
    profile: str = ""
    file: str = ""
    error: str | None = None
    revision: str | None = None
    models: list[str] | None = None
    model: str | None = None
    # cache.evict: the entry (anyclaude.cache.Eviction: kind, tokens, bytes, reason, kept, idle_s).
    entry: Any = None


def location(configured: str | None) -> Path:
    """The request log's file: `[log] path` of a profile, or the default."""
    return Path(configured).expanduser() if configured else default_path()


def default_path() -> Path:
    if os.environ.get("ANYCLAUDE_LOG"):
        return Path(os.environ["ANYCLAUDE_LOG"])
    if sys.platform == "darwin":
        return Path.home() / "Library" / "Logs" / "anyclaude" / "requests.jsonl"
    state = os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state"
    return Path(state) / "anyclaude" / "requests.jsonl"


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


_encoder = msgspec.json.Encoder()


class RequestLog:
    """Appends records as whole lines on an O_APPEND file, so lines never interleave; a
    line that cannot be written whole (a full disk) is cut back out, so none is ever left
    half-written. `error` is the last failure to write, None once a write succeeds."""

    def __init__(self, path: Path, *, max_bytes: int = MAX_BYTES):
        self.path = path
        self.max_bytes = max_bytes
        self._lock = threading.Lock()
        self.error: str | None = None

    def write(self, record: Record) -> None:
        """Append one record as a line; OSError, with `error` set, if it could not be."""
        line = _encoder.encode(record) + b"\n"
        with self._lock:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                self._rotate_if_full(len(line))
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    _append(fd, line)
                finally:
                    os.close(fd)
            except OSError as exc:
                self.error = f"cannot write the request log {self.path}: {exc}"
                raise
            self.error = None

    def _rotate_if_full(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size + incoming <= self.max_bytes:
            return
        for n in range(KEEP - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{n}")
            if older.exists():
                older.replace(self.path.with_name(f"{self.path.name}.{n + 1}"))
        self.path.replace(self.path.with_name(f"{self.path.name}.1"))


def _append(fd: int, line: bytes) -> None:
    # All of `line` or none of it: a short write (the disk filled up) is retried, and if a
    # retry fails the file is cut back to where the line began, so the next line that
    # fits does not get glued onto half of this one.
    written = _write(fd, line)
    # Where this line began: O_APPEND put it at the end of the file as it was then.
    start = os.lseek(fd, 0, os.SEEK_CUR) - written
    try:
        while written < len(line):
            written += _write(fd, line[written:])
    except OSError:
        os.ftruncate(fd, start)
        raise


def _write(fd: int, data: bytes) -> int:
    count = os.write(fd, data)
    if not count:  # nothing taken and no error: would loop for ever
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return count


def read(path: Path, since: datetime | None = None) -> list[dict]:
    """Records from a log and its rotated files, oldest first; broken lines are skipped."""
    files = [path.with_name(f"{path.name}.{n}") for n in range(KEEP, 0, -1)] + [path]
    records = []
    for file in files:
        try:
            lines = file.read_bytes().splitlines()
        except FileNotFoundError:
            continue
        for line in lines:
            try:
                record = msgspec.json.decode(line)
            except msgspec.DecodeError:
                continue
            if since is None or _time(record) >= since:
                records.append(record)
    return records


def _time(record: dict) -> datetime:
    return datetime.fromisoformat(record["ts"].replace("Z", "+00:00"))


def parse_since(text: str) -> datetime:
    """`30m`, `2h`, `1d` ago, or an ISO date/time."""
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400}
    if text[:-1].replace(".", "", 1).isdigit() and text[-1] in units:
        return datetime.fromtimestamp(time.time() - float(text[:-1]) * units[text[-1]], timezone.utc)
    moment = datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


CONVERSATION, CHECKPOINT, COLD = "conversation", "checkpoint", "cold"


def served(record: dict) -> str:
    """How the cache served a request: CONVERSATION (more than its system+tools prefix
    came from the cache: an earlier turn of it), CHECKPOINT (that prefix, at least half
    of it, and no more) or COLD (less: the template's first tokens, say)."""
    cached, prefix = record.get("cached_tokens") or 0, record.get("checkpoint_tokens") or 0
    if cached > prefix:
        return CONVERSATION
    return CHECKPOINT if cached and 2 * cached >= prefix else COLD


def stats(records: list[dict]) -> dict:
    """The figures `anyclaude logs stats` prints."""
    messages = [r for r in records if r.get("path") == "/v1/messages"]
    streams = [r for r in messages if r.get("stream") and r.get("status") == 200]
    # A stream is truncated when the server ended it with neither message_stop nor an
    # error event; a client that went away ended it itself (outcome cancelled).
    truncated = [r for r in streams if r.get("ended") not in ("message_stop", "error") and r["outcome"] != "cancelled"]
    prompt = sum(r.get("prompt_tokens") or 0 for r in messages)
    cached = sum(r.get("cached_tokens") or 0 for r in messages)
    ttft = [r["ttft_s"] for r in messages if r.get("ttft_s") is not None]
    tps = [r["decode_tps"] for r in messages if r.get("decode_tps")]
    # Requests the engine prefilled (not refused, not cancelled while queued).
    prefilled = [r for r in messages if r.get("cached_tokens") is not None]
    ways = Counter(served(r) for r in prefilled)
    return {
        "requests": len(messages),
        "outcomes": dict(Counter(r["outcome"] for r in messages).most_common()),
        "streams": len(streams),
        "truncated": len(truncated),
        "truncation_rate": len(truncated) / len(streams) if streams else 0.0,
        "ttft_p50_s": _percentile(ttft, 0.5),
        "ttft_p95_s": _percentile(ttft, 0.95),
        "decode_tps_p50": _percentile(tps, 0.5),
        "cache_hit_ratio": cached / prompt if prompt else 0.0,
        "served": {way: ways[way] for way in (CONVERSATION, CHECKPOINT, COLD)},
    }


def format_stats(figures: dict) -> str:
    def num(value, unit=""):
        return "-" if value is None else f"{value:.2f}{unit}"

    lines = [f"requests          {figures['requests']}"]
    for outcome, count in figures["outcomes"].items():
        lines.append(f"  {outcome:<16}{count}")
    lines += [
        f"streams           {figures['streams']}",
        f"truncated         {figures['truncated']} ({figures['truncation_rate']:.2%})",
        f"ttft p50 / p95    {num(figures['ttft_p50_s'], ' s')} / {num(figures['ttft_p95_s'], ' s')}",
        f"decode p50        {num(figures['decode_tps_p50'], ' tok/s')}",
        f"cache hit ratio   {figures['cache_hit_ratio']:.2%} of prompt tokens",
    ]
    # Per request: a ratio of tokens reads high when a 20K checkpoint is reused and the
    # conversation after it is prefilled again every turn.
    ways = figures.get("served") or {}
    total = sum(ways.values())
    for way, label in ((CONVERSATION, "conversation reused"), (CHECKPOINT, "checkpoint only"), (COLD, "cold")):
        if total:
            lines.append(f"  {label:<22}{ways.get(way, 0)} ({ways.get(way, 0) / total:.0%} of requests)")
    return "\n".join(lines)


def format_record(r: dict) -> str:
    """One record as a line a person reads."""
    clock = r["ts"][11:19]
    if r.get("event") == "cache.evict" and isinstance(r.get("entry"), dict):
        e = r["entry"]
        what = f"{e.get('kind')} of {e.get('tokens')} tokens ({e.get('reason')}" + (f", cut back to {e['kept']})" if e.get("kept") else ")")
        return "  ".join(p for p in (clock, "cache.evict", r.get("model") or "", what) if p)
    if "event" in r:
        return "  ".join(str(p) for p in (clock, r["event"], r.get("error") or r.get("revision") or r.get("models") or "") if p)
    parts = [clock, r["request_id"], r.get("path", "")]
    if r.get("model"):
        parts.append(f"{r['model']}->{r.get('resolved_model')}")
    if r.get("prompt_tokens") is not None:
        parts.append(f"in {r['prompt_tokens']} ({r.get('cached_tokens') or 0} cached)")
    if r.get("ttft_s") is not None:
        parts.append(f"ttft {r['ttft_s']:.2f}s")
    if r.get("output_tokens") is not None:
        parts.append(f"out {r['output_tokens']}")
    if r.get("decode_tps"):
        parts.append(f"{r['decode_tps']:.1f} tok/s")
    parts.append(r["outcome"] if r.get("stop_reason") in (None, r["outcome"]) else f"{r['outcome']} ({r['stop_reason']})")
    if r.get("error"):
        parts.append(f"error: {r['error']}")
    return "  ".join(parts)


def follow(path: Path, *, start: int = 0, stop: threading.Event | None = None):
    """Yield records appended to `path` after byte `start`, across rotations (watchfiles wakes us)."""
    import watchfiles

    path.parent.mkdir(parents=True, exist_ok=True)
    # One watcher for the whole follow: it blocks until the folder changes (or a second passes).
    changes = watchfiles.watch(path.parent, stop_event=stop, yield_on_timeout=True, rust_timeout=1000)
    position = start
    inode = path.stat().st_ino if path.exists() else None
    buffer = b""
    while True:
        if path.exists():
            stat = path.stat()
            if stat.st_ino != inode or stat.st_size < position:  # rotated or truncated
                inode, position, buffer = stat.st_ino, 0, b""
            if stat.st_size > position:
                with open(path, "rb") as f:
                    f.seek(position)
                    chunk = f.read()
                position += len(chunk)
                buffer += chunk
                *lines, buffer = buffer.split(b"\n")
                for line in lines:
                    try:
                        yield msgspec.json.decode(line)
                    except msgspec.DecodeError:
                        continue
        if stop is not None and stop.is_set():
            return
        if next(changes, None) is None:
            return
