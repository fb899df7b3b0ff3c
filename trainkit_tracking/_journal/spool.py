"""The on-disk spool: one append-only JSON-lines file per run per process, locked while in use.

The training process writes a record here before anything sends it; whoever sends it (the
sender, or ``sync``) marks it done in the file's ``.ack`` sidecar once the store took it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import secrets
import socket
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.limits import MAX_BATCH_BYTES as MAX_BATCH_BYTES
from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._journal.records import Point as Point
from trainkit_tracking._journal.records import Record as Record
from trainkit_tracking._journal.records import checksum as checksum
from trainkit_tracking._journal.records import make_batches as make_batches
from trainkit_tracking._journal.records import remove_blob as remove_blob
from trainkit_tracking._journal.records import send_record as send_record
from trainkit_tracking._process.file_lock import try_lock as try_lock

FORMAT_VERSION = 1
SUFFIX = ".jsonl"
ACK_SUFFIX = ".ack"  # the marks of a spool file, written only by whoever sends it
BLOB_DIR = "blobs"
# A fully acknowledged segment larger than this is deleted and a new one started, so a
# long run's spool stays small.
ROTATE_BYTES = 8 * 1024 * 1024


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


# Writing -----------------------------------------------------------------------


class SpoolWriter:
    """The spool of one run in this process: appends records, marks them done, rotates.

    Raises ``OSError`` from the constructor when the spool dir is not writable; the
    caller then logs in memory only.
    """

    def __init__(
        self, spool_dir: Path, tracking_uri: str, run_id: str, *, sender: str = "process"
    ) -> None:
        self.spool_dir = spool_dir
        self.sender = sender  # "thread": this process sends the file itself
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
        spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self._open_segment()

    @property
    def path(self) -> Path | None:
        return self._path

    def _open_segment(self) -> None:
        self._segment += 1
        name = f"{self.run_id}.{os.getpid()}.{self._token}.{self._segment:04d}"
        final = self.spool_dir / (name + SUFFIX)
        tmp = self.spool_dir / (name + ".tmp")
        # Created under a temporary name and locked before it becomes visible, so a
        # concurrent `sync` never sees an unlocked live file.
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND, 0o600)
        try:
            try_lock(fd)
            header = {
                "t": "h",
                "v": FORMAT_VERSION,
                # Credentials never go to disk: `sync` matches the store by uri_id.
                "uri": redact_value(self.tracking_uri),
                "uri_id": uri_id(self.tracking_uri),
                "run": self.run_id,
                "pid": os.getpid(),
                "host": socket.gethostname(),
                "sender": self.sender,
                "ts": int(time.time() * 1000),
            }
            data = _line(header)
            _write_all(fd, data)
            os.replace(tmp, final)
        except BaseException:
            os.close(fd)
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise
        self._fd, self._path, self._size = fd, final, len(data)

    def append(self, records: Sequence[Record]) -> None:
        """Append records (not yet fsync'd: see ``sync_to_disk``)."""
        data = b"".join(_line(r) for r in records)
        with self._lock:
            if self.closed:
                raise OSError(f"spool of run {self.run_id} is closed")
            if self._fd is None:
                self._open_segment()
            assert self._fd is not None
            _write_all(self._fd, data)
            self._size += len(data)
            self._pending.update(r["n"] for r in records)
            self._dirty = True

    def sync_to_disk(self) -> None:
        with self._lock:
            if self._fd is not None and self._dirty:
                os.fsync(self._fd)
                self._dirty = False

    def note(self, record: Record) -> None:
        """Append a side record (e.g. an artifact checksum) without tracking it as pending."""
        with self._lock:
            if self._fd is not None:
                data = _line(record)
                _write_all(self._fd, data)
                self._size += len(data)

    def settle(self, seq: int) -> None:
        """``seq`` was stored or refused (its mark is in the ack file); rotate when the
        segment is all settled and big."""
        with self._lock:
            self._pending.discard(seq)
            if self._fd is not None and not self._pending and self._size > ROTATE_BYTES:
                self._drop_segment()

    @property
    def settled(self) -> bool:
        """Whether every record appended was acknowledged or refused."""
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
        """Release the lock; delete the file when ``delete`` or when everything in it was
        settled (then nothing in it is for ``sync``)."""
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


def uri_id(tracking_uri: str) -> str:
    """A stable id of a tracking URI, credentials included, that reveals none of it."""
    return hashlib.sha256(tracking_uri.encode("utf-8")).hexdigest()[:16]


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


# Records are plain data built here: skipping the circular-reference check saves a quarter
# of the encoding, which is most of what the training process pays to log.
_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def _line(record: Record) -> bytes:
    return (_ENCODE(record) + "\n").encode("utf-8")


def ack_path(spool_path: Path) -> Path:
    return spool_path.with_suffix(ACK_SUFFIX)


class AckLog:
    """The marks of one spool file: done ("d"), refused items ("r"), kept for ``sync``
    ("k"), dropped ("x") and artifact checksums ("s"). Written by the one sender of the
    file at a time (the sender lock, or the file's own lock for ``sync``)."""

    def __init__(self, spool_path: Path) -> None:
        self.path = ack_path(spool_path)
        self._fd: int | None = None

    def write(self, record: Record) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        _write_all(self._fd, _line(record))

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


def read_lines(path: Path, offset: int, limit: int | None = None) -> tuple[list[Record], int]:
    """The complete JSON lines of ``path`` after byte ``offset`` (at most about ``limit``
    bytes), and the offset after the last one: a line still being written waits."""
    try:
        with open(path, "rb") as fh:
            fh.seek(offset)
            data = fh.read() if limit is None else fh.read(limit)
    except OSError:  # gone (deleted once all was stored), or its directory is
        return [], offset
    end = data.rfind(b"\n") + 1
    if end == 0 and limit is not None and len(data) >= limit:  # a line longer than the limit
        return read_lines(path, offset, limit * 4)
    records = []
    for raw in data[:end].splitlines():
        try:
            record = json.loads(raw)
        except ValueError:
            continue  # a torn line (a write cut by SIGKILL, then appended after)
        if isinstance(record, dict):
            records.append(record)
    return records, offset + end


# Reading -----------------------------------------------------------------------


@dataclass
class SpoolFile:
    """What one spool file holds: its header and its records, done or not."""

    path: Path
    tracking_uri: str | None = None  # credentials masked
    uri_id: str | None = None  # uri_id() of the real URI (files written since 0.2)
    run_id: str | None = None
    started: int = 0  # header timestamp: orders the files of one run
    records: dict[int, Record] = field(default_factory=dict)
    done: set[int] = field(default_factory=set)
    checksums: dict[int, str] = field(default_factory=dict)
    refused: dict[int, list[str]] = field(default_factory=dict)
    kept: dict[int, list[str]] = field(default_factory=dict)  # refused as a whole: for sync
    corrupt_lines: int = 0

    @property
    def pending(self) -> list[Record]:
        return [r for n, r in sorted(self.records.items()) if n not in self.done]


def spool_paths(spool_dir: Path) -> list[Path]:
    """The spool files under ``spool_dir``, in name order (run, pid, token, segment)."""
    try:
        return sorted(p for p in spool_dir.iterdir() if p.name.endswith(SUFFIX) and p.is_file())
    except FileNotFoundError:
        return []


def read_spool(path: Path) -> SpoolFile:
    """Parse a spool file; a torn last line (a write cut by SIGKILL) is ignored."""
    spool = SpoolFile(path)
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
                _apply_mark(spool, record)
    for mark in read_lines(ack_path(path), 0)[0]:
        _apply_mark(spool, mark)
    return spool


def _apply_mark(spool: SpoolFile, record: Record) -> None:
    kind = record.get("t")
    if kind in ("d", "x"):
        spool.done.add(int(record["n"]))
    elif kind == "r":
        spool.done.add(int(record["n"]))
        spool.refused[int(record["n"])] = [str(w) for w in record.get("why", ())]
    elif kind == "k":
        spool.kept[int(record["n"])] = [str(w) for w in record.get("why", ())]
    elif kind == "s":
        spool.checksums[int(record["n"])] = str(record["sha256"])
