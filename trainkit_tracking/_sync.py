"""Getting spooled records into the store: the live background worker, and ``sync``.

One worker per process serves every run: a spooler thread drains the call-site queues
into batches and writes them to the spool (fsync once per flush interval), and a sender
thread per store sends them in order, marks them done, retries transient failures with
backoff and sets the heartbeat tag. Spooling has its own thread because an MLflow HTTP
call can block for minutes while the server is down. ``sync`` sends what a dead
process left in the spool.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import queue
import threading
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainkit_tracking._spool import (
    Record,
    SpoolFile,
    append_line,
    checksum,
    default_spool_dir,
    read_spool,
    send_record,
    spool_paths,
    try_lock,
)
from trainkit_tracking._store import Store, is_transient
from trainkit_tracking.errors import TrackingWarning

if TYPE_CHECKING:
    from trainkit_tracking._logging import Channel

log = logging.getLogger(__name__)

EXIT_TIMEOUT = 10.0  # bounded wait at interpreter exit; the rest stays in the spool
MAX_BACKOFF = 15.0


class Barrier:
    """Put in a run's queue by ``flush``: set once everything before it is settled."""

    __slots__ = ("event", "ok")

    def __init__(self) -> None:
        self.event = threading.Event()
        self.ok = False


class Worker:
    """The process-wide background worker serving every Channel of this process.

    One spooler thread, and one sender thread per tracking URI, so that a store that is
    down holds back only its own runs.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self._channels: list[Channel] = []
        self.lock = threading.Lock()
        self._kick = threading.Event()
        self._senders: dict[str, Sender] = {}
        threading.Thread(target=self._spool_loop, name="trainkit-spooler", daemon=True).start()

    def register(self, channel: Channel) -> None:
        with self.lock:
            if channel in self._channels:
                return
            self._channels.append(channel)
        if channel.heartbeat_on:  # wake the sender to take its heartbeat schedule into account
            self.sender(channel.tracking_uri).outbox.put((channel, Barrier()))

    def unregister(self, channel: Channel) -> None:
        with contextlib.suppress(ValueError):
            self._channels.remove(channel)  # the caller holds self.lock

    def kick(self) -> None:
        self._kick.set()

    def channels(self, uri: str | None = None) -> list[Channel]:
        with self.lock:
            return [c for c in self._channels if uri is None or c.tracking_uri == uri]

    def sender(self, uri: str) -> Sender:
        with self.lock:
            if uri not in self._senders:
                self._senders[uri] = Sender(self, uri)
            return self._senders[uri]

    def _spool_loop(self) -> None:
        while True:
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
                    if channel.writer is not None:
                        try:
                            channel.writer.append(records)
                        except OSError as exc:
                            channel.spool_failed(exc)
        for channel, _ in staged:
            if channel.writer is not None:
                try:
                    channel.writer.sync_to_disk()
                except OSError as exc:
                    channel.spool_failed(exc)
        # Handed to the sender only once on disk: a record is spooled before it is sent.
        for channel, out in staged:
            outbox = self.sender(channel.tracking_uri).outbox
            for item in out:
                outbox.put((channel, item))

    def drain(self, timeout: float) -> bool:
        """Send what is pending, waiting at most ``timeout``; delete fully stored spools."""
        deadline = time.monotonic() + timeout
        waits = []
        for channel in self.channels():
            barrier = Barrier()
            channel.queue.append(barrier)
            waits.append((channel, barrier))
        self.kick()
        ok = True
        for channel, barrier in waits:
            settled = barrier.event.wait(max(0.0, deadline - time.monotonic())) and barrier.ok
            ok = ok and settled
            with channel.lock:
                clean = settled and not channel.queue and not channel.outstanding
                if clean and channel.writer is not None and os.getpid() == channel.pid:
                    with contextlib.suppress(OSError):
                        channel.writer.close(delete=True)
        return ok


class Sender:
    """Sends the records of one tracking URI in order, with retries, and the heartbeats."""

    def __init__(self, worker: Worker, uri: str) -> None:
        self.worker = worker
        self.uri = uri
        self.store = Store(uri, attempts=1)  # the worker has its own backoff
        self.outbox: queue.SimpleQueue[tuple[Channel, Record | Barrier]] = queue.SimpleQueue()
        self.backing_off = False
        threading.Thread(target=self._loop, name="trainkit-sender", daemon=True).start()

    def _loop(self) -> None:
        try:
            # Import mlflow and open the store now, in the background: once the interpreter
            # shuts down, imports that register exit hooks (concurrent.futures) fail.
            self.store.client  # noqa: B018
        except Exception as exc:
            log.debug("opening the store %s failed (retried when sending): %s", self.uri, exc)
        while True:
            try:
                channel, item = self.outbox.get(timeout=self._until_heartbeat())
            except queue.Empty:
                pass
            else:
                try:
                    self._deliver(channel, item)
                except Exception:
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
        while True:
            try:
                if item["t"] == "a" and not os.path.exists(item["src"]):
                    raise FileNotFoundError(f"artifact {item['src']!r} no longer exists")
                send_record(self.store, channel.run_id, item)
            except Exception as exc:
                if item["t"] == "a" and attempt == 0:
                    self._note_checksum(channel, item)
                if is_transient(exc):
                    attempt += 1
                    self.backing_off = True
                    delay = min(0.5 * 2 ** (attempt - 1), MAX_BACKOFF)
                    log.debug("store %s unavailable (%s); retry in %.1fs", self.uri, exc, delay)
                    time.sleep(delay)
                    continue
                self._refused(channel, item, exc)
                return
            self.backing_off = False
            self._settle(channel, item, done=True)
            return

    def _note_checksum(self, channel: Channel, record: Record) -> None:
        with contextlib.suppress(OSError):
            digest = checksum(Path(record["src"]))
            if channel.writer is not None:
                channel.writer.note({"t": "s", "n": record["n"], "sha256": digest})

    def _refused(self, channel: Channel, record: Record, exc: Exception) -> None:
        """A non-transient failure: never retried here; the record stays in the spool."""
        channel.failed += 1
        what = {"b": "a batch", "a": "an artifact", "e": "the end"}.get(record["t"], "a record")
        where = (
            f"it stays in the spool ({channel.writer.path}); fix the cause and run "
            "`trainkit-tracking sync`"
            if channel.writer is not None and channel.writer.path is not None
            else "the spool is not writable, so it is lost"
        )
        if channel.failed == 1:
            message = (
                f"the tracking store refused {what} of run {channel.run_id}: {exc}; {where}. "
                "Later failures of this run are only logged."
            )
            try:
                warnings.warn(message, TrackingWarning, stacklevel=2)
            except Exception:  # a filter set to "error": this thread must go on
                log.warning("%s", message)
        else:
            log.warning("the store refused %s of run %s: %s", what, channel.run_id, exc)
        self._settle(channel, record, done=False)

    def _settle(self, channel: Channel, record: Record, *, done: bool) -> None:
        with channel.lock:
            channel.outstanding -= 1
            if done and channel.writer is not None:
                try:
                    channel.writer.mark_done(record["n"])
                except OSError as exc:
                    channel.spool_failed(exc)

    def _maybe_close(self, channel: Channel) -> None:
        """Close an ended run's spool once everything is settled; delete it if all was stored."""
        with self.worker.lock, channel.lock:
            if not channel.ended or channel.queue or channel.outstanding:
                return
            if channel.writer is not None:
                try:
                    channel.writer.close(delete=channel.failed == 0)
                except OSError as exc:
                    log.debug("closing the spool of run %s: %s", channel.run_id, exc)
            self.worker.unregister(channel)

    def _until_heartbeat(self) -> float:
        due = [c.next_heartbeat for c in self.worker.channels(self.uri) if c.heartbeat_on]
        return max(0.01, min(due, default=time.monotonic() + 1.0) - time.monotonic())

    def _heartbeats(self) -> None:
        if self.backing_off:  # the store is down: a heartbeat would only hold back the data
            return
        now = time.monotonic()
        for channel in self.worker.channels(self.uri):
            if channel.heartbeat_on and channel.next_heartbeat <= now:
                channel.next_heartbeat = now + channel.heartbeat_interval
                try:
                    beat = {channel.heartbeat_tag: str(int(time.time()))}
                    self.store.set_tags(channel.run_id, beat)
                except Exception as exc:
                    log.debug("heartbeat of run %s failed: %s", channel.run_id, exc)


