"""Run: one MLflow run owned or joined by this process (its no-op twin for other ranks is
``other_ranks.NoopRun``)."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable, Mapping
from types import TracebackType
from typing import TYPE_CHECKING, Any, Protocol

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.redact import get_logger, redact_value
from trainkit_tracking._core.spec import RunKind, RunSpec
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._insight.cv import (
    at_end,  # CV summary / leaderboard; never raises
    cv_summary,
)
from trainkit_tracking._process.bounded import bounded
from trainkit_tracking._runs import exit as _exit
from trainkit_tracking._runs import shared as _shared
from trainkit_tracking._runs.handover import clean_env
from trainkit_tracking._store.store import Store
from trainkit_tracking.errors import TrackingError

if TYPE_CHECKING:
    from trainkit_tracking._journal.run_logger import RunLogger

log = get_logger(__name__)

_STATUSES = ("FINISHED", "FAILED", "KILLED")
Terminated = _exit.Terminated  # raised in the main thread on SIGTERM while runs are open


class RunOwner(Protocol):
    """What a Run needs of the Tracker that made it."""

    keys: TagKeys
    exit_timeout: float
    holder_timeout: float
    cv_metrics: tuple[str, ...] | None

    @property
    def store(self) -> Store: ...

    def start_run(
        self, spec: RunSpec, *, parent: Run | str | None = None, resume: bool = False
    ) -> Run: ...

    def run_url(self, experiment_id: str, run_id: str) -> str | None: ...

    def handover_env(self) -> dict[str, str]: ...

    def _release(self, run: Run, timeout: float | None = None) -> bool: ...

    def _noop_collective(self, spec: RunSpec | None) -> Run: ...


class Run:
    """One MLflow run owned (created or resumed) or joined by this process.

    Logging calls validate and enqueue; a background worker stores them. Use it as a
    context manager: a normal exit ends it FINISHED, an exception FAILED (the
    exception propagates unchanged), KeyboardInterrupt or SIGTERM KILLED with
    ``code.interrupted=true``.
    """

    def __init__(
        self,
        tracker: RunOwner,
        *,
        run_id: str,
        name: str,
        spec: RunSpec | None,
        parent_id: str | None,
        experiment_id: str,
        logger: RunLogger,
        owns_status: bool,
        spec_problem: str | None = None,
        holder: str | None = None,
    ) -> None:
        self._tracker = tracker
        self._id = run_id
        self._name = name
        self._spec = spec
        self._parent_id = parent_id
        self._experiment_id = experiment_id
        self._logger = logger
        self._owns_status = owns_status
        self._spec_problem = spec_problem
        self._holder = holder  # shared run (resume=True): this process's hold
        self._shared = holder is not None
        self._ended = False
        self._lock = threading.Lock()
        # Created here and its id never read nor handed over: no other process can have
        # made children under it, so its end reads fold runs only if this one made any
        # (a trial's end then costs no search: SPEC section 19's 3 calls per trial).
        self._known_only_here = False
        self._made_folds = False

    # Identity ------------------------------------------------------------------

    @property
    def id(self) -> str:
        self._known_only_here = False  # the id may reach another process from here on
        return self._id

    def _may_have_folds_elsewhere(self) -> bool:
        return not self._known_only_here

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
    def _uri(self) -> str:
        return self._logger.tracking_uri

    @property
    def ended(self) -> bool:
        return self._ended

    def __repr__(self) -> str:
        return f"Run(id={self._id!r}, name={self._name!r})"

    def _repr_html_(self) -> str:
        """How a notebook (Jupyter, Colab, Kaggle) shows the run: name, status, a link."""
        import html

        status = "ended" if self._ended else "open"  # what this process knows; no store query
        url = self.url
        link = (
            f' <a href="{html.escape(redact_value(url))}" target="_blank">open in MLflow</a>'
            if url
            else ""
        )
        return (
            f"<b>{html.escape(self._name or '(no name)')}</b> ({status}) "
            f"<code>{html.escape(str(self._id))}</code>{link}"
        )

    # Tree ----------------------------------------------------------------------

    def child(self, kind: RunKind | str, **spec_changes: Any) -> Run:
        """Create a child run (same experiment, ``mlflow.parentRunId`` = this run)."""
        if self._spec is None:
            why = f" ({self._spec_problem})" if self._spec_problem else ""
            raise TrackingError(
                f"run {self._id!r} was joined, and its spec cannot be rebuilt from its "
                f"tags{why}; start the child with tracker.start_run(spec, parent=run) and a "
                "full spec"
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

    def log_text(self, text: str, artifact_file: str) -> None:
        """Save ``text`` as ``artifact_file`` (a relative path) in the run's artifacts."""
        self._logger.log_text(text, artifact_file)

    def flush(self, timeout: float | None = None) -> bool:
        """Block until everything logged so far is stored; False if ``timeout`` passed first,
        or if something logged since the last flush was set aside (it was warned about)."""
        return self._logger.flush(timeout)

    def _wait_stored(self, timeout: float | None) -> bool:
        """The SDK's own wait (before a leaderboard): the user's next flush still reports
        what was set aside."""
        return self._logger.flush(timeout, covers=False)

    # Lifecycle -----------------------------------------------------------------

    def end(self, status: str = "FINISHED", *, timeout: float | None = None) -> bool:
        """End the run with ``status``; idempotent. A joined run is only flushed.

        Waits at most ``timeout`` (default: the Tracker's ``exit_timeout``) and returns
        whether everything was stored by then; what was not, the end status included,
        stays spooled and is sent by the worker or by ``trainkit-tracking sync``. Ctrl-C
        while it waits ends the run KILLED instead.
        """
        if status not in _STATUSES:
            raise ValueError(f"status must be one of {', '.join(_STATUSES)}, got {status!r}")
        wait = self._tracker.exit_timeout if timeout is None else timeout
        if self._holder is not None and not self._ended:
            return self._end_shared(status, wait)
        reads = self._made_folds or self._may_have_folds_elsewhere() or self._is_sweep()
        if self._owns_status and not self._ended and not self._logger.store_down and reads:
            started = time.monotonic()
            tracker = self._tracker  # half the bound at most:
            at_end(self, tracker.store, tracker.keys, status, wait / 2, tracker.cv_metrics)
            wait = max(0.0, wait - (time.monotonic() - started))
        if not self._end_nowait(status):
            return True
        try:
            return self._logger.flush(wait, ending=True)
        except KeyboardInterrupt:
            if self._owns_status and status != "KILLED":
                self._logger.end_nowait(
                    "KILLED", override=True, tags={self._tracker.keys["interrupted"]: "true"}
                )
            raise

    def _end_shared(self, status: str, wait: float) -> bool:
        """A shared run: this process's data first, then its hold; only the last live
        holder writes the summary (a sweep's leaderboard, once, not once per worker) and
        sets the status. When the store does not answer, the hold just goes stale (the
        other holders, or `trainkit-tracking reap`, end the run)."""
        deadline = time.monotonic() + wait
        ok = self._logger.flush(wait)
        last = self._drop_hold(deadline)
        if last and not self._logger.store_down:
            left = max(0.0, deadline - time.monotonic())
            at_end(self, self._tracker.store, self._tracker.keys, status, left / 2)
        if not self._end_nowait(status):
            return True
        ok = self._logger.flush(max(0.0, deadline - time.monotonic()), ending=True) and ok
        if last:
            ok = self._finish(status, deadline) and ok
        return ok and last is not None

    def _is_sweep(self) -> bool:
        return self._spec is not None and self._spec.kind == RunKind.HPO_SWEEP

    def _release_hold(self, status: str, deadline: float) -> bool:
        """The exit path's release (after ``_end_nowait``): drop the hold, and end the run
        with ``status`` when it was the last live one."""
        last = self._drop_hold(deadline)
        return self._finish(status, deadline) if last else last is not None

    def _finish(self, status: str, deadline: float) -> bool:
        store, keys = self._tracker.store, self._tracker.keys
        return _bounded_store(
            self._id, lambda: _shared.finish(store, self._id, keys, status), deadline
        )

    def _drop_hold(self, deadline: float) -> bool | None:
        """Drop this process's hold: whether it was the last live one (None: the store did
        not answer, and the hold goes stale)."""
        holder, self._holder = self._holder, None
        if holder is None or self._logger.store_down:
            return None
        tracker = self._tracker
        try:
            return bounded(
                lambda: _shared.release(
                    tracker.store,
                    self._id,
                    holder,
                    tracker.keys,
                    stale_after=tracker.holder_timeout,
                    answered_since=self._logger.answered_since,
                ),
                timeout=max(0.0, deadline - time.monotonic()),
                what="releasing the shared run",
            )
        except Exception as exc:  # never fail the end over it: the hold goes stale
            log.warning("could not release shared run %s: %s", self._id, exc)
            return None

    def _end_nowait(self, status: str) -> bool:
        """Queue the end (KILLED: with ``code.interrupted=true``); False if already ended."""
        with self._lock:
            if self._ended:
                return False
            self._ended = True
        _exit.release(self)
        self._tracker._release(self, 0.0)  # system metrics stop before the end record
        if not self._owns_status or self._shared:
            self._logger.end_nowait(None)  # a shared run: its last holder sets the status
        elif status == "KILLED":
            self._logger.end_nowait(status, tags={self._tracker.keys["interrupted"]: "true"})
        else:
            self._logger.end_nowait(status)
        return True

    def cv_summary(self) -> dict[str, float]:
        """Log and return ``cv.<metric>.mean/std/min/max`` of the study's metric and the
        evaluation metrics (or the Tracker's ``cv_metrics``), ``cv.n_folds``, ``cv.n_failed``
        over this run's stored ``hpo_trial_fold`` children ({} when it has none)."""
        return cv_summary(self, self._tracker.store, self._tracker.keys, self._tracker.cv_metrics)

    def __enter__(self) -> Run:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            self.end(_exit.exit_status(exc))
        except Exception as end_error:  # never mask the user's exception or kill training
            log.warning("could not end run %s: %s", self._id, end_error)

    # Handover ------------------------------------------------------------------

    def subprocess_env(
        self, base: Mapping[str, str] | None = None, *, child: RunSpec | None = None
    ) -> dict[str, str]:
        """The environment for a subprocess that logs into this run or creates ``child``.

        ``base`` defaults to ``os.environ``; it is copied, never modified.
        """
        self._known_only_here = False  # handed over: its children may be made there
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


def _bounded_store(run_id: str, call: Callable[[], object], deadline: float) -> bool:
    """End a shared run in the store by ``deadline``; False (logged) when it did not answer."""
    try:
        bounded(call, timeout=max(0.0, deadline - time.monotonic()), what="ending the run")
        return True
    except Exception as exc:  # never fail the end over it: the hold goes stale
        log.warning("could not end shared run %s: %s", run_id, exc)
        return False
