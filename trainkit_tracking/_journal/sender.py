"""The sender: reads the spool files of one store, sends them in order and marks them done.

It runs in its own low-priority process (``python -m trainkit_tracking._journal.sender``), so the
store's work never runs in the training interpreter; one per spool directory and store,
held by a lock file. It survives the training process, sends what a SIGKILLed process
left, and ends by itself once nothing is left or after a bounded linger.
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainkit_tracking._core.redact import get_logger, redact_value
from trainkit_tracking._journal.sender_lock import hold_lock, status_path
from trainkit_tracking._journal.spool import (
    SUFFIX,
    AckLog,
    Record,
    ack_path,
    checksum,
    read_lines,
    send_record,
    try_lock,
    uri_id,
)
from trainkit_tracking._store.store import Store, is_transient

log = get_logger(__name__)

MAX_BACKOFF = 15.0
READ_BYTES = 1 << 20  # read ahead of the sending by at most this much per file
POLL = 0.01  # how often a live spool file is looked at for new records
SCAN = 0.25  # how often the directory is listed for new spool files
IDLE_EXIT = 3.0  # seconds with nothing to send and no live writer before the process ends
DEFAULT_LINGER = 3600.0  # seconds a store may stay down after the last writer died


@dataclass
class _File:
    """What the sender knows of one spool file."""

    path: Path
    acks: AckLog
    run_id: str = ""
    offset: int = 0
    todo: deque[Record] = field(default_factory=deque)
    settled: set[int] = field(default_factory=set)
    checksums: dict[int, str] = field(default_factory=dict)
    fd: int | None = None  # open, and locked once its writer is gone
    owned: bool = False  # the writer is gone: this sender finishes and deletes the file
    kept: bool = False  # a record was refused as a whole: the file is left for `sync`
    foreign: bool = False  # its own process sends it (TRAINKIT_SENDER=thread) while alive
    eof: bool = False  # everything written so far has been read


class SpoolSender:
    """Sends every spool file of one store in ``spool_dir``, exactly once with the marks.

    ``standalone``: the process of its own, which holds the sender lock and ends once no
    writer is alive and nothing is left (or the store stayed down for ``linger`` seconds).
    Else a thread of a training process (``TRAINKIT_SENDER=thread``) that sends only that
    process's own files, until ``stop()``; a file written so waits for its process.
    """

    def __init__(
        self,
        spool_dir: Path,
        tracking_uri: str,
        *,
        timeout: float,
        standalone: bool,
        linger: float = DEFAULT_LINGER,
        own_paths: Callable[[], set[Path]] | None = None,
    ) -> None:

        self.own_paths = own_paths  # a thread: the files of this process's live writers
        self.spool_dir = spool_dir
        self.uri = tracking_uri
        self.uid = uri_id(tracking_uri)
        self.store = Store(tracking_uri, timeout=timeout, retries=False)
        self.standalone = standalone
        self.linger = linger
        self.files: dict[Path, _File] = {}
        self.ignored: set[Path] = set()  # other stores' files, and files left for `sync`
        self.down_since: float | None = None
        self.attempt = 0
        self._stop = threading.Event()
        self._last_scan = 0.0
        self._last_status: dict[str, Any] = {}
        self._status_written = 0.0
        self.stored = 0  # records stored by this sender

    def stop(self) -> None:
        self._stop.set()

    # The loop ------------------------------------------------------------------

    def run(self) -> None:
        if self.standalone:
            self._write_status(True)  # who sends, from the start (doctor shows it)
        idle_since = time.monotonic()
        last_live = time.monotonic()
        while not self._stop.is_set():
            try:
                worked, waiting = self.step()
            except Exception:  # the sender must go on; the data stays in the spool
                log.exception("trainkit-tracking sender failed; retrying")
                worked, waiting = False, True
                self._stop.wait(1.0)
            now = time.monotonic()
            live = any(not f.owned for f in self.files.values())
            if live:
                last_live = now
            if worked or live or waiting:
                idle_since = now
            if self.standalone:
                self._write_status(waiting)
            if not self.standalone and not self.files and now - idle_since > IDLE_EXIT:
                break  # a thread with nothing to send: started again when needed
            if self.standalone and not live:
                if not waiting and now - idle_since > IDLE_EXIT:
                    break
                if waiting and self.down_since is not None and now - last_live > self.linger:
                    log.warning("the store stayed down; the rest is left for sync")
                    break
            if not worked:
                delay = self._backoff() if self.down_since is not None else POLL
                self._stop.wait(delay)
        self._close_all()
        self._stop.set()

    def step(self) -> tuple[bool, bool]:
        """One pass: find files, read new records, send. Returns (sent something, work left)."""
        now = time.monotonic()
        if now - self._last_scan >= SCAN:
            self._last_scan = now
            self._scan()
        worked = False
        for file in sorted(self.files.values(), key=lambda f: f.path.name):
            if file.foreign:
                if file.fd is None or not try_lock(file.fd):
                    continue  # its process sends it
                file.foreign, file.owned = False, True
                self._reopen(file)
            if not file.todo:
                self._read(file)
            if not file.todo and file.eof:
                self._maybe_finish(file)
                continue
            sent, ok = self._send_some(file)
            worked = worked or sent
            if not ok:  # the store is down: every file of it waits
                return worked, True
        waiting = any(f.todo for f in self.files.values())
        return worked, waiting

    def _backoff(self) -> float:
        return min(0.5 * 2.0 ** max(self.attempt - 1, 0), MAX_BACKOFF)

    # Files ---------------------------------------------------------------------

    def _scan(self) -> None:
        try:
            names = os.listdir(self.spool_dir)
        except OSError:
            return
        present = set()
        for name in names:
            if not name.endswith(SUFFIX):
                continue
            path = self.spool_dir / name
            present.add(path)
            if path in self.files or path in self.ignored:
                continue
            file = self._open(path)
            if file is None:
                self.ignored.add(path)
            else:
                self.files[path] = file
        for path in list(self.files):
            if path not in present:  # deleted by its writer once everything was stored
                self._forget(self.files[path])
        self.ignored &= present

    def _open(self, path: Path) -> _File | None:
        header, _ = read_lines(path, 0, 64 << 10)
        if not header or header[0].get("t") != "h" or header[0].get("uri_id") != self.uid:
            return None
        if self.own_paths is not None and path not in self.own_paths():
            return None
        file = _File(path=path, acks=AckLog(path), run_id=str(header[0].get("run")))
        file.foreign = self.own_paths is None and header[0].get("sender") == "thread"
        self._reopen(file)
        with contextlib.suppress(OSError):
            file.fd = os.open(path, os.O_RDONLY)
        return file

    def _read(self, file: _File) -> None:
        records, offset = read_lines(file.path, file.offset, READ_BYTES)
        file.eof = offset == file.offset or len(records) == 0
        file.offset = offset
        for record in records:
            kind = record.get("t")
            if kind in ("b", "a", "e") and int(record["n"]) not in file.settled:
                file.todo.append(record)
            elif kind in ("d", "r", "x"):  # marks written into the file itself by 0.1
                seq = int(record["n"])
                file.settled.add(seq)
                file.todo = deque(r for r in file.todo if r["n"] != seq)
        if records and not file.todo:
            file.eof = False  # only marks and done records: read on

    def _maybe_finish(self, file: _File) -> None:
        """Caught up with a file: once its writer is gone, read the last of it, then delete
        it (unless a record was kept for ``sync``: then it is left to ``sync``)."""
        if self.own_paths is not None:  # a thread: its process closes and deletes its files
            if file.path not in self.own_paths():
                self._forget(file)
            return
        if not file.owned:
            if file.fd is None or not try_lock(file.fd):
                return  # its writer is alive
            file.owned = True
            file.eof = False  # read what it wrote just before it went
            return
        if not file.kept:
            file.acks.close()
            for path in (file.path, ack_path(file.path)):
                with contextlib.suppress(OSError):
                    path.unlink()
        self._forget(file)
        self.ignored.add(file.path)

    def _reopen(self, file: _File) -> None:
        """Read ``file`` from its first record, skipping what its marks settled."""
        file.todo.clear()
        file.offset = _header_end(file.path)
        for mark in read_lines(ack_path(file.path), 0)[0]:
            if mark.get("t") in ("d", "r", "x", "k"):
                file.settled.add(int(mark["n"]))
                file.kept = file.kept or mark.get("t") == "k"
            elif mark.get("t") == "s":
                file.checksums[int(mark["n"])] = str(mark["sha256"])

    def _forget(self, file: _File) -> None:
        file.acks.close()
        if file.fd is not None:
            with contextlib.suppress(OSError):
                os.close(file.fd)
            file.fd = None
        self.files.pop(file.path, None)

    def _close_all(self) -> None:
        for file in list(self.files.values()):
            self._forget(file)

    # Sending -------------------------------------------------------------------

    def _send_some(self, file: _File, limit: int = 20) -> tuple[bool, bool]:
        sent = False
        for _ in range(limit):
            if not file.todo or self._stop.is_set():
                break
            record = file.todo[0]
            try:
                if record["t"] == "a" and not os.path.exists(record["src"]):
                    raise FileNotFoundError(f"artifact {record['src']!r} no longer exists")
                refused = send_record(self.store, file.run_id, record)
            except Exception as exc:
                if record["t"] == "a" and record["n"] not in file.checksums:
                    self._note_checksum(file, record)
                if is_transient(exc) and not isinstance(exc, FileNotFoundError):
                    self.attempt += 1
                    if self.down_since is None:
                        self.down_since = time.monotonic()
                    log.debug("store %s unavailable: %s", redact_value(self.uri), exc)
                    return sent, False
                file.kept = True
                what = {"b": "a batch", "a": "an artifact", "e": "the end"}[record["t"]]
                self._mark(file, {"t": "k", "n": record["n"], "why": [_reason(exc)], "what": what})
            else:
                if refused:
                    self._mark(file, {"t": "r", "n": record["n"], "why": refused})
                else:
                    self._mark(file, {"t": "d", "n": record["n"]})
                    self.stored += 1
            self.attempt, self.down_since = 0, None
            file.todo.popleft()
            sent = True
        return sent, True

    def _mark(self, file: _File, mark: Record) -> None:
        file.settled.add(mark["n"])
        try:
            file.acks.write(mark)
        except OSError as exc:  # a full disk: sent again later, which stores nothing twice
            log.debug("could not mark record %s of %s: %s", mark["n"], file.path, exc)

    def _note_checksum(self, file: _File, record: Record) -> None:
        with contextlib.suppress(OSError):
            digest = checksum(Path(record["src"]))
            file.checksums[record["n"]] = digest
            file.acks.write({"t": "s", "n": record["n"], "sha256": digest})

    # Status --------------------------------------------------------------------

    def _write_status(self, waiting: bool) -> None:
        status = {
            "pid": os.getpid(),
            "uri": redact_value(self.uri),
            "down": self.down_since is not None,
            "waiting": waiting,
            "files": len(self.files),
        }
        now = time.monotonic()
        if status == self._last_status and now - self._status_written < 5.0:
            return
        self._last_status, self._status_written = status, now
        status["updated"] = int(time.time())
        path = status_path(self.spool_dir, self.uid)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        with contextlib.suppress(OSError):
            tmp.write_text(json.dumps(status), encoding="utf-8")
            os.replace(tmp, path)


def _header_end(path: Path) -> int:
    with open(path, "rb") as fh:
        return len(fh.readline())


def _reason(exc: BaseException) -> str:
    text = " ".join(redact_value(str(exc)).split())
    return text if len(text) <= 300 else text[:297] + "..."


# The process -------------------------------------------------------------------


def main(argv: list[str]) -> int:
    """``python -m trainkit_tracking._journal.sender SPOOL_DIR TIMEOUT LINGER``; the URI on stdin."""
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
    fd = hold_lock(spool_dir, uri_id(uri))
    if fd is None:
        return 0  # another sender has this store
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    try:
        SpoolSender(spool_dir, uri, timeout=timeout, standalone=True, linger=linger).run()
    finally:
        with contextlib.suppress(OSError):
            status_path(spool_dir, uri_id(uri)).unlink()
        os.close(fd)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
