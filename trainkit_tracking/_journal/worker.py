"""The background worker of a training process: call-site queues -> spool on disk.

One worker per process serves every run: a spooler thread drains the queues into batches
and appends them to each run's spool (fsync once per flush interval); the sender
(``sender.py``, a process of its own) sends them, and an ack thread here reads its marks
to settle ``flush`` and ``end``. States: RUNNING -> DRAINING -> STOPPED, ended once by
the exit path (``_process/hooks.py`` calls it).
"""

from __future__ import annotations

import contextlib
import enum
import os
import threading
import time
from pathlib import Path

from trainkit_tracking._core.redact import get_logger, warn
from trainkit_tracking._journal.channel import POINT_BYTES, Barrier, Channel, read_settings
from trainkit_tracking._journal.heartbeat import WAKE, Heartbeat
from trainkit_tracking._journal.sender_launch import Link
from trainkit_tracking._journal.spool import Record
from trainkit_tracking._process import hooks

log = get_logger(__name__)


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
        self._senders: dict[str, Heartbeat] = {}
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

    def sender(self, channel: Channel) -> Heartbeat:
        with self.lock:
            sender = self._senders.get(channel.tracking_uri)
            if sender is None:
                sender = Heartbeat(
                    channel.tracking_uri,
                    channel.timeout,
                    channels=self.channels,
                    settled=self._maybe_close,
                )
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


_worker: Worker | None = None
_worker_lock = threading.Lock()


def get_worker() -> Worker:
    """The worker of this process, started on first use (again after a fork or a shutdown)."""
    global _worker
    # mlflow imports these; imported after interpreter shutdown began, they raise (they
    # register exit hooks), so a process that exits right after logging could not send.
    import concurrent.futures.process
    import concurrent.futures.thread  # noqa: F401

    with _worker_lock:
        if _worker is None or _worker.pid != os.getpid() or _worker.state is State.STOPPED:
            _worker = Worker()
            # Runs end first (their exit callback drains the worker too); this one drains
            # a worker that serves no Run (a DDP node leader's system metrics).
            hooks.on_exit(_drain_at_exit, order=10)
        return _worker


def shutdown_worker(deadline: float) -> bool:
    """Drain and stop this process's worker (if any) by ``deadline``; warn if data is left."""
    worker = _worker
    if worker is None or worker.pid != os.getpid():
        return True
    spool_dirs = sorted({str(c.spool_dir) for c in worker.channels()})
    ok = worker.shutdown(deadline)
    if not ok:
        where = f"the rest is in the spool ({', '.join(spool_dirs)})"
        if worker.mode == "process":
            how = (
                "the sender process sends it once the store answers (for up to "
                f"{worker.linger:.0f} s); after that, or if the machine goes away first, "
                "send it with `trainkit-tracking sync`"
            )
        else:
            how = "send it with `trainkit-tracking sync`"
        hooks.warn_unsent(
            "trainkit-tracking: not everything was stored before exit (the tracking store "
            f"did not answer in time); {where}: {how}"
        )
    return ok


def _drain_at_exit(status: str, deadline: float) -> None:
    shutdown_worker(deadline)


def _after_fork_in_child() -> None:
    # A fork copies neither threads nor ownership of held locks: start afresh.
    global _worker, _worker_lock
    _worker, _worker_lock = None, threading.Lock()


hooks.on_fork(_after_fork_in_child)
