"""The background worker of a training process: call-site queues -> spool on disk.

One worker per process serves every run: a spooler thread drains the queues into batches
and appends them to each run's spool (fsync once per flush interval); the sender
(``_sender.py``, a process of its own) sends them, and an ack thread here reads its marks
to settle ``flush`` and ``end``. A light thread per store sets the heartbeat tag, and
sends in memory only when the spool cannot be written. States: RUNNING -> DRAINING ->
STOPPED, ended once by the exit path (``_exit.py``).
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import threading
import time
from collections import deque
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from trainkit_tracking import _env
from trainkit_tracking._redact import get_logger, redact_value
from trainkit_tracking._sender import DEFAULT_LINGER, Link
from trainkit_tracking._spool import (
    Point,
    Record,
    SpoolWriter,
    ack_path,
    make_batches,
    read_lines,
    send_record,
)
from trainkit_tracking._store import Store, is_transient
from trainkit_tracking.errors import TrackingError, warn

log = get_logger(__name__)

MAX_BACKOFF = 15.0
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


class State(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Worker:
    """The process-wide background worker serving every Channel of this process.

    A spooler thread writes the queues to disk, an ack thread reads the sender's marks,
    and a light thread per tracking URI sets the heartbeats (and sends what no spool
    could keep), so that a store that is down holds back only its own runs.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.state = State.RUNNING
        self._stop = threading.Event()
        self._channels: list[Channel] = []
        self.lock = threading.Lock()
        self._kick = threading.Event()
        self._ack_kick = threading.Event()
        self._senders: dict[str, Sender] = {}
        self._links: dict[tuple[Path, str], Link] = {}
        self.mode, self.linger, memory_mb = read_settings(os.environ)
        self.max_memory_points = memory_mb * (1 << 20) // POINT_BYTES
        for name, loop in (
            ("trainkit-spooler", self._spool_loop),
            ("trainkit-acks", self._ack_loop),
        ):
            threading.Thread(target=loop, name=name, daemon=True).start()

    def register(self, channel: Channel) -> None:
        with self.lock:
            if channel in self._channels:
                return
            self._channels.append(channel)
        if channel.heartbeat_on:  # wake the sender to take its heartbeat schedule into account
            self.sender(channel).outbox.put(WAKE)

    def unregister(self, channel: Channel) -> None:
        with contextlib.suppress(ValueError):
            self._channels.remove(channel)  # the caller holds self.lock

    def kick(self) -> None:
        self._kick.set()

    def channels(self, uri: str | None = None) -> list[Channel]:
        with self.lock:
            return [c for c in self._channels if uri is None or c.tracking_uri == uri]

    def sender(self, channel: Channel) -> Sender:
        with self.lock:
            sender = self._senders.get(channel.tracking_uri)
            if sender is None:
                sender = Sender(self, channel.tracking_uri, channel.timeout)
                self._senders[channel.tracking_uri] = sender
            return sender

    def link(self, channel: Channel) -> Link:
        key = (channel.spool_dir, channel.tracking_uri)
        with self.lock:
            link = self._links.get(key)
            if link is None:
                link = Link(
                    channel.spool_dir,
                    channel.tracking_uri,
                    timeout=channel.timeout,
                    linger=self.linger,
                    mode=self.mode,
                    own_paths=lambda: self._own_paths(key),
                )
                self._links[key] = link
            return link

    def _own_paths(self, key: tuple[Path, str]) -> set[Path]:
        """The spool files this process writes for one spool dir and store."""
        paths = set()
        for channel in self.channels(key[1]):
            writer = channel.writer
            if channel.spool_dir == key[0] and writer is not None and writer.path is not None:
                paths.add(writer.path)
        return paths

    def store_down(self, channel: Channel) -> bool:
        sender = self.sender(channel)
        if sender.down or sender.outage_waited:
            return True
        return channel.in_file > 0 and bool(self.link(channel).status().get("down"))

    # Spooling ------------------------------------------------------------------

    def _spool_loop(self) -> None:
        while not self._stop.is_set():
            tick = min((c.flush_interval for c in self.channels()), default=1.0)
            self._kick.wait(max(tick, 0.001))
            self._kick.clear()
            try:
                self.spool_once()
            except Exception:  # the worker must never die; the data stays queued
                log.exception("trainkit-tracking spooler failed; retrying")

    def spool_once(self) -> None:
        staged: list[tuple[Channel, list[Record], list[Record], list[Barrier]]] = []
        for channel in self.channels():
            with channel.lock:
                if not channel.queue:
                    continue
                out = channel.collect()
                records = [r for r in out if isinstance(r, dict)]
                barriers = [b for b in out if isinstance(b, Barrier)]
                channel.unsettled.update(r["n"] for r in records)
                channel.barriers.extend(barriers)
                in_file: list[Record] = []
                if records and channel.spool_ok:
                    if channel.writer is None or channel.writer.closed:
                        channel.open_writer()
                    if channel.writer is not None and channel.spool_ok:
                        try:
                            channel.writer.append(records)
                            in_file = records
                        except OSError as exc:
                            channel.spool_failed(exc)
                channel.in_file += len(in_file)
                in_memory = [] if in_file else self._hold(channel, records)
                staged.append((channel, in_file, in_memory, barriers))
        for channel, in_file, _, _ in staged:
            if in_file and channel.writer is not None and channel.spool_ok:
                try:
                    channel.writer.sync_to_disk()
                except OSError as exc:
                    channel.spool_failed(exc)
        # A record is on disk before anything sends it.
        for channel, in_file, in_memory, barriers in staged:
            for barrier in barriers:
                barrier.spooled.set()
            if in_file:
                self.link(channel).ensure()
            if in_memory:
                outbox = self.sender(channel).outbox
                for record in in_memory:
                    outbox.put((channel, record))
            with channel.lock:
                channel.release()
        if staged:
            self._ack_kick.set()

    def _hold(self, channel: Channel, records: list[Record]) -> list[Record]:
        """Records no spool keeps, sent from memory: bounded, the excess is dropped."""
        kept = []
        for record in records:
            points = len(record.get("m", ())) if record["t"] == "b" else 0
            if points and channel.memory_points + points > self.max_memory_points:
                channel.dropped += points
                channel.unsettled.discard(record["n"])
                channel.failed += 1
                if channel.dropped == points:
                    warn(
                        f"run {channel.run_id}: the store does not answer and the spool cannot "
                        f"be written, so unsent points are held in memory up to "
                        f"TRAINKIT_MAX_MEMORY_MB; beyond it they are dropped (from now on)"
                    )
                continue
            channel.memory_points += points
            kept.append(record)
        return kept

    # Acknowledgements ----------------------------------------------------------

    def _ack_loop(self) -> None:
        while not self._stop.is_set():
            waiting = False
            try:
                waiting = self.poll_acks()
            except Exception:
                log.exception("trainkit-tracking could not read the sender's marks; retrying")
            self._ack_kick.wait(0.005 if waiting else 0.2)
            self._ack_kick.clear()

    def poll_acks(self) -> bool:
        """Settle what the sender marked; returns whether a wait is pending on a mark."""
        waiting = False
        for channel in self.channels():
            if not channel.in_file:
                self._maybe_close(channel)
                continue
            stored = False
            for mark in channel.read_acks():
                kind, seq = mark.get("t"), int(mark.get("n", 0))
                if kind == "r":
                    channel.warn_refused([str(w) for w in mark.get("why", ())])
                elif kind == "k":
                    what = str(mark.get("what") or "a record")
                    channel.warn_kept(what, "; ".join(str(w) for w in mark.get("why", ())))
                elif kind != "d":
                    continue
                stored = stored or kind == "d"
                channel.settle(seq, ok=kind == "d", in_file=True, kept=kind == "k")
            if stored:
                self.sender(channel).outage_waited = False
            if channel.in_file:
                self.link(channel).ensure()  # a sender that died is started again
                waiting = waiting or bool(channel.barriers)
            self._maybe_close(channel)
        return waiting

    def _maybe_close(self, channel: Channel) -> None:
        """Close an ended run's spool once everything is settled and delete it."""
        with self.lock, channel.lock:
            if not channel.ended or channel.queue or channel.unsettled:
                return
            if channel.writer is not None and channel.pid == os.getpid():
                try:
                    channel.writer.close(delete=False)  # deleted: nothing in it is unsent
                except OSError as exc:
                    log.debug("closing the spool of run %s: %s", channel.run_id, exc)
            self.unregister(channel)

    # Waiting -------------------------------------------------------------------

    def wait(
        self, channel: Channel, barrier: Barrier, timeout: float | None, *, ending: bool = False
    ) -> bool:
        """Wait for ``barrier``: True once stored, False at ``timeout``.

        ``ending`` (a run's end, the exit path): while the store is down, only the first
        such wait pays its timeout; later ones (the runs of a nested ``with`` exiting one
        by one) return once their records are on disk, so that ending N runs never takes
        N timeouts. An explicit ``flush(timeout)`` always waits as asked.
        """
        sender = self.sender(channel)
        deadline = None if timeout is None else time.monotonic() + timeout
        if ending and sender.outage_waited:
            barrier.spooled.wait(_remaining(deadline, cap=channel.flush_interval + 1.0))
            if sender.outage_waited:
                return barrier.event.is_set() and barrier.ok
        if barrier.event.wait(_remaining(deadline)):
            return barrier.ok
        if ending:
            sender.outage_waited = True  # until the sender stores something again
        return False

    def drain(self, deadline: float) -> bool:
        """Wait until ``deadline`` for what is pending to be stored; delete stored spools."""
        waits = []
        for channel in self.channels():
            barrier = Barrier()
            channel.queue.append(barrier)
            waits.append((channel, barrier))
        self.kick()
        ok = True
        for channel, barrier in waits:
            self.wait(channel, barrier, max(0.0, deadline - time.monotonic()), ending=True)
            ok = ok and barrier.event.is_set()  # refused items were warned about already
        return ok

    def shutdown(self, deadline: float) -> bool:
        """DRAINING until ``deadline`` (or all is stored), then STOPPED: the one exit path.

        What is left stays in the spool, where the sender process goes on sending it."""
        if self.state is not State.RUNNING:
            return True
        self.state = State.DRAINING
        try:
            ok = self.drain(deadline)
            with contextlib.suppress(Exception):
                self.poll_acks()
        finally:
            self.state = State.STOPPED
            self._stop.set()
            self._kick.set()
            self._ack_kick.set()
            with self.lock:
                senders = list(self._senders.values())
                links = list(self._links.values())
            for sender in senders:
                sender.stop()
            for link in links:
                link.stop()
            for channel in self.channels():
                if channel.writer is not None and channel.pid == os.getpid():
                    with contextlib.suppress(OSError):
                        channel.writer.close(delete=not channel.unsettled)
        return ok


