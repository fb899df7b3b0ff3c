"""The sender of a store: reads every journal file of that store in a spool dir, sends the
entries in order, and settles each one through its file's ``Ledger``.

There is one per store and spool dir, whoever it is: the holder of the store's sender lock
(``sender_lock.py``). By default it is a low-priority process of its own (``python -m
trainkit_tracking._journal.sender``), so the store's work never runs in the training
interpreter; with ``TRAINKIT_SENDER=thread`` a thread of a training process; and ``sync``
becomes it in the foreground. Writers wake it (``wake.py``) and it wakes them when it marks
their entries, so that ``flush()`` costs the store's latency, not a poll.

It finishes (and deletes) the files of writers that died, and ends by itself: once no
writer lives and nothing is left, or once no writer lives and the store stayed down for
``linger`` seconds (the rest is then left to ``sync``).
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

from trainkit_tracking._core.redact import get_logger, redact_value
from trainkit_tracking._journal.delivery import Outcome, StoreDown, deliver
from trainkit_tracking._journal.ledger import Record, log_set_aside
from trainkit_tracking._journal.sender_files import SCAN, JournalFile, Progress, StoreFiles, count
from trainkit_tracking._journal.sender_lock import (
    hold_lock,
    lock_is_current,
    status_path,
    write_status,
)
from trainkit_tracking._journal.spool import SUFFIX, uri_id
from trainkit_tracking._journal.wake import Waker
from trainkit_tracking._process import hooks
from trainkit_tracking._store.store import Store

log = get_logger(__name__)

MAX_BACKOFF = 15.0
# Seconds with nothing to send and no live writer before a sender ends: a thread is started
# again when needed; a process lingers a little longer (it costs seconds to start).
IDLE_EXIT = {"process": 10.0, "thread": 3.0, "sync": 0.0}
DEFAULT_LINGER = 600.0  # seconds a store may stay down after the last writer is gone
BURST = 20  # entries sent from one file before the next file gets its turn


_SENDERS: weakref.WeakSet[Sender] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for sender in list(_SENDERS):
        sender._forget_after_fork()


hooks.on_fork(_after_fork_in_child)


class Sender:
    """Sends every journal file of one store in ``spool_dir``; see the module docstring.

    ``mode``: ``"process"`` (ends by itself), ``"thread"`` (until ``stop()``, or idle) or
    ``"sync"`` (``run_until_done``). The caller holds the store's sender lock (``lock_fd``).
    """

    def __init__(
        self,
        spool_dir: Path,
        tracking_uri: str,
        *,
        timeout: float,
        mode: str,
        linger: float = DEFAULT_LINGER,
        lock_fd: int | None = None,
        accept: Callable[[str], bool] | None = None,
        on_settled: Callable[[], None] | None = None,
    ) -> None:
        self.spool_dir = spool_dir
        self.uri = tracking_uri
        self.uid = uri_id(tracking_uri)
        self.store = Store(tracking_uri, timeout=timeout, retries=False)
        self.mode = mode
        self.linger = linger
        self.lock_fd = lock_fd  # the store's sender lock: closed (released) by close()
        self.left = 0  # entries still to send when it closed
        self.accept = accept  # sync --experiment: which runs to send
        self.on_settled = on_settled  # sync's progress bar: called once per entry
        self.journal = StoreFiles(spool_dir, self.uid, lock_fd=lock_fd, accept=accept)
        self.files = self.journal.files
        self.down_since: float | None = None
        self.retry_at = 0.0
        self.attempt = 0
        self.waker = Waker()
        self.progress = Progress()
        self._stop = threading.Event()
        self._status: dict[str, object] = {}
        self._status_at = 0.0
        _SENDERS.add(self)

    @property
    def down(self) -> bool:
        return self.down_since is not None

    def _forget_after_fork(self) -> None:
        """In a forked child: this sender's thread is not there. Close the descriptors it
        inherited without unlocking them (the locks are the parent's), so that the store's
        lock and the files' locks go when the parent goes."""
        for fd in [self.lock_fd, *(f.fd for f in self.files.values())]:
            if fd is not None:
                with contextlib.suppress(OSError):
                    os.close(fd)
        self.lock_fd = self.journal.lock_fd = None
        self.files.clear()
        self.waker.close()
        self._stop.set()

    def stop(self) -> None:
        self._stop.set()
        self.waker.send(self.waker.port, "stop")

    @property
    def stopped(self) -> bool:
        return self._stop.is_set()

    # The loops -------------------------------------------------------------------

    def run(self) -> None:
        """A sender process or thread: until it ends by itself (or ``stop()``)."""
        idle_since = last_live = time.monotonic()
        self._write_status(True)  # who sends, and where it listens, from the start
        try:
            while not self._stop.is_set():
                worked = self.step()
                now = time.monotonic()
                live = any(not f.owned for f in self.files.values())
                waiting = any(f.todo or not f.eof for f in self.files.values())
                if live:
                    last_live = now
                if worked or live or waiting:
                    idle_since = now
                self._write_status(waiting)
                if not live and not waiting and now - idle_since > IDLE_EXIT[self.mode]:
                    break
                if not live and self.down and now - last_live > self.linger:
                    log.warning(
                        "the store %s stayed down for %.0f s after its last writer ended; the "
                        "rest is left for `trainkit-tracking sync`",
                        redact_value(self.uri),
                        self.linger,
                    )
                    break
                if not worked:
                    self._wait(now)
        finally:
            self.close()

    def run_until_done(self, timeout: float) -> bool:
        """``sync``: send until every entry of the store's files is settled; False when the
        store did not answer for ``timeout`` seconds first."""
        self.journal.scan(force=True)
        stalled_since = time.monotonic()
        try:
            while not self._stop.is_set():
                worked = self.step()
                now = time.monotonic()
                if worked:
                    stalled_since = now
                if not any(f.todo or not f.eof for f in self.files.values()):
                    return True
                if now - stalled_since > timeout:
                    return False
                if not worked:
                    self._wait(now)
        finally:
            self.close()
        return False

    def _wait(self, now: float) -> None:
        busy = not self.down and any(f.todo or not f.eof for f in self.files.values())
        until = self.retry_at if self.down else now + (0.0 if busy else SCAN)
        for message in self.waker.wait(max(0.0, min(until, now + SCAN) - now)):
            self.heard(message)

    def heard(self, message: str) -> None:
        """A wake-up: a writer's new entries, or ``sync`` asking to retry now."""
        parts = message.split()
        if not parts:
            return
        if parts[0] == "r":
            self.retry_at, self.attempt = 0.0, 0
        elif parts[0] == "w" and len(parts) == 3 and parts[1].endswith(SUFFIX):
            path = self.spool_dir / os.path.basename(parts[1])
            file = self.files.get(path) or self.journal.add(path)
            if file is not None:
                file.eof = False
                with contextlib.suppress(ValueError):
                    file.reply_port = int(parts[2])

    def step(self) -> bool:
        """One pass: find files, read new entries, send some. Returns whether it sent."""
        self.journal.scan()
        if self.journal.lost:  # the spool dir was deleted, and another sender took over
            self._stop.set()
            return False
        if self.journal.relocked:
            self.journal.relocked, self._status = False, {}
        for message in self.waker.wait(0.0):
            self.heard(message)
        if self.down and time.monotonic() < self.retry_at:
            return False
        worked = False
        for file in sorted(self.files.values(), key=lambda f: f.path.name):
            if not file.todo and not file.eof:
                self.journal.read(file)
            if file.todo:
                sent, up = self._send_some(file)
                worked = worked or sent
                if not up:  # the store is down: every file of it waits
                    return worked
            if file.owned and file.eof and not file.todo:
                self.journal.finish(file)
        return worked

    # Files -----------------------------------------------------------------------

    def close(self) -> None:
        """Forget the files, and release the store's lock: the sender owns ``lock_fd``."""
        self.left = sum(len(f.todo) for f in self.files.values())
        self.journal.close()
        self.waker.close()
        self._stop.set()
        if self.lock_fd is not None:
            if self.mode == "process" and self.lock_intact():  # before the lock: the next
                # sender writes its own (and a lost lock's status file is not ours)
                with contextlib.suppress(OSError):
                    status_path(self.spool_dir, self.uid).unlink()
            with contextlib.suppress(OSError):
                os.close(self.lock_fd)
            self.lock_fd = self.journal.lock_fd = None

    # Sending ---------------------------------------------------------------------

    def _send_some(self, file: JournalFile) -> tuple[bool, bool]:
        """Send up to ``BURST`` entries of ``file``: (sent any, store up)."""
        sent = False
        try:
            for _ in range(BURST):
                if not file.todo or self._stop.is_set():
                    break
                record = file.todo[0]
                seq = int(record["n"])
                file.ledger.sending(seq)
                try:
                    outcome = deliver(self.store, file.run_id, record)
                except StoreDown as exc:
                    self._store_down(str(exc))
                    return sent, False
                self._settle(file, record, outcome)
                file.todo.popleft()
                sent = True
            if sent:
                self.down_since, self.attempt = None, 0
            return sent, True
        finally:
            if sent:
                self.waker.send(file.reply_port, f"a {file.path.name}")

    def _store_down(self, why: str) -> None:
        self.attempt += 1
        now = time.monotonic()
        if self.down_since is None:
            self.down_since = now
        self.retry_at = now + min(0.5 * 2.0 ** (self.attempt - 1), MAX_BACKOFF)
        log.debug("store %s unavailable: %s", redact_value(self.uri), why)

    def _settle(self, file: JournalFile, record: Record, outcome: Outcome) -> None:
        seq = int(record["n"])
        for aside in outcome.aside:
            try:
                log_set_aside(
                    self.spool_dir,
                    uri=self.uri,
                    uri_id=self.uid,
                    run_id=file.run_id,
                    what=aside.what,
                    origin=aside.origin,
                    why=aside.why,
                    record=aside.record,
                )
            except OSError as exc:  # the warning and the mark still say it
                log.warning("could not keep %s of run %s: %s", aside.what, file.run_id, exc)
            self.progress.set_aside.append(f"run {file.run_id}: {aside.what} ({aside.why})")
            log.warning("set aside %s of run %s: %s", aside.what, file.run_id, aside.why)
        try:
            if outcome.whole:
                aside = outcome.aside[0]
                file.ledger.set_aside(seq, aside.what, aside.origin, aside.why)
            else:
                file.ledger.stored(seq, [f"{a.what} ({a.why})" for a in outcome.aside])
                self.progress.stored += 1
                count(self.progress.counts, record)
        except OSError as exc:  # a full disk: sent again later, which stores nothing twice
            log.debug("could not mark %s of %s: %s", seq, file.path, exc)
        if self.on_settled is not None:
            self.on_settled()

    # Status ----------------------------------------------------------------------

    def lock_intact(self) -> bool:
        """Whether the lock file this sender holds is still the spool dir's."""
        return self.lock_fd is None or lock_is_current(self.spool_dir, self.uid, self.lock_fd)

    def _write_status(self, waiting: bool) -> None:
        status: dict[str, object] = {
            "pid": os.getpid(),
            "port": self.waker.port,
            "mode": self.mode,
            "uri": redact_value(self.uri),
            "down": self.down,
            "waiting": waiting,
            "files": len(self.files),
            "set_aside": len(self.progress.set_aside),
        }
        now = time.monotonic()
        if status == self._status and now - self._status_at < 5.0:
            return
        first = not self._status  # at start, and again after the spool dir was made again
        self._status, self._status_at = status, now
        # Never a file in a spool dir being removed: an update replaces the status file
        # only while it is there (removing the directory takes it first or last).
        if self.lock_intact() and (first or status_path(self.spool_dir, self.uid).exists()):
            write_status(self.spool_dir, self.uid, status)


# The process -----------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``python -m trainkit_tracking._journal.sender SPOOL_DIR TIMEOUT LINGER``; the URI on
    stdin (never on the command line)."""
    spool_dir = Path(argv[0])
    timeout, linger = float(argv[1]), float(argv[2])
    uri = sys.stdin.readline().strip()
    sys.stdin.close()
    if hasattr(os, "nice"):
        with contextlib.suppress(OSError):
            os.nice(10)  # the training process comes first
    # In a session of its own, Linux's autogroup scheduling would weigh the sender like the
    # whole training session whatever its nice: give its autogroup the same nice.
    with contextlib.suppress(OSError), open("/proc/self/autogroup", "w") as group:
        group.write("10")
    fd = None
    for _ in range(20):  # someone may be testing the lock for a moment
        fd = hold_lock(spool_dir, uri_id(uri))
        if fd is not None:
            break
        time.sleep(0.01)
    if fd is None:
        return 0  # another sender has this store
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    # The sender owns the lock from here: its status file and the lock go when it ends.
    Sender(spool_dir, uri, timeout=timeout, mode="process", linger=linger, lock_fd=fd).run()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
