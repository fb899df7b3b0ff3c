"""Who sends a store's journal: the sender's lock file and its status file in the spool dir.

Whoever holds ``sender-<id>.lock`` is the one sender of that store (a process, a thread of a
training process, or ``sync``); its status file says where it listens and how it fares.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from pathlib import Path
from typing import Any

from trainkit_tracking._process.file_lock import try_lock


def lock_path(spool_dir: Path, uid: str) -> Path:
    return spool_dir / f"sender-{uid}.lock"


def status_path(spool_dir: Path, uid: str) -> Path:
    return spool_dir / f"sender-{uid}.json"


def lock_is_current(spool_dir: Path, uid: str, fd: int) -> bool:
    """Whether ``fd`` is still the spool dir's lock file of ``uid`` (not removed with the
    directory, nor replaced by a new one)."""
    try:
        held, current = os.fstat(fd), os.stat(lock_path(spool_dir, uid))
    except OSError:
        return False
    return (held.st_dev, held.st_ino) == (current.st_dev, current.st_ino)


def hold_lock(spool_dir: Path, uid: str) -> int | None:
    """Take the sender lock of ``uid`` in ``spool_dir``: its fd, or None if it is held."""
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_path(spool_dir, uid), os.O_RDWR | os.O_CREAT, 0o600)
    if try_lock(fd):
        return fd
    os.close(fd)
    return None


def sender_running(spool_dir: Path, uid: str) -> bool:
    """Whether a sender (a process, a thread of one, or ``sync``) holds the lock of ``uid``.

    Tests by taking the lock for a moment: a sender starting at that very moment tries
    again for a while before it concludes another one has the store.
    """
    try:
        fd = hold_lock(spool_dir, uid)
    except OSError:
        return False
    if fd is None:
        return True
    os.close(fd)  # closing the only fd releases the lock
    return False


def read_status(spool_dir: Path, uid: str) -> dict[str, Any]:
    try:
        data = json.loads(status_path(spool_dir, uid).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def write_status(spool_dir: Path, uid: str, status: dict[str, object]) -> None:
    """Replace the status file (atomically: readers never see half of it)."""
    path = status_path(spool_dir, uid)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(OSError):
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w", encoding="utf-8") as fh:
            json.dump({**status, "updated": int(time.time())}, fh)
        os.replace(tmp, path)
