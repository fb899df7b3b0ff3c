"""One run's transport in one process: its call-site queue, its spool writer, what is unsettled.

``flush`` puts a Barrier in the queue; it is set once every record before it is settled
(stored, or refused), by the sender's marks or by the in-memory sender.
"""

from __future__ import annotations

import os
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.redact import get_logger, redact_value, warn
from trainkit_tracking._journal.sender import DEFAULT_LINGER
from trainkit_tracking._journal.spool import (
    Point,
    Record,
    SpoolWriter,
    ack_path,
    make_batches,
    read_lines,
)
from trainkit_tracking.errors import TrackingError

log = get_logger(__name__)

_UNWRITABLE: set[Path] = set()  # spool dirs already warned about


# Unsent points held in memory when the spool cannot be written (about 150 B each): beyond
# this, new points are dropped with a warning (TRAINKIT_MAX_MEMORY_MB, default 64).
POINT_BYTES = 150


def read_settings(environ: Mapping[str, str]) -> tuple[str, float, int]:
    """TRAINKIT_SENDER, TRAINKIT_SENDER_LINGER and TRAINKIT_MAX_MEMORY_MB, validated."""
    mode = environ.get(_env.TRAINKIT_SENDER, "").strip() or "process"
    if mode not in ("process", "thread"):
        raise TrackingError(
            f"environment variable {_env.TRAINKIT_SENDER}={mode!r} must be 'process' (send "
            "from a process of its own, the default) or 'thread'; fix or unset it"
        )
    linger = _env.read_seconds(environ, _env.TRAINKIT_SENDER_LINGER) or DEFAULT_LINGER
    memory_mb = _env.read_int(environ, _env.TRAINKIT_MAX_MEMORY_MB, minimum=1) or 64
    return mode, linger, memory_mb


class Barrier:
    """Put in a run's queue by ``flush``: ``spooled`` once on disk, ``event`` once every
    record before it (``upto``) is settled."""

    __slots__ = ("event", "ok", "spooled", "upto")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.spooled = threading.Event()
        self.ok = False
        self.upto = 0