def _remaining(deadline: float | None, cap: float | None = None) -> float | None:
    if deadline is None:
        return cap
    left = max(0.0, deadline - time.monotonic())
    return left if cap is None else min(left, cap)


WAKE = object()  # put in a Sender's outbox to look at the heartbeat schedule again


class Sender:
    """The in-process side of one tracking URI: heartbeats, and sending what no spool
    could keep (a spool dir that is not writable), in order, with backoff."""

    def __init__(self, worker: Worker, uri: str, timeout: float) -> None:
        self.worker = worker
        self.uri = uri
        self.store = Store(uri, timeout=timeout, retries=False)  # the sender has its own backoff
        self.outbox: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self.down = False  # the last try failed with a transient error
        self.outage_waited = False  # a wait timed out since the last record was stored
        self._stopped = threading.Event()
        threading.Thread(target=self._loop, name="trainkit-heartbeat", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self.outbox.put(None)

    def _loop(self) -> None:
        while not self._stopped.is_set():
            try:
                item = self.outbox.get(timeout=self._until_heartbeat())
            except queue.Empty:
                item = None
            if item is not None and item is not WAKE:
                channel, record = item
                try:
                    self._deliver(channel, record)
                except Exception:  # this thread must go on
                    log.exception("trainkit-tracking sender failed on run %s", channel.run_id)
            try:
                self._heartbeats()
            except Exception:
                log.exception("trainkit-tracking heartbeat failed")

    def _deliver(self, channel: Channel, record: Record) -> None:
        attempt = 0
        while not self._stopped.is_set():
            try:
                if record["t"] == "a" and not os.path.exists(record["src"]):
                    raise FileNotFoundError(f"artifact {record['src']!r} no longer exists")
                refused = send_record(self.store, channel.run_id, record)
            except Exception as exc:
                if is_transient(exc) and not isinstance(exc, FileNotFoundError):
                    attempt += 1
                    self.down = True
                    delay = min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF)
                    log.debug("store %s unavailable (%s); retry in %.1fs", self.uri, exc, delay)
                    self._stopped.wait(delay)
                    continue
                channel.warn_kept(_what(record), str(exc))
                self._done(channel, record, ok=False)
                return
            self.down = self.outage_waited = False
            if refused:
                channel.warn_refused(refused)
            self._done(channel, record, ok=not refused)
            return

    def _done(self, channel: Channel, record: Record, *, ok: bool) -> None:
        with channel.lock:
            channel.memory_points -= len(record.get("m", ())) if record["t"] == "b" else 0
        channel.settle(record["n"], ok=ok, in_file=False)
        self.worker._maybe_close(channel)

    def _until_heartbeat(self) -> float:
        due = [c.next_heartbeat for c in self.worker.channels(self.uri) if c.heartbeat_on]
        return max(0.01, min(due, default=time.monotonic() + 1.0) - time.monotonic())

    def _heartbeats(self) -> None:
        if self.down:  # the store is down: a heartbeat would only hold back the data
            return
        now = time.monotonic()
        for channel in self.worker.channels(self.uri):
            if channel.heartbeat_on and channel.next_heartbeat <= now:
                channel.next_heartbeat = now + channel.heartbeat_interval
                try:
                    now_s = str(int(time.time()))
                    beat = {channel.heartbeat_tag: now_s}
                    if channel.holder_tag is not None:
                        beat[channel.holder_tag] = now_s
                    self.store.set_tags(channel.run_id, beat)
                except Exception as exc:  # a missed beat is harmless; the next one comes
                    log.debug("heartbeat of run %s failed: %s", channel.run_id, exc)


