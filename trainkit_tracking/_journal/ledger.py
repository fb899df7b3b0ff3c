"""The state of every journal entry, from the call until it is stored or set aside.

An entry (one record of a journal file: a batch, an artifact, a run's end) is WRITTEN once
its writer appended it, SENDING while the sender of its store holds it, STORED once the
store took it, and SET_ASIDE when it cannot be stored: the store refused it, or this
machine failed it (a file gone, unreadable, a name clash). A set-aside entry is copied to
the spool dir's set-aside log, where ``doctor`` shows it and ``sync --retry-set-aside``
tries it again; it never holds back anything else.

``Ledger`` is the only code that changes a state or reads one. The marks live in the
file's ``.ack`` sidecar and are written only by the store's one sender (the holder of its
sender lock: a sender process, a sender thread, or ``sync``); the writer and ``doctor``
read them through a ``Ledger`` too.
"""

from __future__ import annotations

import contextlib
import enum
import json
import os
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._process.file_lock import try_lock

Record = dict[str, Any]

ACK_SUFFIX = ".ack"
SET_ASIDE_LOG = "set-aside.ndjson"  # not .jsonl: that suffix marks journal files


class State(enum.Enum):
    WRITTEN = "written"
    SENDING = "sending"
    STORED = "stored"
    SET_ASIDE = "set aside"


class Origin(str, enum.Enum):
    """Why an entry was set aside: the store refused it, or this machine failed it."""

    STORE = "store"
    LOCAL = "local"


@dataclass(frozen=True)
class Settled:
    """What one mark says: entry ``seq`` is stored (``aside``: items of it set aside) or,
    with ``whole``, set aside as a whole."""

    seq: int
    aside: tuple[str, ...] = ()
    whole: bool = False

    @property
    def ok(self) -> bool:
        return not self.aside and not self.whole


def ack_path(journal_path: Path) -> Path:
    return journal_path.with_suffix(ACK_SUFFIX)


def _settled_of(mark: Record) -> Settled | None:
    kind = mark.get("t")
    try:
        seq = int(mark["n"])
    except (KeyError, TypeError, ValueError):
        return None
    if kind == "d":
        return Settled(seq, tuple(str(w) for w in mark.get("aside", ())))
    if kind == "a":
        return Settled(seq, (str(mark.get("what") or "a record"),), whole=True)
    if kind == "r":  # 0.2's partly refused batch
        return Settled(seq, tuple(str(w) for w in mark.get("why", ())))
    if kind == "x":  # 0.2's artifact gone before sync
        return Settled(seq, (f"an artifact ({mark.get('why')})",), whole=True)
    return None  # "s" (a checksum) and 0.2's "k" (kept for sync: tried again)


@dataclass
class Ledger:
    """The entry states of one journal file (see the module docstring)."""

    path: Path
    states: dict[int, State] = field(default_factory=dict)
    _offset: int = 0
    _fd: int | None = None

    @property
    def marks_path(self) -> Path:
        return ack_path(self.path)

    # Reading ----------------------------------------------------------------------

    def read_new(self) -> list[Settled]:
        """The marks written since the last call, applied to ``states``."""
        marks, self._offset = read_lines(self.marks_path, self._offset)
        return self._apply(marks)

    def read_marks_in(self, lines: Iterable[Record]) -> list[Settled]:
        """Marks that 0.1 wrote into the journal file itself."""
        return self._apply(m for m in lines if m.get("t") in ("d", "r", "x"))

    def _apply(self, marks: Iterable[Record]) -> list[Settled]:
        settled = []
        for mark in marks:
            found = _settled_of(mark)
            if found is not None:
                self.states[found.seq] = State.SET_ASIDE if found.whole else State.STORED
                settled.append(found)
        return settled

    def state(self, seq: int) -> State:
        return self.states.get(seq, State.WRITTEN)

    def is_settled(self, seq: int) -> bool:
        return self.state(seq) in (State.STORED, State.SET_ASIDE)

    # Changing (only the store's sender) -------------------------------------------

    def sending(self, seq: int) -> None:
        if not self.is_settled(seq):
            self.states[seq] = State.SENDING

    def stored(self, seq: int, aside: Sequence[str] = ()) -> None:
        mark: Record = {"t": "d", "n": seq}
        if aside:
            mark["aside"] = list(aside)
        self._write(mark)
        self.states[seq] = State.STORED

    def set_aside(self, seq: int, what: str, origin: Origin, why: str) -> None:
        self._write({"t": "a", "n": seq, "what": what, "origin": origin.value, "why": why})
        self.states[seq] = State.SET_ASIDE

    def _write(self, mark: Record) -> None:
        if self._fd is None:
            self._fd = os.open(self.marks_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        write_all(self._fd, line(mark))

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._fd)
            self._fd = None


# The set-aside log -----------------------------------------------------------------


@contextlib.contextmanager
def set_aside_lock(spool_dir: Path) -> Iterator[None]:
    """Held while the set-aside log is appended to or rewritten (a few milliseconds)."""
    fd = os.open(spool_dir / (SET_ASIDE_LOG + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        while not try_lock(fd):
            time.sleep(0.005)
        yield
    finally:
        os.close(fd)


def log_set_aside(
    spool_dir: Path,
    *,
    uri: str,
    uri_id: str,
    run_id: str,
    what: str,
    origin: Origin,
    why: str,
    record: Record,
) -> None:
    """Keep a set-aside entry (or the items of one) where ``doctor`` and ``sync`` find it."""
    entry = {
        "ts": int(time.time() * 1000),
        "uri": redact_value(uri),
        "uri_id": uri_id,
        "run": run_id,
        "what": what,
        "origin": origin.value,
        "why": why,
        "record": record,
    }
    with set_aside_lock(spool_dir):
        fd = os.open(spool_dir / SET_ASIDE_LOG, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
        try:
            write_all(fd, line(entry))
        finally:
            os.close(fd)


def read_set_aside(spool_dir: Path) -> list[Record]:
    """Every entry of the set-aside log (a torn last line is skipped)."""
    return read_lines(spool_dir / SET_ASIDE_LOG, 0)[0]


def rewrite_set_aside(spool_dir: Path, keep: Sequence[Record]) -> None:
    """Replace the set-aside log by ``keep`` (``sync --retry-set-aside`` stored the rest)."""
    path = spool_dir / SET_ASIDE_LOG
    if not keep:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        return
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        write_all(fd, b"".join(line(entry) for entry in keep))
    finally:
        os.close(fd)
    os.replace(tmp, path)


# JSON lines ------------------------------------------------------------------------

# Records are plain data built here: skipping the circular-reference check saves a quarter
# of the encoding, which is most of what the training process pays to log.
_ENCODE = json.JSONEncoder(separators=(",", ":"), check_circular=False).encode


def line(record: Record) -> bytes:
    return (_ENCODE(record) + "\n").encode("utf-8")


def write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]


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
