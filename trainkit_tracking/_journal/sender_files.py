"""The journal files of one store that its sender sends: found, read, their writers'
lives, finished; and what the sender did."""

from __future__ import annotations

import contextlib
import os
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainkit_tracking._core.redact import get_logger
from trainkit_tracking._journal.ledger import Ledger, Record, ack_path, read_lines
from trainkit_tracking._journal.sender_lock import hold_lock, lock_is_current
from trainkit_tracking._journal.spool import SUFFIX, private_dir, read_header, writer_alive
from trainkit_tracking.errors import TrackingError

log = get_logger(__name__)

READ_BYTES = 1 << 20  # read ahead of the sending by at most this much per file
SCAN = 0.5  # how often the directory is listed (writers also announce their files)


@dataclass
class JournalFile:
    """What the sender knows of one journal file."""

    path: Path
    fd: int
    ledger: Ledger
    run_id: str
    offset: int
    todo: deque[Record] = field(default_factory=deque)
    owned: bool = False  # its writer is gone: this sender holds its lock and finishes it
    eof: bool = False  # everything written so far has been read
    reply_port: int = 0  # where its writer listens for marks


@dataclass
class Progress:
    """What a sender did: entries stored, and items or entries set aside."""

    stored: int = 0
    set_aside: list[str] = field(default_factory=list)
    counts: dict[str, int] = field(default_factory=dict)  # metrics, params, tags, artifacts...


def header_end(path: Path) -> int:
    with open(path, "rb") as fh:
        return len(fh.readline())


def count(counts: dict[str, int], record: Record) -> None:
    kind = record.get("t")
    if kind == "b":
        for key, name in (("m", "metrics"), ("p", "params"), ("g", "tags")):
            counts[name] = counts.get(name, 0) + len(record.get(key) or ())
    elif kind == "a":
        counts["artifacts"] = counts.get("artifacts", 0) + 1
    elif kind == "e":
        counts["terminated"] = counts.get("terminated", 0) + 1


class StoreFiles:
    """The journal files of one store in a spool dir, as its sender sees them."""

    def __init__(
        self,
        spool_dir: Path,
        uid: str,
        *,
        lock_fd: int | None,
        accept: Callable[[str], bool] | None,
    ) -> None:
        self.spool_dir = spool_dir
        self.uid = uid
        self.lock_fd = lock_fd  # the store's sender lock, held by the caller
        self.accept = accept  # sync --experiment: which runs to send
        self.files: dict[Path, JournalFile] = {}
        self.ignored: set[Path] = set()  # other stores' files, and runs not accepted
        self.lost = False  # another sender took the store over: stop
        self.relocked = False
        self._last_scan = 0.0

    def scan(self, *, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_scan < SCAN:
            return
        self._last_scan = now
        if not self.keep_lock():
            self.lost = True
            return
        try:
            names = os.listdir(self.spool_dir)
        except OSError:
            names = []
        present = {self.spool_dir / n for n in names if n.endswith(SUFFIX)}
        for path in sorted(present - set(self.files) - self.ignored):
            self.add(path)
        for path, file in list(self.files.items()):
            if path not in present:  # deleted by its writer once everything was settled
                self.forget(file)
            elif not file.owned and not writer_alive(file.fd):
                file.owned, file.eof = True, False  # read what it wrote before it went
        self.ignored &= present

    def keep_lock(self) -> bool:
        """The spool dir deleted under us takes our lock file with it: take a new one (or,
        when another sender took it first or nothing is left to send, stop)."""
        if self.lock_fd is None or lock_is_current(self.spool_dir, self.uid, self.lock_fd):
            return True
        if not any(f.todo or not f.eof for f in self.files.values()):
            # Nothing unsent: the directory was removed on purpose (a temporary directory
            # cleaned up), so end without making it again. A writer that still lives makes
            # it again at its next write, and starts a sender then.
            log.info("the spool dir %s was removed with nothing left to send", self.spool_dir)
            return False
        try:
            private_dir(self.spool_dir)
            fd = hold_lock(self.spool_dir, self.uid)
        except (OSError, TrackingError):
            fd = None
        if fd is None:
            log.warning("another sender took the store over after the spool dir was deleted")
            return False
        os.dup2(fd, self.lock_fd)  # the caller closes lock_fd: it now holds the new lock
        os.close(fd)
        self.relocked = True  # the status file went with the directory: write it again
        return True

    def add(self, path: Path) -> JournalFile | None:
        if path in self.ignored:
            return None
        header = read_header(path)
        if header is None:
            return None  # not yet complete, or not a journal file: looked at again later
        run_id = str(header.get("run"))
        if header.get("uri_id") != self.uid or (self.accept and not self.accept(run_id)):
            self.ignored.add(path)
            return None
        try:
            fd = os.open(path, os.O_RDONLY)
        except OSError:
            return None
        ledger = Ledger(path)
        file = JournalFile(path=path, fd=fd, ledger=ledger, run_id=run_id, offset=header_end(path))
        ledger.read_new()
        self.files[path] = file
        return file

    def read(self, file: JournalFile) -> None:
        records, offset = read_lines(file.path, file.offset, READ_BYTES)
        file.eof = offset == file.offset
        file.offset = offset
        legacy = [r for r in records if r.get("t") in ("d", "r", "x")]  # 0.1 marks in the file
        if legacy:
            file.ledger.read_marks_in(legacy)
        for record in records:
            if record.get("t") in ("b", "a", "e") and not file.ledger.is_settled(int(record["n"])):
                file.todo.append(record)

    def finish(self, file: JournalFile) -> None:
        """A dead writer's file, all read and settled: delete it (set-aside entries are in
        the set-aside log)."""
        file.ledger.close()
        for path in (file.path, ack_path(file.path)):
            with contextlib.suppress(OSError):
                path.unlink()
        self.forget(file)

    def forget(self, file: JournalFile) -> None:
        file.ledger.close()
        with contextlib.suppress(OSError):
            os.close(file.fd)  # releases its lock if it was ours
        self.files.pop(file.path, None)

    def close(self) -> None:
        for file in list(self.files.values()):
            self.forget(file)
