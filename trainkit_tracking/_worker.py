"""The background worker: call-site queues -> spool on disk -> store, with an explicit lifecycle.

One worker per process serves every run: a spooler thread drains the queues into batches
and appends them to each run's spool (fsync once per flush interval); a sender thread per
store sends them in order, marks them done, retries transient failures with backoff, drops
refused items one by one (recorded in the spool) and sets the heartbeat tag. States:
RUNNING -> DRAINING -> STOPPED, ended once by the exit path (``_exit.py``).
"""

from __future__ import annotations

import contextlib
import enum
import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Any

from trainkit_tracking._redact import get_logger, redact_value
from trainkit_tracking._spool import (
    Point,
    Record,
    SpoolWriter,
    checksum,
    make_batches,
    send_record,
)
from trainkit_tracking._store import Store, is_transient
from trainkit_tracking.errors import warn

log = get_logger(__name__)

MAX_BACKOFF = 15.0
_UNWRITABLE: set[Path] = set()  # spool dirs already warned about


class Barrier:
    """Put in a run's queue by ``flush``: ``spooled`` once on disk, ``event`` once settled."""

    __slots__ = ("event", "ok", "spooled")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.spooled = threading.Event()
        self.ok = False


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
        self.outstanding = 0  # records handed to the sender and not settled yet
        self.spool_ok = True
        self.writer: SpoolWriter | None = None
        self._seq = 0
        self.open_writer()

    def open_writer(self) -> None:
        try:
            self.writer = SpoolWriter(self.spool_dir, self.tracking_uri, self.run_id)
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
        return [*records, *barriers]


