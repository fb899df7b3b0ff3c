"""How open runs end when the process ends, and with which status.

Every open run is held here (strongly: a run the user dropped still ends). At interpreter
exit (``_process.hooks`` calls ``_at_exit``) they all end and the journal is drained within
one ``exit_timeout``: FINISHED after a normal end or ``sys.exit(0)``, FAILED after
``sys.exit(n != 0)`` or an uncaught exception, KILLED (``code.interrupted=true``) after
SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import threading
from typing import Protocol

from trainkit_tracking._core.redact import get_logger, warn
from trainkit_tracking._process import hooks
from trainkit_tracking._process.hooks import DEFAULT_EXIT_TIMEOUT as DEFAULT_EXIT_TIMEOUT
from trainkit_tracking._process.hooks import Terminated as Terminated
from trainkit_tracking._process.hooks import exit_status as exit_status

log = get_logger(__name__)


class OpenRun(Protocol):
    """What the exit path needs of a run it holds."""

    @property
    def id(self) -> str: ...

    @property
    def _holder(self) -> str | None: ...

    def _end_nowait(self, status: str) -> bool: ...

    def _release_hold(self, status: str, deadline: float) -> bool: ...


class _Open:
    """The runs still open in this process, and the runs it created offline."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.runs: dict[int, OpenRun] = {}
        self.offline: dict[str, int] = {}  # local store -> runs created there for a push


STATE = _Open()


def hold(run: OpenRun, exit_timeout: float) -> None:
    """Keep ``run`` until it ends; the exit path ends it if nobody else does."""
    with STATE.lock:
        STATE.runs[id(run)] = run
        first = len(STATE.runs) == 1
    hooks.set_exit_timeout(exit_timeout, first=first)
    hooks.on_exit(_at_exit, order=0)


def release(run: OpenRun) -> None:
    with STATE.lock:
        STATE.runs.pop(id(run), None)


def open_runs() -> list[OpenRun]:
    with STATE.lock:
        return list(STATE.runs.values())


def created_offline(local_store: str) -> None:
    """Count a run created in the local store because the tracking store did not answer."""
    with STATE.lock:
        STATE.offline[local_store] = STATE.offline.get(local_store, 0) + 1
    hooks.on_exit(_at_exit, order=0)


def end_all(status: str, deadline: float) -> bool:
    """End every open run with ``status`` and send what is pending, until ``deadline``."""
    # Imported here: the journal's machinery is not loaded by `import trainkit_tracking`.
    from trainkit_tracking._journal.worker import shutdown_worker

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


def _at_exit(status: str, deadline: float) -> None:
    end_all(status, deadline)
    for local, count in STATE.offline.items():
        warn(
            f"{count} run{'s' * (count != 1)} of this process went to the local store {local} "
            "because the tracking store did not answer: merge them into it with "
            f"`trainkit-tracking push --from {local}` once it is back"
        )


def _after_fork_in_child() -> None:
    # The parent's runs are the parent's: a forked child never ends them.
    STATE.lock = threading.RLock()
    STATE.runs.clear()


hooks.on_fork(_after_fork_in_child)
