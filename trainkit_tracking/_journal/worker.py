"""The background worker of a training process: call-site queues -> journal on disk.

One worker per process serves every run: a spooler thread drains the queues into batches,
appends them to each run's journal file and wakes the store's sender (``sender.py``, by
default a process of its own); an ack thread here, woken by the sender, reads its marks
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
from trainkit_tracking._journal.ledger import Record
from trainkit_tracking._journal.sender_launch import Link
from trainkit_tracking._journal.wake import Waker
from trainkit_tracking._process import hooks

log = get_logger(__name__)


class State(enum.Enum):
    RUNNING = "running"
    DRAINING = "draining"
    STOPPED = "stopped"


class Worker:
    """The process-wide background worker serving every Channel of this process.

    A spooler thread writes the queues to the journal and wakes the store's sender; an
    ack thread, woken by the sender, reads its marks and settles what waits on them; a
    light thread per tracking URI sets the heartbeats (and sends what no journal could
    keep), so that a store that is down holds back only its own runs.
    """

    def __init__(self) -> None:
        self.pid = os.getpid()
        self.state = State.RUNNING
        self._stop = threading.Event()
        self._channels: list[Channel] = []
        self.lock = threading.Lock()
        self._kick = threading.Event()
        self.waker = Waker()  # the sender's marks wake the ack thread here
        self._beats: dict[str, Heartbeat] = {}
        self._links: dict[tuple[Path, str], Link] = {}
        self._woken: dict[Path, float] = {}  # journal file -> when its sender was last woken
        _, _, memory_mb = read_settings(os.environ)  # validated here: a bad value fails early
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
        if channel.heartbeat_on:  # wake the heartbeat to take its schedule into account
            self.heartbeat(channel).outbox.put(WAKE)

    def unregister(self, channel: Channel) -> None:
        with contextlib.suppress(ValueError):
            self._channels.remove(channel)  # the caller holds self.lock

    def kick(self) -> None:
        self._kick.set()

    def channels(self, uri: str | None = None) -> list[Channel]:
        with self.lock:
            return [c for c in self._channels if uri is None or c.tracking_uri == uri]

    def heartbeat(self, channel: Channel) -> Heartbeat:
        with self.lock:
            beat = self._beats.get(channel.tracking_uri)
            if beat is None:
                beat = Heartbeat(
                    channel.tracking_uri,
                    channel.timeout,
                    channels=self.channels,
                    settled=self._maybe_close,
                )
                self._beats[channel.tracking_uri] = beat
            return beat

    def link(self, channel: Channel) -> Link:
        key = (channel.spool_dir, channel.tracking_uri)
        with self.lock:
            link = self._links.get(key)
            if link is None:
                # Read now, not when the worker started: a store's sender is decided when
                # this process first journals for it.
                mode, linger, _ = read_settings(os.environ)
                link = Link(
                    channel.spool_dir,
                    channel.tracking_uri,
                    timeout=channel.timeout,
                    linger=linger,
                    mode=mode,
                )
                self._links[key] = link
            return link

    def store_down(self, channel: Channel) -> bool:
        beat = self.heartbeat(channel)
        if beat.down or beat.outage_waited:
            return True
        return channel.in_file > 0 and bool(self.link(channel).status().get("down"))

    # Spooling --------------------------------------------------------------------

    def _spool_loop(self) -> None:
        while not self._stop.is_set():
            tick = min((c.flush_interval for c in self.channels()), default=1.0)
            kicked = self._kick.wait(max(tick, 0.001))
            self._kick.clear()
            try:
                self.spool_once()
                if not kicked:  # once per flush interval: onto the disk itself
                    self._sync_to_disk()
            except Exception:  # the worker must never die; the data stays queued
                log.exception("trainkit-tracking spooler failed; retrying")

    def _sync_to_disk(self) -> None:
        for channel in self.channels():
            writer = channel.writer
            if writer is not None and channel.spool_ok and channel.pid == os.getpid():
                try:
                    writer.sync_to_disk()
                except OSError as exc:
                    channel.spool_failed(exc)

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
                refused = channel.append(records) if records else []
                in_file = [] if refused is not None else records
                channel.in_file += len(in_file)
                in_memory = self._hold(channel, refused) if refused else []
                staged.append((channel, in_file, in_memory, barriers))
        # An entry is in the journal before anything sends it; the sender is woken at once
        # (fsync is the periodic pass's: a flush waits for the store, not for the disk).
        for channel, in_file, in_memory, barriers in staged:
            for barrier in barriers:
                barrier.spooled.set()
            if in_file:
                self._wake_sender(channel)
            if in_memory:
                outbox = self.heartbeat(channel).outbox
                for record in in_memory:
                    outbox.put((channel, record))
            with channel.lock:
                channel.release()

    def _wake_sender(self, channel: Channel) -> None:
        link = self.link(channel)
        link.ensure()
        writer = channel.writer
        if writer is not None and writer.path is not None:
            link.wake(self.waker, writer.path.name)
            self._woken[writer.path] = time.monotonic()

    def _hold(self, channel: Channel, records: list[Record]) -> list[Record]:
        """Entries no journal keeps, sent from memory: bounded, the excess is dropped."""
        kept = []
        for record in records:
            points = len(record.get("m", ())) if record["t"] == "b" else 0
            if points and channel.memory_points + points > self.max_memory_points:
                channel.dropped += points
                channel.unsettled.discard(record["n"])
                channel.aside.add(record["n"])
                if channel.dropped == points:
                    warn(
                        f"run {channel.run_id}: the store does not answer and the journal cannot "
                        f"be written, so unsent points are held in memory up to "
                        f"TRAINKIT_MAX_MEMORY_MB; beyond it they are dropped (from now on)"
                    )
                continue
            channel.memory_points += points
            kept.append(record)
        return kept

    # Acknowledgements ------------------------------------------------------------

    def _ack_loop(self) -> None:
        while not self._stop.is_set():
            waiting = False
            try:
                waiting = self.poll_acks()
            except Exception:
                log.exception("trainkit-tracking could not read the sender's marks; retrying")
            # Woken by the sender's marks; the timeout only covers a lost wake-up.
            self.waker.wait(0.1 if waiting else 0.5)

    def poll_acks(self) -> bool:
        """Settle what the sender marked; returns whether a flush waits on a mark."""
        waiting = False
        now = time.monotonic()
        for channel in self.channels():
            if not channel.in_file:
                self._maybe_close(channel)
                continue
            stored = False
            for settled in channel.read_marks():
                if not settled.ok:
                    channel.warn_aside(settled)
                stored = stored or settled.ok
                channel.settle(settled.seq, ok=settled.ok, in_file=True)
            if stored:
                self.heartbeat(channel).outage_waited = False
            if channel.in_file:
                link = self.link(channel)
                link.ensure()  # a sender that died is started again
                writer = channel.writer
                if channel.barriers and writer is not None and writer.path is not None:
                    waiting = True
                    if now - self._woken.get(writer.path, 0.0) > 0.5:
                        self._wake_sender(channel)  # a lost wake-up, or a new sender
            self._maybe_close(channel)
        return waiting

    def _maybe_close(self, channel: Channel) -> None:
        """Close an ended run's journal once everything is settled, and delete it."""
        with self.lock, channel.lock:
            if not channel.ended or channel.queue or channel.unsettled:
                return
            if channel.writer is not None and channel.pid == os.getpid():
                if channel.writer.path is not None:
                    self._woken.pop(channel.writer.path, None)
                try:
                    channel.writer.close(delete=False)  # deleted: nothing in it is unsettled
                except OSError as exc:
                    log.debug("closing the journal of run %s: %s", channel.run_id, exc)
            self.unregister(channel)

    # Waiting ---------------------------------------------------------------------

    def wait(
        self, channel: Channel, barrier: Barrier, timeout: float | None, *, ending: bool = False
    ) -> bool:
        """Wait for ``barrier``: its ``ok`` once settled, False at ``timeout``.

        ``ending`` (a run's end, the exit path): while the store is down, only the first
        such wait pays its timeout; later ones (the runs of a nested ``with`` exiting one
        by one) return once their entries are on disk, so that ending N runs never takes
        N timeouts. An explicit ``flush(timeout)`` always waits as asked.
        """
        beat = self.heartbeat(channel)
        deadline = None if timeout is None else time.monotonic() + timeout
        if ending and beat.outage_waited:
            barrier.spooled.wait(_remaining(deadline, cap=channel.flush_interval + 1.0))
            if beat.outage_waited:
                return barrier.event.is_set() and barrier.ok
        if barrier.event.wait(_remaining(deadline)):
            return barrier.ok
        if ending:
            beat.outage_waited = True  # until the sender stores something again
        return False

    def drain(self, deadline: float) -> bool:
        """Wait until ``deadline`` for what is pending to be stored."""
        waits = []
        for channel in self.channels():
            barrier = Barrier()
            channel.queue.append(barrier)
            waits.append((channel, barrier))
        self.kick()
        ok = True
        for channel, barrier in waits:
            self.wait(channel, barrier, max(0.0, deadline - time.monotonic()), ending=True)
            ok = ok and barrier.event.is_set()  # set-aside items were warned about already
        return ok

    def shutdown(self, deadline: float) -> bool:
        """DRAINING until ``deadline`` (or all is stored), then STOPPED: the one exit path.

        What is left stays in the journal, where the sender goes on sending it."""
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
            with self.lock:
                beats = list(self._beats.values())
                links = list(self._links.values())
            for beat in beats:
                beat.stop()
            for link in links:
                link.stop()
            for channel in self.channels():
                if channel.writer is not None and channel.pid == os.getpid():
                    with contextlib.suppress(OSError):
                        channel.writer.close(delete=not channel.unsettled)
            self.waker.close()
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
    with worker.lock:  # after the drain: it may have started the first sender
        processes = [link for link in worker._links.values() if link.mode == "process"]
    if not ok:
        where = f"the rest is in the spool ({', '.join(spool_dirs)})"
        if processes:
            linger = max(link.linger for link in processes)
            how = (
                "the sender process sends it once the store answers (for up to "
                f"{linger:.0f} s); after that, or if the machine goes away first, "
                "`trainkit-tracking sync` sends it"
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
    # A fork copies neither threads nor ownership of held locks: start afresh (and close
    # the parent's wake-up socket, which is the parent's).
    global _worker, _worker_lock
    if _worker is not None:
        _worker.waker.close()
    _worker, _worker_lock = None, threading.Lock()


hooks.on_fork(_after_fork_in_child)
