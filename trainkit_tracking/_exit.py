"""The one exit path: how open runs end when the process ends, and with which status.

Every open run is held here (strongly: a run the user dropped still ends). Interpreter
exit ends them all and drains the worker within one ``exit_timeout``: FINISHED after a
normal end or ``sys.exit(0)``, FAILED after ``sys.exit(n != 0)`` or an uncaught
exception, KILLED (``code.interrupted=true``) after SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from trainkit_tracking._redact import get_logger

if TYPE_CHECKING:
    from trainkit_tracking._runs import Run

log = get_logger(__name__)

DEFAULT_EXIT_TIMEOUT = 10.0


class Terminated(SystemExit):
    """Raised in the main thread by the SIGTERM handler while runs are open."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


class _State:
    """What the process is known to be dying of, and the runs still open."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.open: dict[int, Run] = {}
        self.exit_timeout = DEFAULT_EXIT_TIMEOUT
        self.status: str | None = None  # set by the hooks below; None: a normal end
        self.installed_pid: int | None = None
        self.previous_excepthook: Callable[..., Any] | None = None
        self.previous_exit: Callable[..., Any] | None = None
        self.warned = False
        self.offline: dict[str, int] = {}  # local store -> runs created there for a push


STATE = _State()


def exit_status(exc: BaseException | None) -> str:
    """The status a run ends with when ``exc`` leaves its block (None: a normal end)."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        return "KILLED"
    if isinstance(exc, SystemExit):
        return "FINISHED" if exc.code in (None, 0) else "FAILED"
    return "FAILED"


def install() -> None:
    """Install the exit hooks once per process (again in a forked child)."""
    with STATE.lock:
        if STATE.installed_pid != os.getpid():
            _install()


def hold(run: Run, exit_timeout: float) -> None:
    """Keep ``run`` until it ends; the exit path ends it if nobody else does."""
    with STATE.lock:
        STATE.open[id(run)] = run
        STATE.exit_timeout = (
            exit_timeout if len(STATE.open) == 1 else max(STATE.exit_timeout, exit_timeout)
        )
    install()


def release(run: Run) -> None:
    with STATE.lock:
        STATE.open.pop(id(run), None)


def open_runs() -> list[Run]:
    with STATE.lock:
        return list(STATE.open.values())


def warn_unsent(message: str) -> None:
    """The one warning of a process that leaves data in the spool."""
    from trainkit_tracking._logging import warn

    with STATE.lock:
        if STATE.warned:
            log.debug("%s", message)
            return
        STATE.warned = True
    warn(message)


def created_offline(local_store: str) -> None:
    """Count a run created in the local store because the tracking store did not answer."""
    with STATE.lock:
        STATE.offline[local_store] = STATE.offline.get(local_store, 0) + 1


def _install() -> None:
    STATE.installed_pid = os.getpid()
    STATE.status = None
    STATE.previous_excepthook = sys.excepthook
    sys.excepthook = _excepthook
    # sys.exit is wrapped only to learn the exit code a plain (non-`with`) run should end
    # with: atexit handlers are not told it. The wrapper calls the original unchanged.
    STATE.previous_exit = sys.exit
    sys.exit = _exit  # type: ignore[assignment]
    if threading.current_thread() is threading.main_thread():
        try:
            if signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None):
                signal.signal(signal.SIGTERM, _on_sigterm)
        except (ValueError, OSError):  # not allowed here (an embedded interpreter)
            log.debug("cannot install the SIGTERM handler here")
    atexit.register(_at_exit)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    STATE.status = "KILLED"
    raise Terminated()


def _excepthook(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    STATE.status = exit_status(exc)
    previous = STATE.previous_excepthook or sys.__excepthook__
    previous(exc_type, exc, tb)


def _exit(code: object = None) -> None:
    error = SystemExit(code)
    if STATE.status is None:
        STATE.status = exit_status(error)
    assert STATE.previous_exit is not None
    STATE.previous_exit(code)


def end_all(status: str, deadline: float) -> bool:
    """End every open run with ``status`` and send what is pending, until ``deadline``."""
    from trainkit_tracking._worker import shutdown_worker

    runs = open_runs()
    for run in runs:
        try:
            run._end_nowait(status)
        except Exception as exc:  # one run's failure must not keep the others open
            log.warning("could not end run %s at exit: %s", run.id, exc)
    ok = shutdown_worker(deadline)
    for run in runs:  # shared runs: the last live holder sets the status
        if run._holder is not None:
            ok = run._release_hold(status, deadline) and ok
    return ok


def _at_exit() -> None:
    if STATE.installed_pid != os.getpid():
        return  # a forked child inherited the hook; its own exit is handled in _logging
    status = STATE.status or "FINISHED"
    try:
        end_all(status, time.monotonic() + STATE.exit_timeout)
    except Exception as exc:  # never fail interpreter exit
        log.warning("could not end open runs at exit: %s", exc)
    for local, count in STATE.offline.items():
        from trainkit_tracking._logging import warn

        warn(
            f"{count} run{'s' * (count != 1)} of this process went to the local store {local} "
            "because the tracking store did not answer: merge them into it with "
            f"`trainkit-tracking push --from {local}` once it is back"
        )


def _after_fork_in_child() -> None:
    # The parent's runs are the parent's: a forked child never ends them.
    STATE.lock = threading.RLock()
    STATE.open.clear()
    # Nor does it keep the parent's SIGTERM handler: a signal that reaches a child between
    # fork() and Python's re-initialisation is dropped for Python-level handlers, and a
    # Pool.terminate() then waits forever for a worker that never heard it.
    if STATE.installed_pid is not None:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