_worker: Worker | None = None
_worker_lock = threading.Lock()


def get_worker() -> Worker:
    """The worker of this process, started on first use (again after a fork)."""
    global _worker
    # mlflow imports these; imported after interpreter shutdown began, they raise (they
    # register exit hooks), so a process that exits right after logging could not send.
    import concurrent.futures.process
    import concurrent.futures.thread  # noqa: F401

    with _worker_lock:
        if _worker is None or _worker.pid != os.getpid():
            _worker = Worker()
            atexit.register(_at_exit, _worker)
        return _worker


def _after_fork_in_child() -> None:
    # A fork copies neither threads nor ownership of held locks: start afresh.
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _at_exit(worker: Worker) -> None:
    if worker.pid == os.getpid() and not worker.drain(EXIT_TIMEOUT):
        log.warning(
            "trainkit-tracking: not everything was stored before exit; the rest is in the "
            "spool, send it with `trainkit-tracking sync`"
        )


# Recovery of a dead process's spool ----------------------------------------------


@dataclass
class SyncReport:
    """What ``sync`` did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    files: int = 0  # spool files read
    sent: int = 0  # records sent: batches, artifact uploads, run terminations
    metrics: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    terminated: int = 0
    busy: int = 0  # files held by a live process or by another sync: left alone
    other_store: int = 0  # files of another tracking URI than the one asked for
    dropped: list[str] = field(default_factory=list)  # artifacts gone or changed on disk
    errors: list[str] = field(default_factory=list)  # records the store did not take
    pending: int = 0  # unsent records left in the spool afterwards

    @property
    def ok(self) -> bool:
        return not self.errors


def pending(spool_dir: Path | None = None) -> int:
    """The number of spooled records (batches, uploads, terminations) not yet stored."""
    total = 0
    for path in spool_paths(spool_dir or default_spool_dir()):
        with contextlib.suppress(OSError):
            total += len(read_spool(path).pending)
    return total


def sync(
    spool_dir: Path | None = None,
    *,
    tracking_uri: str | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> SyncReport:
    """Send leftover spooled records to their store, exactly once.

    Each file is locked first: files of live processes and of a concurrent ``sync`` are
    skipped. Records go to the tracking URI recorded in their file (``tracking_uri``
    limits the sync to that store). A run's termination is sent after all its data and
    only when none of that data failed. Resending a record already stored (a crash
    between send and acknowledgement) stores nothing twice.
    """
    spool_dir = spool_dir or default_spool_dir()
    report = SyncReport(dry_run=dry_run)
    held: list[tuple[int, SpoolFile]] = []
    try:
        for path in spool_paths(spool_dir):
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # finished and deleted meanwhile
                continue
            if not try_lock(fd):
                os.close(fd)
                report.busy += 1
                continue
            spool = read_spool(path)
            report.files += 1
            if spool.tracking_uri is None or spool.run_id is None:
                report.errors.append(f"{path}: no header, not a trainkit spool file; left alone")
            elif tracking_uri is not None and spool.tracking_uri != tracking_uri:
                report.other_store += 1
            else:
                held.append((fd, spool))
                continue
            os.close(fd)
        runs: dict[tuple[str, str], list[SpoolFile]] = {}
        for _, spool in held:
            runs.setdefault((str(spool.tracking_uri), str(spool.run_id)), []).append(spool)
        total = sum(len(s.pending) for _, s in held)
        done = 0
        stores: dict[str, Store] = {}
        for (uri, run_id), spools in runs.items():
            todo = [(s, r) for s in spools for r in s.pending]
            todo.sort(key=lambda item: item[1]["t"] == "e")  # terminations last
            failed = False
            for spool, record in todo:
                done += 1
                if record["t"] == "e" and failed:
                    report.errors.append(
                        f"run {run_id}: not ended as {record['status']} because some of its "
                        "data was not stored"
                    )
                elif record["t"] == "a" and (reason := _artifact_problem(spool, record)):
                    report.dropped.append(f"run {run_id}: artifact {record['src']!r} {reason}")
                    if not dry_run:
                        append_line(spool.path, {"t": "x", "n": record["n"], "why": reason})
                        spool.done.add(record["n"])
                elif dry_run:
                    _count(report, record)
                else:
                    try:
                        send_record(stores.setdefault(uri, Store(uri)), run_id, record)
                    except Exception as exc:
                        failed = True
                        report.errors.append(f"run {run_id}: {_what(record)} not stored: {exc}")
                        if is_transient(exc):  # the store is down: try this run another time
                            break
                    else:
                        append_line(spool.path, {"t": "d", "n": record["n"]})
                        spool.done.add(record["n"])
                        _count(report, record)
                if progress is not None:
                    progress(done, total)
    finally:
        for fd, _ in held:
            os.close(fd)
    # Unlocked first (Windows cannot delete an open file); a sync that locks one of these
    # in between finds nothing pending in it.
    for _, spool in held:
        if not dry_run and not spool.pending:
            with contextlib.suppress(OSError):
                spool.path.unlink()
    report.pending = pending(spool_dir)
    return report


def _artifact_problem(spool: SpoolFile, record: Record) -> str | None:
    src = Path(record["src"])
    if not src.exists():
        return "no longer exists"
    expected = spool.checksums.get(record["n"])
    if expected is not None and checksum(src) != expected:
        return "changed since it was logged; not uploaded"
    return None


def _what(record: Record) -> str:
    if record["t"] == "a":
        return f"artifact {record['src']!r}"
    return {"b": "batch", "e": "end"}.get(record["t"], "record") + f" #{record['n']}"


def _count(report: SyncReport, record: Record) -> None:
    report.sent += 1
    if record["t"] == "b":
        report.metrics += len(record.get("m", ()))
        report.params += len(record.get("p", ()))
        report.tags += len(record.get("g", ()))
    elif record["t"] == "a":
        report.artifacts += 1
    elif record["t"] == "e":
        report.terminated += 1
