"""Every process-wide hook of the package, installed in one place, once per interpreter:
``atexit``, the SIGTERM handler, ``sys.excepthook``, the fork handlers, and (Python 3.12+)
a ``sys.monitoring`` watch on the main module.

Other modules never install a hook themselves: they register what must happen at exit
(``on_exit``) or in a forked child (``on_fork``), and this module calls it. The status a
dying process gives its runs comes from how it really ends: an uncaught exception
(``sys.excepthook``), SIGTERM, Ctrl-C, or a ``SystemExit`` that leaves the main module
(seen by ``sys.monitoring`` on Python 3.12+; on older Pythons the exit code is not visible
to an exit hook, and a plain run ends FINISHED: docs/failures.md). ``sys.exit`` is never
wrapped, so a caught ``SystemExit``, one raised in a thread or in a forked child, changes
nothing.
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
from typing import Any

from trainkit_tracking._core.redact import get_logger, warn

log = get_logger(__name__)

DEFAULT_EXIT_TIMEOUT = 10.0

ExitCallback = Callable[[str, float], None]  # (status, deadline on time.monotonic())


class Terminated(SystemExit):
    """Raised in the main thread by the SIGTERM handler while runs are open."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def exit_status(exc: BaseException | None) -> str:
    """The status a run ends with when ``exc`` leaves its block (None: a normal end)."""
    if exc is None:
        return "FINISHED"
    if isinstance(exc, (KeyboardInterrupt, Terminated)):
        return "KILLED"
    if isinstance(exc, SystemExit):
        return "FINISHED" if exc.code in (None, 0) else "FAILED"
    return "FAILED"


class _State:
    """What the process is known to be dying of, and what must happen when it does."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.status: str | None = None  # set by the hooks below; None: a normal end
        self.installed_pid: int | None = None
        self.exit_timeout = DEFAULT_EXIT_TIMEOUT
        self.on_exit: list[tuple[int, ExitCallback]] = []
        self.previous_excepthook: Callable[..., Any] | None = None
        self.warned = False


STATE = _State()
_FORK_CALLBACKS: list[Callable[[], None]] = []


def install() -> None:
    """Install the hooks, once per interpreter (a forked child keeps them, never wraps
    them twice)."""
    with STATE.lock:
        if STATE.installed_pid is None:
            _install()


def on_exit(callback: ExitCallback, *, order: int) -> None:
    """Call ``callback(status, deadline)`` at interpreter exit, lowest ``order`` first.

    Registered once per process: a forked child starts with none.
    """
    with STATE.lock:
        if all(cb is not callback for _, cb in STATE.on_exit):
            STATE.on_exit.append((order, callback))
            STATE.on_exit.sort(key=lambda item: item[0])
    install()


def on_fork(callback: Callable[[], None]) -> None:
    """Call ``callback()`` in a forked child, right after the fork (registered at import)."""
    _FORK_CALLBACKS.append(callback)


def set_exit_timeout(seconds: float, *, first: bool) -> None:
    """The bound of the whole exit; ``first``: replace it, else keep the larger one."""
    with STATE.lock:
        STATE.exit_timeout = seconds if first else max(STATE.exit_timeout, seconds)


def warn_unsent(message: str) -> None:
    """The one warning of a process that leaves data in the spool."""
    with STATE.lock:
        if STATE.warned:
            log.debug("%s", message)
            return
        STATE.warned = True
    warn(message)


def _install() -> None:
    STATE.installed_pid = os.getpid()
    STATE.status = None
    STATE.previous_excepthook = sys.excepthook
    sys.excepthook = _excepthook
    _watch_main_module()
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
    if threading.current_thread() is threading.main_thread():
        STATE.status = exit_status(exc)
    previous = STATE.previous_excepthook
    if previous is None or previous is _excepthook:
        previous = sys.__excepthook__
    previous(exc_type, exc, tb)


_TOOL_NAME = "trainkit-tracking"


def _main_module_code() -> Any | None:
    """The code object of the main module's body (a script, or ``python -m``), if any."""
    main = sys.modules.get("__main__")
    frame = sys._getframe()
    while frame is not None:
        if frame.f_code.co_name == "<module>" and frame.f_globals is getattr(main, "__dict__", 0):
            return frame.f_code
        frame = frame.f_back  # type: ignore[assignment]
    return None


def _watch_main_module() -> None:
    """Python 3.12+: learn the code of a ``SystemExit`` that leaves the main module.

    A PY_UNWIND callback sees every frame that an exception leaves; it looks only for the
    main module's own frame, which only an uncaught exception leaves that way.
    """
    monitoring = getattr(sys, "monitoring", None)
    if monitoring is None or threading.current_thread() is not threading.main_thread():
        return
    code = _main_module_code()
    if code is None:  # a notebook, an embedded interpreter: nothing ends "the script"
        return
    for tool in (4, 3):  # the ids Python leaves free for tools like this one
        try:
            monitoring.use_tool_id(tool, _TOOL_NAME)
        except ValueError:
            continue

        def unwound(unwound_code: Any, offset: int, exc: BaseException) -> Any:
            if unwound_code is code and isinstance(exc, SystemExit):
                STATE.status = STATE.status or exit_status(exc)
            return None

        monitoring.register_callback(tool, monitoring.events.PY_UNWIND, unwound)
        monitoring.set_events(tool, monitoring.events.PY_UNWIND)
        return


def _at_exit() -> None:
    # Also in a forked child (the hook is inherited): its callbacks are its own, registered
    # since the fork (its journal's drain); the parent's were dropped at the fork.
    status = STATE.status or "FINISHED"
    deadline = time.monotonic() + STATE.exit_timeout
    with STATE.lock:
        callbacks = [cb for _, cb in STATE.on_exit]
    for callback in callbacks:
        try:
            callback(status, deadline)
        except Exception as exc:  # never fail interpreter exit
            log.warning("trainkit-tracking could not finish at exit: %s", exc)


def _after_fork_in_child() -> None:
    # The hooks stay installed (a child never wraps them twice); what the parent was
    # dying of and what it must do at exit are the parent's.
    STATE.lock = threading.RLock()
    STATE.on_exit = []
    STATE.status = None
    STATE.warned = False
    # A forked child never keeps the parent's SIGTERM handler: a signal that reaches a
    # child between fork() and Python's re-initialisation is dropped for Python-level
    # handlers, and a Pool.terminate() then waits forever for a worker that never heard it.
    if STATE.installed_pid is not None:
        with contextlib.suppress(ValueError, OSError):
            if signal.getsignal(signal.SIGTERM) is _on_sigterm:
                signal.signal(signal.SIGTERM, signal.SIG_DFL)
    for callback in _FORK_CALLBACKS:
        try:
            callback()
        except Exception as exc:  # the child must go on
            log.debug("a fork handler failed: %s", exc)


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
