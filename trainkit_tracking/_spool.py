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
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainkit_tracking import _env
from trainkit_tracking._limits import MAX_BATCH_BYTES as MAX_BATCH_BYTES
from trainkit_tracking._limits import MAX_ITEMS as MAX_ITEMS
from trainkit_tracking._limits import MAX_METRICS as MAX_METRICS
from trainkit_tracking._limits import MAX_PARAMS as MAX_PARAMS
from trainkit_tracking._limits import MAX_TAGS as MAX_TAGS
from trainkit_tracking._redact import redact_value

if TYPE_CHECKING:
    from trainkit_tracking._store import Store

FORMAT_VERSION = 1
SUFFIX = ".jsonl"
ACK_SUFFIX = ".ack"  # the marks of a spool file, written only by whoever sends it
BLOB_DIR = "blobs"
# A fully acknowledged segment larger than this is deleted and a new one started, so a
# long run's spool stays small.
ROTATE_BYTES = 8 * 1024 * 1024


Record = dict[str, Any]
Point = tuple[str, float, int, int]


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


# Locks -------------------------------------------------------------------------


def try_lock(fd: int) -> bool:
    """Take an exclusive, non-blocking lock on ``fd``; False when another holder has it.

    The kernel releases the lock when the holder dies (even by SIGKILL), so a stale
    lock never blocks ``sync``.
    """
    if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
        import msvcrt

        # Lock one byte far beyond any data: Windows locks are mandatory, so readers of
        # the data itself must not be blocked.
        os.lseek(fd, 1 << 40, os.SEEK_SET)
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    import fcntl

    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


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


# Batching ----------------------------------------------------------------------


def make_batches(
    points: Sequence[Point], params: Mapping[str, str], tags: Mapping[str, str]
) -> list[Record]:
    """Split data into log-batch records within MLflow's per-request limits (``n`` unset)."""
    if not params and not tags:  # points only: 1000 points with keys <= 250 chars fit
        return [
            {"t": "b", "m": points[i : i + MAX_METRICS]} for i in range(0, len(points), MAX_METRICS)
        ]
    batcher = _Batcher()
    for key, value in params.items():
        batcher.add("p", MAX_PARAMS, key, value)
    for key, value in tags.items():
        batcher.add("g", MAX_TAGS, key, value)
    for point in points:
        batcher.add_point(point)
    batcher.close()
    return batcher.batches


class _Batcher:
    def __init__(self) -> None:
        self.batches: list[Record] = []
        self.m: list[Point] = []
        self.kv: dict[str, dict[str, str]] = {"p": {}, "g": {}}
        self.size = 0

    def _make_room(self, count: int, limit: int, cost: int) -> None:
        items = len(self.m) + len(self.kv["p"]) + len(self.kv["g"])
        if count >= limit or items >= MAX_ITEMS or self.size + cost > MAX_BATCH_BYTES:
            self.close()

    def add(self, kind: str, limit: int, key: str, value: str) -> None:
        # Non-ASCII text may be sent as \uXXXX escapes: count it at the worst case.
        cost = len(key) + len(value) * (1 if value.isascii() else 6) + 40
        self._make_room(len(self.kv[kind]), limit, cost)
        self.kv[kind][key] = value
        self.size += cost

    def add_point(self, point: Point) -> None:
        cost = len(point[0]) + 80
        self._make_room(len(self.m), MAX_METRICS, cost)
        self.m.append(point)
        self.size += cost

    def close(self) -> None:
        if self.m or self.kv["p"] or self.kv["g"]:
            record: Record = {"t": "b"}
            if self.m:
                record["m"] = self.m
            for kind in ("p", "g"):
                if self.kv[kind]:
                    record[kind] = self.kv[kind]
            self.batches.append(record)
        self.m, self.kv, self.size = [], {"p": {}, "g": {}}, 0


# Artifacts ---------------------------------------------------------------------


def checksum(path: Path) -> str:
    """SHA-256 of a file, or of a directory tree (relative paths and file digests)."""
    if path.is_dir():
        tree = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            tree.update(f"{rel}\0{checksum(file)}\n".encode())
        return tree.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_blob(src: str) -> None:
    """Delete a file the SDK wrote itself (``log_dict``) and its private directory."""
    path = Path(src)
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


# Sending -----------------------------------------------------------------------


def send_record(
    store: Store, run_id: str, record: Record, *, skip_tags: frozenset[str] = frozenset()
) -> list[str]:
    """Send one spooled record; returns what the store refused for good (empty: all stored).

    Raises what the store raised when it is transient (retry later). Safe to repeat.
    ``skip_tags``: tags a later record sets again (a re-sent one must not revert them).
    """
    kind = record["t"]
    if kind == "b":
        items: list[tuple[str, Any]] = [("m", tuple(p)) for p in record.get("m", ())]
        items += [("p", kv) for kv in (record.get("p") or {}).items()]
        items += [("g", kv) for kv in (record.get("g") or {}).items() if kv[0] not in skip_tags]
        return _send_items(store, run_id, items) if items else []
    if kind == "a":
        if record.get("dir"):
            store.log_artifacts(run_id, record["src"], record.get("dst"))
        else:
            store.log_artifact(run_id, record["src"], record.get("dst"))
        if record.get("tmp"):
            remove_blob(record["src"])
    elif kind == "e":
        store.terminate(run_id, record["status"], record.get("end"))
    else:
        raise ValueError(f"unknown spool record type {kind!r}")
    return []


def _send_items(store: Store, run_id: str, items: list[tuple[str, Any]]) -> list[str]:
    """Send items in one batch; on a permanent refusal, halve until the bad items are found.

    One bad value (a conflicting param, a key the server refuses) costs only itself:
    ~2 log2(n) extra requests per bad item, and nothing when all is well.
    """
    from trainkit_tracking._store import is_transient

    try:
        store.log_batch(
            run_id,
            metrics=[p for k, p in items if k == "m"],
            params={kv[0]: kv[1] for k, kv in items if k == "p"},
            tags={kv[0]: kv[1] for k, kv in items if k == "g"},
        )
        return []
    except Exception as exc:
        if is_transient(exc) or _about_the_run(exc):
            raise  # the whole record waits (for the store, or for the run to be restored)
        if len(items) == 1:
            kind, item = items[0]
            what = {"m": "metric", "p": "param", "g": "tag"}[kind]
            return [f"{what} {item[0]!r} ({_reason(exc)})"]
    middle = len(items) // 2
    return _send_items(store, run_id, items[:middle]) + _send_items(store, run_id, items[middle:])


def _about_the_run(exc: BaseException) -> bool:
    """Whether ``exc`` refuses the run itself (deleted, missing), not one of the items."""
    text = str(exc)
    return (
        getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
        or "'active' state" in text
        or "not found" in text.lower()
    )


def _reason(exc: BaseException) -> str:
    text = " ".join(redact_value(str(exc)).split())
    return text if len(text) <= 300 else text[:297] + "..."