def _what(record: Record) -> str:
    return {"b": "a batch", "a": "an artifact", "e": "the end"}.get(record["t"], "a record")


_worker: Worker | None = None
_worker_lock = threading.Lock()


def get_worker() -> Worker:
    """The worker of this process, started on first use (again after a fork or a shutdown)."""
    global _worker
    # mlflow imports these; imported after interpreter shutdown began, they raise (they
    # register exit hooks), so a process that exits right after logging could not send.
    import concurrent.futures.process
    import concurrent.futures.thread  # noqa: F401

    from trainkit_tracking import _exit

    with _worker_lock:
        if _worker is None or _worker.pid != os.getpid() or _worker.state is State.STOPPED:
            _worker = Worker()
            _exit.install()
        return _worker


def shutdown_worker(deadline: float) -> bool:
    """Drain and stop this process's worker (if any) by ``deadline``; warn if data is left."""
    worker = _worker
    if worker is None or worker.pid != os.getpid():
        return True
    spool_dirs = sorted({str(c.spool_dir) for c in worker.channels()})
    ok = worker.shutdown(deadline)
    if not ok:
        from trainkit_tracking import _exit

        where = f"the rest is in the spool ({', '.join(spool_dirs)})"
        if worker.mode == "process":
            how = (
                "the sender process sends it once the store answers (for up to "
                f"{worker.linger:.0f} s); after that, or if the machine goes away first, "
                "send it with `trainkit-tracking sync`"
            )
        else:
            how = "send it with `trainkit-tracking sync`"
        _exit.warn_unsent(
            "trainkit-tracking: not everything was stored before exit (the tracking store "
            f"did not answer in time); {where}: {how}"
        )
    return ok


def _after_fork_in_child() -> None:
    # A fork copies neither threads nor ownership of held locks: start afresh.
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
