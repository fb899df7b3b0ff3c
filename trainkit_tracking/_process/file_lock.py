"""A file lock the kernel releases when its holder dies: the spool's writers, the sender's
lock and the first opening of a sqlite store use it."""

from __future__ import annotations

import os
import sys


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
