"""Who sends a store's spool: the sender's lock file and its status file in the spool dir."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from trainkit_tracking._process.file_lock import try_lock


def lock_path(spool_dir: Path, uid: str) -> Path:
    return spool_dir / f"sender-{uid}.lock"


def status_path(spool_dir: Path, uid: str) -> Path:
    return spool_dir / f"sender-{uid}.json"


def hold_lock(spool_dir: Path, uid: str) -> int | None:
    """Take the sender lock of ``uid`` in ``spool_dir``: its fd, or None if it is held."""
    spool_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    fd = os.open(lock_path(spool_dir, uid), os.O_RDWR | os.O_CREAT, 0o600)
    if try_lock(fd):
        return fd
    os.close(fd)
    return None


def sender_running(spool_dir: Path, uid: str) -> bool:
    """Whether a sender (a process, a thread of one, or ``sync``) holds the lock of ``uid``."""
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
