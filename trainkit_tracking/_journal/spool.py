"""The journal on disk: one append-only JSON-lines file per run per process, locked by its
writer while it lives, in a private spool directory.

The training process appends an entry here before anything sends it; the store's sender
marks it stored or set aside in the file's ``.ack`` sidecar (``ledger.py``). A writer lives
while it holds its file's lock: the one rule every reader uses (``writer_alive``). The
kernel releases the lock when the writer dies, and a forked child closes its inherited
copy, so a dead parent's file is never kept "live" by its children.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import stat
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.limits import MAX_BATCH_BYTES as MAX_BATCH_BYTES
from trainkit_tracking._core.redact import redact_value, warn
from trainkit_tracking._journal.ledger import Ledger, Record, line, read_lines, write_all
from trainkit_tracking._journal.ledger import ack_path as ack_path
from trainkit_tracking._journal.records import Point as Point
from trainkit_tracking._journal.records import make_batches as make_batches
from trainkit_tracking._process import hooks
from trainkit_tracking._process.file_lock import try_lock as try_lock
from trainkit_tracking.errors import TrackingError

FORMAT_VERSION = 2
SUFFIX = ".jsonl"
BLOB_DIR = "blobs"
# A fully settled segment larger than this is deleted and a new one started, so a long
# run's journal stays small.
ROTATE_BYTES = 8 * 1024 * 1024

_OPEN: weakref.WeakSet[SpoolWriter] = weakref.WeakSet()


def default_spool_dir(environ: Mapping[str, str] | None = None) -> Path:
    """Where the spool lives: ``$TRAINKIT_SPOOL_DIR``, else the user's cache directory.

    ``$XDG_CACHE_HOME/trainkit-tracking/spool``, else ``~/.cache/trainkit-tracking/spool``.
    """
    env = os.environ if environ is None else environ
    explicit = env.get(_env.TRAINKIT_SPOOL_DIR)
    if explicit:
        return Path(explicit).expanduser()
    cache = env.get(_env.XDG_CACHE_HOME)
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "trainkit-tracking" / "spool"


class JournalLost(OSError):
    """The journal file was deleted and cannot be made again; ``records`` are the entries
    it held that were not settled (the caller keeps them in memory)."""

    def __init__(self, message: str, records: list[Record]) -> None:
        super().__init__(message)
        self.records = records


class ForeignSpoolDir(TrackingError):
    """The spool directory belongs to another user: its entries would be theirs to read."""


def private_dir(path: Path) -> Path:
    """Create ``path`` (0700) or check that it is this user's; tighten its mode if needed.

    Raises ``ForeignSpoolDir`` for a directory another user owns, ``OSError`` when it
    cannot be made.
    """
    path.mkdir(parents=True, exist_ok=True, mode=0o700)
    if sys.platform == "win32":  # pragma: no cover - no POSIX owners or modes there
        return path
    info = path.stat()
    if info.st_uid != os.geteuid():
        raise ForeignSpoolDir(
            f"the spool directory {str(path)!r} belongs to another user (uid {info.st_uid}); "
            "what this process logs would be readable by them. Set TRAINKIT_SPOOL_DIR (or "
            "Tracker(spool_dir=...)) to a directory of your own"
        )
    if stat.S_IMODE(info.st_mode) & 0o077:
        os.chmod(path, 0o700)
    return path


_FALLBACK: dict[Path, Path] = {}


def usable_spool_dir(path: Path) -> Path:
    """``path``, or a fresh private directory instead when another user owns ``path`` (with
    one warning saying where the journal goes). A directory that cannot be made at all is
    returned as it is: the writer then keeps the journal in memory, and says so."""
    try:
        private_dir(path)
        return path
    except ForeignSpoolDir as exc:
        fallback = _FALLBACK.get(path)
        if fallback is None:
            fallback = _FALLBACK[path] = Path(tempfile.mkdtemp(prefix="trainkit-spool-"))
            warn(
                f"{exc}. This process journals into {str(fallback)!r} instead; "
                f"`trainkit-tracking sync --spool-dir {fallback}` sends what is left there"
            )
        return fallback
    except OSError:
        return path


def writer_alive(fd: int) -> bool:
    """Whether the writer of the journal file open as ``fd`` lives: the one rule.

    It lives while it holds the file's lock. False means the lock is now ours: the
    caller (a sender, ``sync``) finishes the file, and keeps ``fd`` open while it does.
    """
    return not try_lock(fd)


# Writing ---------------------------------------------------------------------------


class SpoolWriter:
    """The journal file of one run in this process: appends entries, rotates, and notices
    a file or directory deleted under it (the entries not yet settled are written again).

    Raises ``OSError`` (or ``ForeignSpoolDir``) from the constructor when the spool dir
    cannot be used; the caller then logs in memory only.
    """

    def __init__(self, spool_dir: Path, tracking_uri: str, run_id: str) -> None:
        self.spool_dir = spool_dir
        self.tracking_uri = tracking_uri
        self.run_id = run_id
        self._token = secrets.token_hex(4)
        self._segment = 0
        self._lock = threading.Lock()
        self._fd: int | None = None
        self._path: Path | None = None
        self._size = 0
        self._pending: set[int] = set()
        self._dirty = False
        self.closed = False
        self.recovered = 0  # entries written again after the journal was deleted under us
        self.recoveries = 0  # times the journal was made again
        private_dir(spool_dir)
        self._open_segment()
        _OPEN.add(self)

    @property
    def path(self) -> Path | None:
        return self._path

    def _open_segment(self) -> None:
        self._segment += 1
        name = f"{self.run_id}.{os.getpid()}.{self._token}.{self._segment:04d}"
        final = self.spool_dir / (name + SUFFIX)
        tmp = self.spool_dir / (name + ".tmp")
        # Created under a temporary name and locked before it becomes visible, so that no
        # reader ever sees a live file unlocked. Read-write: the entries of a file deleted
        # under us are read back from this descriptor.
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            try_lock(fd)
            header = {
                "t": "h",
                "v": FORMAT_VERSION,
                # Credentials never go to disk: senders and `sync` match the store by uri_id.
                "uri": redact_value(self.tracking_uri),
                "uri_id": uri_id(self.tracking_uri),
                "run": self.run_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "ts": int(time.time() * 1000),
            }
            data = line(header)
            write_all(fd, data)
            os.replace(tmp, final)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fd, self._path, self._size = fd, final, len(data)

    def append(self, records: Sequence[Record]) -> None:
        """Append entries (not yet fsync'd: see ``sync_to_disk``)."""
        data = b"".join(line(r) for r in records)
        with self._lock:
            if self.closed:
                raise OSError(f"the journal of run {self.run_id} is closed")
            if self._fd is None:
                self._open_segment()
            elif self._deleted():
                self._recover()
            assert self._fd is not None
            write_all(self._fd, data)
            self._size += len(data)
            self._pending.update(r["n"] for r in records)
            self._dirty = True

    def _deleted(self) -> bool:
        """Whether our file was deleted (or its directory) since we last wrote."""
        assert self._fd is not None
        try:
            return os.fstat(self._fd).st_nlink == 0
        except OSError:
            return True

    def _recover(self) -> None:
        """The journal was deleted under us: a new file holds what is not settled yet.

        Raises ``OSError`` when the spool dir cannot be made again (the caller then keeps
        what follows in memory, and says so).
        """
        assert self._fd is not None
        old = self._fd
        kept = [r for r in _read_fd(old) if r.get("n") in self._pending]
        try:
            private_dir(self.spool_dir)
            self._open_segment()
        except (OSError, TrackingError) as exc:
            os.close(old)
            self._fd, self._path, self.closed = None, None, True
            self._pending.clear()
            raise JournalLost(
                f"the journal was deleted and cannot be made again: {exc}", kept
            ) from exc
        os.close(old)
        if kept:
            assert self._fd is not None
            data = b"".join(line(r) for r in kept)
            write_all(self._fd, data)
            self._size += len(data)
        self.recovered += len(kept)
        self.recoveries += 1

    def sync_to_disk(self) -> None:
        with self._lock:
            if self._fd is not None and self._dirty:
                os.fsync(self._fd)
                self._dirty = False

    def settle(self, seq: int) -> None:
        """``seq`` is stored or set aside (its mark is in the ``.ack``); rotate when the
        segment is all settled and big."""
        with self._lock:
            self._pending.discard(seq)
            if self._fd is not None and not self._pending and self._size > ROTATE_BYTES:
                self._drop_segment()

    @property
    def settled(self) -> bool:
        """Whether every entry appended was stored or set aside."""
        with self._lock:
            return not self._pending

    def _drop_segment(self) -> None:
        assert self._fd is not None and self._path is not None
        with contextlib.suppress(OSError):
            self._path.unlink()
        with contextlib.suppress(OSError):
            ack_path(self._path).unlink()
        os.close(self._fd)
        self._fd, self._path, self._size = None, None, 0

    def close(self, *, delete: bool) -> None:
        """Release the lock; delete the file when ``delete`` or when every entry in it is
        settled (set-aside entries are in the set-aside log by then)."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._fd is None:
                return
            if delete or not self._pending:
                self._drop_segment()
            else:
                with contextlib.suppress(OSError):
                    os.fsync(self._fd)
                os.close(self._fd)
                self._fd = None

    def _forget_after_fork(self) -> None:
        """In a forked child: close the inherited descriptor without unlocking it (the
        lock belongs to the parent's file description), and never write here again."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
        self._fd, self.closed = None, True
        self._lock = threading.Lock()


def _read_fd(fd: int) -> list[Record]:
    records, offset, chunks = [], 0, []
    while True:
        chunk = os.pread(fd, 1 << 20, offset)
        if not chunk:
            break
        chunks.append(chunk)
        offset += len(chunk)
    for raw in b"".join(chunks).splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(raw)
            if isinstance(record, dict) and record.get("t") in ("b", "a", "e"):
                records.append(record)
    return records


def _after_fork_in_child() -> None:
    for writer in list(_OPEN):
        writer._forget_after_fork()


hooks.on_fork(_after_fork_in_child)


def uri_id(tracking_uri: str) -> str:
    """A stable id of a tracking URI, credentials included, that reveals none of it."""
    return hashlib.sha256(tracking_uri.encode("utf-8")).hexdigest()[:16]


# Reading ---------------------------------------------------------------------------


@dataclass
class SpoolFile:
    """What one journal file holds: its header, its entries, and their states."""

    path: Path
    tracking_uri: str | None = None  # credentials masked
    uri_id: str | None = None  # uri_id() of the real URI
    run_id: str | None = None
    started: int = 0  # header timestamp: orders the files of one run
    records: dict[int, Record] = field(default_factory=dict)
    ledger: Ledger | None = None
    corrupt_lines: int = 0

    @property
    def done(self) -> set[int]:
        """The entries stored or set aside."""
        assert self.ledger is not None
        return {n for n in self.records if self.ledger.is_settled(n)}

    @property
    def pending(self) -> list[Record]:
        return [r for n, r in sorted(self.records.items()) if n not in self.done]


def spool_paths(spool_dir: Path) -> list[Path]:
    """The journal files under ``spool_dir``, in name order (run, pid, token, segment)."""
    try:
        return sorted(p for p in spool_dir.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    except OSError:
        return []


def read_header(path: Path) -> Record | None:
    header = read_lines(path, 0, 64 << 10)[0]
    return header[0] if header and header[0].get("t") == "h" else None


def read_spool(path: Path) -> SpoolFile:
    """Parse a journal file and its marks; a torn last line (SIGKILL) is ignored."""
    spool = SpoolFile(path, ledger=Ledger(path))
    assert spool.ledger is not None
    legacy_marks = []
    with open(path, "rb") as fh:
        for raw in fh:
            try:
                record = json.loads(raw)
            except ValueError:
                spool.corrupt_lines += 1
                continue
            if not isinstance(record, dict):
                spool.corrupt_lines += 1
                continue
            kind = record.get("t")
            if kind == "h":
                spool.tracking_uri = record.get("uri")
                spool.uri_id = record.get("uri_id")
                spool.run_id = record.get("run")
                spool.started = int(record.get("ts") or 0)
            elif kind in ("b", "a", "e"):
                spool.records[int(record["n"])] = record
            else:
                legacy_marks.append(record)
    spool.ledger.read_marks_in(legacy_marks)
    spool.ledger.read_new()
    return spool
