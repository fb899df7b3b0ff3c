"""One run's journal in one process: its call-site queue, its journal file, what is not
settled yet, and the flushes waiting for it.

``flush`` puts a Barrier in the queue. It is released once every entry before it is
settled (stored, or set aside), as the file's ``Ledger`` says (or the in-memory sender,
when no journal file can be written); it is ``ok`` unless an entry it covers, logged since
the flush before it, was set aside.
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
from trainkit_tracking._journal.ledger import Ledger, Record, Settled
from trainkit_tracking._journal.sender import DEFAULT_LINGER
from trainkit_tracking._journal.spool import JournalLost, Point, SpoolWriter, make_batches
from trainkit_tracking.errors import TrackingError

log = get_logger(__name__)

_UNWRITABLE: set[Path] = set()  # spool dirs already warned about

# Unsent points held in memory when the spool cannot be written (about 150 B each): beyond
# this, new points are dropped with a warning (TRAINKIT_MAX_MEMORY_MB, default 64).
POINT_BYTES = 150
# Set-aside warnings of one run: the first few are warnings, the rest go to the log.
WARN_ASIDE = 5


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
    entry before it (up to ``upto``) is settled; ``ok`` unless one after ``since`` was set
    aside."""

    __slots__ = ("covers", "event", "ok", "since", "spooled", "upto")

    def __init__(self, *, covers: bool = True) -> None:
        self.covers = covers  # False: the SDK's own wait, the next flush reports set-asides
        self.event = threading.Event()
        self.spooled = threading.Event()
        self.ok = False
        self.since = 0
        self.upto = 0


class Channel:
    """The journal of one run in one process: call-site queue -> journal file -> store.

    The queue holds metric points as (key, value, timestamp_ms, step) tuples, ("p", params)
    and ("g", tags) pairs, artifact and end entries (dicts, as journaled), and barriers.
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
        self.unsettled: set[int] = set()  # entries journaled or in memory, not yet settled
        self.in_file = 0  # how many of them the journal file holds (its marks settle them)
        self.aside: set[int] = set()  # entries set aside (whole, or some of their items)
        self.barriers: list[Barrier] = []
        self.ledger: Ledger | None = None  # the marks of the writer's current file
        self.memory_points = 0  # unsent points held in memory (no writable spool)
        self.dropped = 0
        self.warned_aside = 0
        self.spool_ok = True
        self.writer: SpoolWriter | None = None
        self._seq = 0
        self._flushed = 0  # the last entry a barrier covered
        self.open_writer()

    def open_writer(self) -> None:
        try:
            self.writer = SpoolWriter(self.spool_dir, self.tracking_uri, self.run_id)
        except (OSError, TrackingError) as exc:
            self.spool_failed(exc)

    def spool_failed(self, exc: BaseException, held: list[Record] | None = None) -> None:
        """Append no more (logging goes on in memory), with one warning per spool dir
        saying how many points of the run memory holds now."""
        if not self.spool_ok:
            return
        self.spool_ok = False
        if self.spool_dir in _UNWRITABLE:
            log.debug("spool %s of run %s unwritable: %s", self.spool_dir, self.run_id, exc)
            return
        _UNWRITABLE.add(self.spool_dir)
        points = sum(len(r.get("m", ())) for r in held or ())
        now = f"{points} points of run {self.run_id} are held in memory now, " if held else ""
        warn(
            f"cannot write the tracking spool (the journal) in {str(self.spool_dir)!r} "
            f"({exc}); logging goes on in memory only ({now}at most TRAINKIT_MAX_MEMORY_MB), "
            "so what is unsent when the process dies is lost. Set TRAINKIT_SPOOL_DIR to a "
            "writable directory of your own."
        )

    def append(self, records: list[Record]) -> list[Record] | None:
        """Journal ``records``; else the entries memory must keep instead (with those of a
        journal deleted under us that cannot be made again). The caller holds the lock."""
        if not self.spool_ok:
            return records
        if self.writer is None or self.writer.closed:
            self.open_writer()
        if self.writer is None or not self.spool_ok:
            return records
        recovered, recoveries = self.writer.recovered, self.writer.recoveries
        try:
            self.writer.append(records)
        except JournalLost as exc:
            self.in_file -= len(exc.records)
            held = exc.records + records
            self.spool_failed(exc, held)
            return held
        except (OSError, TrackingError) as exc:
            self.spool_failed(exc, records)
            return records
        if self.writer.recoveries != recoveries:
            warn(
                f"the tracking journal of run {self.run_id} was deleted from "
                f"{str(self.spool_dir)!r} while the run logged; it was made again, with the "
                f"{self.writer.recovered - recovered} entries not yet stored"
            )
        return None

    def collect(self) -> list[Record | Barrier]:
        """Drain the queue into numbered entries (data, artifacts, end), then the barriers."""
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
            barrier.since, barrier.upto = self._flushed, self._seq
            if barrier.covers:
                self._flushed = self._seq
        return [*records, *barriers]

    def settle(self, seq: int, *, ok: bool, in_file: bool) -> None:
        """Entry ``seq`` is stored (``ok``) or (some of it) set aside; release what waited."""
        with self.lock:
            if seq not in self.unsettled:
                return
            self.unsettled.discard(seq)
            if in_file:
                self.in_file -= 1
                if self.writer is not None:
                    self.writer.settle(seq)
            if not ok:
                self.aside.add(seq)
            self.release()

    def release(self) -> None:
        """Set the barriers that nothing unsettled holds back (the caller holds the lock)."""
        low = min(self.unsettled) if self.unsettled else None
        kept = []
        for barrier in self.barriers:
            if low is None or barrier.upto < low:
                barrier.ok = not any(barrier.since < s <= barrier.upto for s in self.aside)
                barrier.event.set()
            else:
                kept.append(barrier)
        self.barriers = kept
        if not self.barriers and self.aside:
            self.aside = {s for s in self.aside if s > self._flushed}

    def read_marks(self) -> list[Settled]:
        """The marks written since the last read, of this process's current file."""
        path = self.writer.path if self.writer is not None else None
        if path is None:
            return []
        if self.ledger is None or self.ledger.path != path:
            self.ledger = Ledger(path)
        return self.ledger.read_new()

    def warn_aside(self, settled: Settled) -> None:
        """One warning per set-aside entry (naming the run and what), a few per run."""
        items = "; ".join(redact_value(w) for w in settled.aside[:5])
        more = f" (and {len(settled.aside) - 5} more)" if len(settled.aside) > 5 else ""
        message = (
            f"trainkit-tracking set aside {items}{more} of run {self.run_id}: it could not be "
            "stored and holds back nothing else. `trainkit-tracking doctor` lists what was "
            "set aside; `trainkit-tracking sync --retry-set-aside` tries it again once fixed"
        )
        self.warned_aside += 1
        if self.warned_aside < WARN_ASIDE:
            warn(message)
        elif self.warned_aside == WARN_ASIDE:
            warn(message + f". Later ones of run {self.run_id} are only logged")
        else:
            log.warning("%s", message)