class State(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Worker:
    """The process-wide background worker serving every Channel of this process.

    One spooler thread, and one sender thread per tracking URI, so that a store that is
    down holds back only its own runs.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.state = State.RUNNING
        self._stop = threading.Event()
        self._channels: list[Channel] = []
        self.lock = threading.Lock()
        self._kick = threading.Event()
        self._senders: dict[str, Sender] = {}
        self._spooler = threading.Thread(
            target=self._spool_loop, name="trainkit-spooler", daemon=True
        )
        self._spooler.start()

    def register(self, channel: Channel) -> None:
        with self.lock:
            if channel in self._channels:
                return
            self._channels.append(channel)
        if channel.heartbeat_on:  # wake the sender to take its heartbeat schedule into account
            self.sender(channel).outbox.put((channel, Barrier()))

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
        staged: list[tuple[Channel, list[Record | Barrier]]] = []
        for channel in self.channels():
            with channel.lock:
                if not channel.queue:
                    continue
                out = channel.collect()
                records = [r for r in out if isinstance(r, dict)]
                channel.outstanding += len(records)
                staged.append((channel, out))
                if records and channel.spool_ok:
                    if channel.writer is None or channel.writer.closed:
                        channel.open_writer()
                    if channel.writer is not None and channel.spool_ok:
                        try:
                            channel.writer.append(records)
                        except OSError as exc:
                            channel.spool_failed(exc)
        for channel, _ in staged:
            if channel.writer is not None and channel.spool_ok:
                try:
                    channel.writer.sync_to_disk()
                except OSError as exc:
                    channel.spool_failed(exc)
        # Handed to the sender only once on disk: a record is spooled before it is sent.
        for channel, out in staged:
            outbox = self.sender(channel).outbox
            for item in out:
                if isinstance(item, Barrier):
                    item.spooled.set()
                outbox.put((channel, item))

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
        """Send what is pending until ``deadline``; delete fully stored spools."""
        waits = []
        for channel in self.channels():
            barrier = Barrier()
            channel.queue.append(barrier)
            waits.append((channel, barrier))
        self.kick()
        ok = True
        for channel, barrier in waits:
            self.wait(channel, barrier, max(0.0, deadline - time.monotonic()), ending=True)
            settled = barrier.event.is_set()  # refused items were warned about already
            ok = ok and settled
            with channel.lock:
                clean = settled and not channel.queue and not channel.outstanding
                if clean and channel.writer is not None and os.getpid() == channel.pid:
                    with contextlib.suppress(OSError):
                        channel.writer.close(delete=False)
        return ok

    def shutdown(self, deadline: float) -> bool:
        """DRAINING until ``deadline`` (or all is stored), then STOPPED: the one exit path."""
        if self.state is not State.RUNNING:
            return True
        self.state = State.DRAINING
        try:
            ok = self.drain(deadline)
        finally:
            self.state = State.STOPPED
            self._stop.set()
            self._kick.set()
            with self.lock:
                senders = list(self._senders.values())
            for sender in senders:
                sender.stop()
            for channel in self.channels():
                if channel.writer is not None and channel.pid == os.getpid():
                    with contextlib.suppress(OSError):
                        channel.writer.close(delete=False)
        return ok


def _remaining(deadline: float | None, cap: float | None = None) -> float | None:
    if deadline is None:
        return cap
    left = max(0.0, deadline - time.monotonic())
    return left if cap is None else min(left, cap)


class Sender:
    """Sends the records of one tracking URI in order, with retries, and the heartbeats."""

    def __init__(self, worker: Worker, uri: str, timeout: float) -> None:
        self.worker = worker
        self.uri = uri
        self.store = Store(uri, timeout=timeout, retries=False)  # the sender has its own backoff
        self.outbox: queue.SimpleQueue[tuple[Channel, Record | Barrier] | None] = (
            queue.SimpleQueue()
        )
        self.down = False  # the last try failed with a transient error
        self.outage_waited = False  # a wait timed out since the last record was stored
        self._stopped = threading.Event()
        threading.Thread(target=self._loop, name="trainkit-sender", daemon=True).start()

    def stop(self) -> None:
        self._stopped.set()
        self.outbox.put(None)

    def _loop(self) -> None:
        try:
            # Import mlflow and open the store now, in the background: once the interpreter
            # shuts down, imports that register exit hooks (concurrent.futures) fail.
            self.store.client  # noqa: B018
        except Exception as exc:
            log.debug("opening the store %s failed (retried when sending): %s", self.uri, exc)
        while not self._stopped.is_set():
            try:
                item = self.outbox.get(timeout=self._until_heartbeat())
            except queue.Empty:
                item = None
            if item is not None:
                channel, record = item
                try:
                    self._deliver(channel, record)
                except Exception:  # this thread must go on; the record stays in the spool
                    log.exception("trainkit-tracking sender failed on run %s", channel.run_id)
            try:
                self._heartbeats()
            except Exception:
                log.exception("trainkit-tracking heartbeat failed")

    def _deliver(self, channel: Channel, item: Record | Barrier) -> None:
        if isinstance(item, Barrier):
            item.ok = channel.failed == 0
            item.event.set()
            self._maybe_close(channel)
            return
        attempt = 0
        while not self._stopped.is_set():
            try:
                if item["t"] == "a" and not os.path.exists(item["src"]):
                    raise FileNotFoundError(f"artifact {item['src']!r} no longer exists")
                refused = send_record(self.store, channel.run_id, item)
            except Exception as exc:
                if item["t"] == "a" and attempt == 0:
                    self._note_checksum(channel, item)
                if is_transient(exc) and not isinstance(exc, FileNotFoundError):
                    attempt += 1
                    self.down = True
                    delay = min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF)
                    log.debug("store %s unavailable (%s); retry in %.1fs", self.uri, exc, delay)
                    self._stopped.wait(delay)
                    continue
                self._kept(channel, item, exc)
                return
            self.down = self.outage_waited = False
            if refused:
                self._refused(channel, item, refused)
            else:
                self._settle(channel, item, done=True)
            return

    def _note_checksum(self, channel: Channel, record: Record) -> None:
        with contextlib.suppress(OSError):
            digest = checksum(Path(record["src"]))
            if channel.writer is not None:
                channel.writer.note({"t": "s", "n": record["n"], "sha256": digest})

    def _kept(self, channel: Channel, record: Record, exc: Exception) -> None:
        """The store refused the whole record (a deleted run, a file gone): never retried
        here; it stays in the spool, for ``sync`` once the cause is fixed."""
        channel.failed += 1
        where = (
            f"it stays in the spool ({channel.writer.path}); fix the cause and run "
            "`trainkit-tracking sync`"
            if channel.writer is not None and channel.writer.path is not None
            else "the spool is not writable, so it is lost"
        )
        message = (
            f"the tracking store refused {_what(record)} of run {channel.run_id}: "
            f"{redact_value(str(exc))}; {where}."
        )
        if channel.failed == 1:
            warn(message + " Later failures of this run are only logged.")
        else:
            log.warning("%s", message)
        self._settle(channel, record, done=False)

    def _refused(self, channel: Channel, record: Record, reasons: list[str]) -> None:
        """Items refused for good (a bad or conflicting value): the rest of the record was
        stored; the refusal is recorded in the spool, so ``sync`` never retries them."""
        channel.failed += 1
        text = "; ".join(redact_value(r) for r in reasons[:5])
        more = f" (and {len(reasons) - 5} more)" if len(reasons) > 5 else ""
        message = (
            f"the tracking store refused {text}{more} of run {channel.run_id}; the rest of "
            "its data is stored. Fix the value (or log it under another key)."
        )
        warn(message)
        with channel.lock:
            channel.outstanding -= 1
            if channel.writer is not None:
                try:
                    channel.writer.mark_refused(record["n"], reasons)
                except OSError as exc:
                    log.debug("could not record the refusal in the spool: %s", exc)

    def _settle(self, channel: Channel, record: Record, *, done: bool) -> None:
        with channel.lock:
            channel.outstanding -= 1
            if done and channel.writer is not None:
                try:
                    channel.writer.mark_done(record["n"])
                except OSError as exc:  # kept in memory and written later by the writer
                    log.debug("could not mark record %s done: %s", record["n"], exc)

    def _maybe_close(self, channel: Channel) -> None:
        """Close an ended run's spool once everything is settled and delete it."""
        with self.worker.lock, channel.lock:
            if not channel.ended or channel.queue or channel.outstanding:
                return
            if channel.writer is not None:
                try:
                    # Deleted unless a record was kept for `sync` (see close()).
                    channel.writer.close(delete=False)
                except OSError as exc:
                    log.debug("closing the spool of run %s: %s", channel.run_id, exc)
            self.worker.unregister(channel)

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

        _exit.warn_unsent(
            "trainkit-tracking: not everything was stored before exit (the tracking store "
            f"did not answer in time); the rest is in the spool ({', '.join(spool_dirs)}): "
            "send it with `trainkit-tracking sync`"
        )
    return ok


def _after_fork_in_child() -> None:
    # A fork copies neither threads nor ownership of held locks: start afresh.
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