class Channel:
    """The transport of one run in one process: call-site queue -> spool -> store.

    The queue holds metric points as (key, value, timestamp_ms, step) tuples, ("p", params)
    and ("g", tags) pairs, artifact and end records (dicts, as spooled), and barriers.
    """

    def __init__(
        self,
        tracking_uri: str,
        run_id: str,
        spool_dir: Path,
        *,
        flush_interval: float,
        heartbeat_interval: float,
        heartbeat_tag: str,
        heartbeat: bool,
        timeout: float,
        holder_tag: str | None = None,
    ) -> None:
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self.spool_dir = spool_dir
        self.flush_interval = flush_interval
        self.heartbeat_interval = heartbeat_interval
        self.heartbeat_tag = heartbeat_tag
        self.heartbeat_on = heartbeat and heartbeat_interval > 0
        self.holder_tag = holder_tag  # a shared run: this process's hold, beaten with it
        # Wall time since which the store has answered this run's heartbeats without a
        # miss (0: no miss seen): a shared run's holders are judged stale only on time
        # in which the store answered.
        self.answered_since = 0.0
        self.beat_missed = False
        self.timeout = timeout
        # The Tracker sets the first heartbeat when it creates the run.
        self.next_heartbeat = time.monotonic() + heartbeat_interval
        self.queue: deque[Any] = deque()
        self.lock = threading.Lock()
        self.pid = os.getpid()
        self.ended = False
        self.failed = 0  # records not stored (refused items, or no spool to keep them)
        self.unsettled: set[int] = set()  # records spooled or in memory, not yet settled
        self.in_file = 0  # how many of them the spool holds (the sender's marks settle them)
        self.barriers: list[Barrier] = []
        self.ack_offset = 0  # of the writer's current segment's ack file
        self.ack_of: Path | None = None
        self.memory_points = 0  # unsent points held in memory (no writable spool)
        self.dropped = 0
        self.spool_ok = True
        self.writer: SpoolWriter | None = None
        self._seq = 0
        self.open_writer()

    def open_writer(self) -> None:
        try:
            mode = read_settings(os.environ)[0]
            self.writer = SpoolWriter(self.spool_dir, self.tracking_uri, self.run_id, sender=mode)
        except OSError as exc:
            self.spool_failed(exc)

    def spool_failed(self, exc: OSError) -> None:
        """Append no more (logging goes on in memory), with one warning per spool dir.

        The writer stays open for marking records done: a record that reached the file
        and was then stored must not be sent again by ``sync``.
        """
        if self.spool_ok:
            self.spool_ok = False
            if self.spool_dir in _UNWRITABLE:
                log.debug("spool %s of run %s unwritable: %s", self.spool_dir, self.run_id, exc)
            else:
                _UNWRITABLE.add(self.spool_dir)
                warn(
                    f"cannot write the tracking spool in {str(self.spool_dir)!r} ({exc}); "
                    "logging goes on in memory only, so what is unsent when the process dies "
                    "is lost. Set TRAINKIT_SPOOL_DIR to a writable directory."
                )

    def collect(self) -> list[Record | Barrier]:
        """Drain the queue into numbered records (data, artifacts, end), then the barriers."""
        points: list[Point] = []
        params: dict[str, str] = {}
        tags: dict[str, str] = {}
        tail: list[Record] = []
        barriers: list[Record | Barrier] = []
        q = self.queue
        for _ in range(len(q)):
            item = q.popleft()
            if type(item) is tuple:
                if len(item) == 4:
                    points.append(item)
                else:
                    (params if item[0] == "p" else tags).update(item[1])
            elif type(item) is dict:
                tail.append(item)
            else:
                barriers.append(item)
        # The end goes last: a run is terminated after everything logged to it.
        records = make_batches(points, params, tags) + sorted(tail, key=lambda r: r["t"] == "e")
        for record in records:
            self._seq += 1
            record["n"] = self._seq
        for barrier in barriers:
            assert isinstance(barrier, Barrier)
            barrier.upto = self._seq
        return [*records, *barriers]

    def settle(self, seq: int, *, ok: bool, in_file: bool, kept: bool = False) -> None:
        """Record ``seq`` as stored (``ok``) or not; release the barriers it held back.

        ``kept``: refused as a whole, so it stays in the spool file (for ``sync``)."""
        with self.lock:
            if seq not in self.unsettled:
                return
            self.unsettled.discard(seq)
            if in_file:
                self.in_file -= 1
                if self.writer is not None and not kept:
                    self.writer.settle(seq)
            if not ok:
                self.failed += 1
            self.release()

    def release(self) -> None:
        """Set the barriers that nothing unsettled holds back (the caller holds the lock)."""
        low = min(self.unsettled) if self.unsettled else None
        kept = []
        for barrier in self.barriers:
            if low is None or barrier.upto < low:
                barrier.ok = self.failed == 0
                barrier.event.set()
            else:
                kept.append(barrier)
        self.barriers = kept

    def warn_kept(self, what: str, reason: str) -> None:
        """The store refused a whole record (a deleted run, a file gone): it stays in the
        spool for ``sync`` once the cause is fixed."""
        where = (
            f"it stays in the spool ({self.writer.path}); fix the cause and run "
            "`trainkit-tracking sync`"
            if self.writer is not None and self.writer.path is not None
            else "the spool is not writable, so it is lost"
        )
        message = (
            f"the tracking store refused {what} of run {self.run_id}: "
            f"{redact_value(reason)}; {where}."
        )
        if self.failed == 0:
            warn(message + " Later failures of this run are only logged.")
        else:
            log.warning("%s", message)

    def warn_refused(self, reasons: list[str]) -> None:
        """Items refused for good (a bad or conflicting value); the rest was stored."""
        text = "; ".join(redact_value(r) for r in reasons[:5])
        more = f" (and {len(reasons) - 5} more)" if len(reasons) > 5 else ""
        warn(
            f"the tracking store refused {text}{more} of run {self.run_id}; the rest of "
            "its data is stored. Fix the value (or log it under another key)."
        )

    def read_acks(self) -> list[Record]:
        """The sender's new marks for this process's current segment."""
        path = self.writer.path if self.writer is not None else None
        if path is None:
            return []
        if path != self.ack_of:
            self.ack_of, self.ack_offset = path, 0
        marks, self.ack_offset = read_lines(ack_path(path), self.ack_offset)
        return marks


def what(record: Record) -> str:
    return {"b": "a batch", "a": "an artifact", "e": "the end"}.get(record["t"], "a record")
