"""Run: one MLflow run owned or joined by this process, and its no-op twin for other ranks."""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Mapping
from types import FrameType, TracebackType
from typing import TYPE_CHECKING, Any

from trainkit_tracking import _env
from trainkit_tracking._store import TERMINAL_STATUSES
from trainkit_tracking.errors import TrackingError
from trainkit_tracking.models import RunKind, RunSpec

if TYPE_CHECKING:
    from trainkit_tracking._logging import RunLogger
    from trainkit_tracking._tracker import Tracker

log = logging.getLogger(__name__)

_STATUSES = ("FINISHED", "FAILED", "KILLED")


class Terminated(SystemExit):
    """Raised in the main thread by the SIGTERM handler a ``with run:`` block installs."""

    def __init__(self) -> None:
        super().__init__(128 + signal.SIGTERM)


def _raise_terminated(signum: int, frame: FrameType | None) -> None:
    raise Terminated()


def clean_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without stale run handover variables (ours and the seed pipeline's)."""
    return {
        key: value
        for key, value in base.items()
        if key not in _env.STALE_HANDOVER and not key.startswith(_env.TRAINKIT_PREFIX)
    }


class Run:
    """One MLflow run owned (created or resumed) or joined by this process.

    Logging calls validate and enqueue; a background worker stores them. Use it as a
    context manager: a normal exit ends it FINISHED, an exception FAILED (the
    exception propagates unchanged), KeyboardInterrupt or SIGTERM KILLED with
    ``code.interrupted=true``.
    """

    def __init__(
        self,
        tracker: Tracker,
        *,
        run_id: str,
        name: str,
        spec: RunSpec | None,
        parent_id: str | None,
        experiment_id: str,
        logger: RunLogger,
        owns_status: bool,
    ) -> None:
        self._tracker = tracker
        self._id = run_id
        self._name = name
        self._spec = spec
        self._parent_id = parent_id
        self._experiment_id = experiment_id
        self._logger = logger
        self._owns_status = owns_status
        self._ended = False
        self._lock = threading.Lock()
        self._previous_sigterm: Any = None

    # Identity ------------------------------------------------------------------

    @property
    def id(self) -> str:
        return self._id

    @property
    def name(self) -> str:
        return self._name

    @property
    def spec(self) -> RunSpec | None:
        return self._spec

    @property
    def parent_id(self) -> str | None:
        return self._parent_id

    @property
    def experiment_id(self) -> str:
        return self._experiment_id

    @property
    def url(self) -> str | None:
        """A browsable URL of the run, or None when the store has no web UI address."""
        return self._tracker.run_url(self._experiment_id, self._id)

    @property
    def ended(self) -> bool:
        return self._ended

    def __repr__(self) -> str:
        return f"Run(id={self._id!r}, name={self._name!r})"

    # Tree ----------------------------------------------------------------------

    def child(self, kind: RunKind | str, **spec_changes: Any) -> Run:
        """Create a child run (same experiment, ``mlflow.parentRunId`` = this run)."""
        if self._spec is None:
            raise TrackingError(
                f"run {self._id!r} was joined without a RunSpec; start the child with "
                "tracker.start_run(spec, parent=run) and a full spec"
            )
        return self._tracker.start_run(self._spec.child(kind, **spec_changes), parent=self)

    # Logging -------------------------------------------------------------------

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        self._logger.log_metrics(metrics, step)

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        self._logger.log_metric(key, value, step)

    def log_params(self, params: Mapping[str, Any]) -> None:
        self._logger.log_params(params)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        self._logger.set_tags(tags)

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        self._logger.log_artifact(path, artifact_path)

    def log_artifacts(
        self, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        self._logger.log_artifacts(local_dir, artifact_path)

    def log_dict(self, obj: Any, file_name: str) -> None:
        self._logger.log_dict(obj, file_name)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything logged so far is stored; False if ``timeout`` passed first."""
        return self._logger.flush(timeout)

    # Lifecycle -----------------------------------------------------------------

    def end(self, status: str = "FINISHED", *, timeout: float | None = None) -> bool:
        """End the run with ``status``; idempotent. A joined run is only flushed.

        Returns whether everything was stored within ``timeout`` (what was not stays
        spooled and is sent by the worker or by ``trainkit-tracking sync``).
        """
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {', '.join(_STATUSES)}, got {status!r}")
        with self._lock:
            if self._ended:
                return True
            self._ended = True
        self._tracker._forget(self)
        if not self._owns_status:
            return self._logger.end(None, timeout)
        return self._logger.end(status, timeout)

    def _interrupted(self) -> None:
        self._logger.set_tags({self._tracker.keys["interrupted"]: "true"})
        self.end("KILLED")

    def __enter__(self) -> Run:
        if threading.current_thread() is threading.main_thread():
            try:
                current = signal.getsignal(signal.SIGTERM)
                if current in (signal.SIG_DFL, None):
                    self._previous_sigterm = current
                    signal.signal(signal.SIGTERM, _raise_terminated)
            except (ValueError, OSError):  # not allowed here (embedded interpreter)
                self._previous_sigterm = None
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._previous_sigterm is not None:
            signal.signal(signal.SIGTERM, self._previous_sigterm)
            self._previous_sigterm = None
        try:
            if exc is None:
                self.end("FINISHED")
            elif isinstance(exc, (KeyboardInterrupt, Terminated)):
                self._interrupted()
            else:
                self.end("FAILED")
        except Exception as end_error:  # never mask the user's exception or kill training
            log.warning("could not end run %s: %s", self._id, end_error)

    # Handover ------------------------------------------------------------------

    def subprocess_env(
        self, base: Mapping[str, str] | None = None, *, child: RunSpec | None = None
    ) -> dict[str, str]:
        """The environment for a subprocess that logs into this run or creates ``child``.

        ``base`` defaults to ``os.environ``; it is copied, never modified.
        """
        env = clean_env(os.environ if base is None else base)
        env.update(self._tracker.handover_env())
        if child is None:
            env[_env.MLFLOW_RUN_ID] = self._id
            env[_env.TRAINKIT_RUN_ID] = self._id
        else:
            if not isinstance(child, RunSpec):
                raise TypeError(f"child must be a RunSpec, got {type(child).__name__}")
            env[_env.TRAINKIT_PARENT_RUN_ID] = self._id
            env[_env.TRAINKIT_RUN_SPEC] = child.model_dump_json()
        return env


class NoopRun(Run):
    """The run of a rank other than 0: same interface, logs nothing, creates nothing.

    Its ``id`` is rank 0's run id when a torch process group exists (broadcast), else
    None (typed ``str`` for the common case, so that code shared by all ranks type-checks).
    """

    def __init__(self, run_id: str | None, spec: RunSpec | None, tracker: Tracker) -> None:
        self._tracker = tracker
        self._id = run_id  # type: ignore[assignment]
        self._name = ""
        self._spec = spec
        self._parent_id = None
        self._experiment_id = ""
        self._owns_status = False
        self._ended = False
        self._lock = threading.Lock()
        self._previous_sigterm = None

    @property
    def url(self) -> str | None:
        return None

    def __repr__(self) -> str:
        return f"NoopRun(id={self._id!r})"

    def child(self, kind: RunKind | str, **spec_changes: Any) -> Run:
        spec = self._spec.child(kind, **spec_changes) if self._spec is not None else None
        return self._tracker._noop_collective(spec)

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None:
        return None

    def log_metric(self, key: str, value: Any, step: int | None = None) -> None:
        return None

    def log_params(self, params: Mapping[str, Any]) -> None:
        return None

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        return None

    def log_artifact(self, path: str | os.PathLike[str], artifact_path: str | None = None) -> None:
        return None

    def log_artifacts(
        self, local_dir: str | os.PathLike[str], artifact_path: str | None = None
    ) -> None:
        return None

    def log_dict(self, obj: Any, file_name: str) -> None:
        return None

    def flush(self, timeout: float | None = None) -> bool:
        return True

    def end(self, status: str = "FINISHED", *, timeout: float | None = None) -> bool:
        self._ended = True
        return self._tracker._release(self, timeout)  # its node's system metrics, if any

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.end()

    def subprocess_env(
        self, base: Mapping[str, str] | None = None, *, child: RunSpec | None = None
    ) -> dict[str, str]:
        return clean_env(os.environ if base is None else base)


def is_terminal(status: str) -> bool:
    return status in TERMINAL_STATUSES
