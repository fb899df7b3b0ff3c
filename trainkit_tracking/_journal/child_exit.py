"""A forked child's journal at its end: what it logged is written to disk, then sent, before
the child leaves (multiprocessing's workers leave with ``os._exit``, past ``atexit``)."""

from __future__ import annotations

import signal
from typing import Protocol

from trainkit_tracking._core.redact import get_logger, warn
from trainkit_tracking._process import hooks

log = get_logger(__name__)


class ChildLogger(Protocol):
    """What the child's end needs of its RunLogger."""

    run_id: str
    _timeout: float

    def flush(
        self,
        timeout: float | None = None,
        *,
        ending: bool = False,
        spooled_only: bool = False,
        covers: bool = True,
    ) -> bool: ...


def flush_at_child_exit(logger: ChildLogger) -> None:
    """Send a forked child's points when it ends, although it leaves with ``os._exit``.

    multiprocessing children (Pool workers, DataLoader workers) run multiprocessing's
    finalizers before ``os._exit``: ours flushes there. Without multiprocessing, atexit
    covers a child that returns normally; one that calls ``os._exit`` itself must call
    ``run.flush()`` first (docs/logging.md).
    """
    import multiprocessing
    import multiprocessing.util

    if "PoolWorker" in multiprocessing.current_process().name:
        warn(
            f"a multiprocessing Pool worker logs into run {logger.run_id}: call run.flush() "
            "at the end of each task, since Pool.terminate() (what `with Pool()` does on "
            "exit) kills workers with what they have not flushed; pool.close() and "
            "pool.join() lose nothing"
        )

    def final() -> None:
        # First onto disk, with SIGTERM held back: Pool.terminate() signals workers that
        # are still in this finalizer, and what reached the spool survives the signal.
        blocked = hasattr(signal, "pthread_sigmask")
        if blocked:
            signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            logger.flush(logger._timeout, spooled_only=True)
        finally:
            if blocked:
                signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})
        if not logger.flush(logger._timeout, ending=True):
            log.warning(
                "a forked child of run %s could not store everything before it ended; the "
                "rest is in the spool: send it with `trainkit-tracking sync`",
                logger.run_id,
            )

    multiprocessing.util.Finalize(logger, final, exitpriority=100)
    hooks.on_exit(lambda status, deadline: final(), order=5)  # a child that returns normally
