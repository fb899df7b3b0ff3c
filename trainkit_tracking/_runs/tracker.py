"""Tracker: the facade that resolves the store, creates the run tree and hands runs over."""

from __future__ import annotations

import functools
import os
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any, ParamSpec, TypeVar

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.naming import NamingPolicy, env_value
from trainkit_tracking._core.platform import Platform, detect_platform
from trainkit_tracking._core.redact import redact_value, scrub_chain
from trainkit_tracking._core.spec import Lineage, RunSpec
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._core.tags import TagSet
from trainkit_tracking._insight import context as _context
from trainkit_tracking._insight import cv_stats as _cv_stats
from trainkit_tracking._insight import system as _system
from trainkit_tracking._process import rank as _rank
from trainkit_tracking._runs import create as _create
from trainkit_tracking._runs import exit as _exit
from trainkit_tracking._runs.lineage import lineage_of
from trainkit_tracking._runs.resolve import Resolution
from trainkit_tracking._runs.run import Run
from trainkit_tracking._store.store import DEFAULT_TIMEOUT, Store
from trainkit_tracking._store.versions import Versions
from trainkit_tracking.errors import TrackingError, TrackingWarning

P = ParamSpec("P")
R = TypeVar("R")


def _scrubbed(method: Callable[P, R]) -> Callable[P, R]:
    """A public call: no credential in what it raises, its chained errors included."""

    @functools.wraps(method)
    def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return method(*args, **kwargs)
        except Exception as exc:
            scrub_chain(exc)
            raise

    return wrapper


class Tracker:
    """Resolves the tracking store and experiment, and creates, resumes and joins runs.

    Nothing touches the network or the disk until first use; ``setup()`` does it
    explicitly. The environment is read once, when the Tracker is built. Every call that
    must reach the store waits at most ``timeout`` seconds; ending runs at most
    ``exit_timeout`` seconds in total.
    """

    def __init__(
        self,
        experiment: str | None = None,
        tracking_uri: str | None = None,
        *,
        project: str | None = None,
        policy: NamingPolicy | None = None,
        keys: TagKeys | None = None,
        fallback_to_local: bool = True,
        timeout: float | None = None,
        exit_timeout: float | None = None,
        heartbeat_interval: float = 30.0,
        holder_timeout: float | None = None,
        spool_dir: str | os.PathLike[str] | None = None,
        flush_interval: float = 1.0,
        azure_timeout: float = 30.0,
        subscription_id: str | None = None,
        resource_group: str | None = None,
        workspace_name: str | None = None,
        environ: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        context: bool | None = None,
        system_metrics: bool | None = None,
        system_metrics_interval: float | None = None,
        cv_metrics: Sequence[str] | None = None,
    ) -> None:
        self._environ: dict[str, str] = dict(os.environ if environ is None else environ)
        self._project = project or self._environ.get(_env.TRAINKIT_PROJECT) or None
        # TRAINKIT_NAMING_POLICY: default, seed or a policy file (a bad value fails here).
        self.policy = policy if policy is not None else NamingPolicy.from_env(self._environ)
        self.cv_metrics = _cv_metrics(cv_metrics, self._environ)
        self.keys = keys or TagKeys.default()
        self.timeout = _seconds(
            timeout, "timeout", self._environ, _env.TRAINKIT_TIMEOUT, DEFAULT_TIMEOUT
        )
        self.exit_timeout = _seconds(
            exit_timeout,
            "exit_timeout",
            self._environ,
            _env.TRAINKIT_EXIT_TIMEOUT,
            _exit.DEFAULT_EXIT_TIMEOUT,
        )
        if not heartbeat_interval > 0:
            raise ValueError(f"heartbeat_interval must be > 0 seconds, got {heartbeat_interval!r}")
        self.heartbeat_interval = float(heartbeat_interval)
        # A holder of a shared run whose heartbeat is older than this is taken for dead.
        self.holder_timeout = (
            4 * self.heartbeat_interval if holder_timeout is None else float(holder_timeout)
        )
        self._spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.flush_interval = flush_interval
        self.azure_timeout = azure_timeout
        self._cwd = Path(cwd) if cwd is not None else None
        self._platform: Platform = detect_platform(self._environ)
        self._rank_checked = _rank.current_rank(self._environ)  # a malformed RANK fails here
        _env.store_flavor("", self._environ)  # a malformed TRAINKIT_STORE_FLAVOR fails here
        self._warned: set[str] = set()
        self._where = Resolution(
            self._environ,
            experiment=experiment,
            tracking_uri=tracking_uri,
            project=self._project,
            platform=self._platform,
            cwd=self._cwd,
            fallback_to_local=fallback_to_local,
            timeout=self.timeout,
            azure_timeout=azure_timeout,
            azure_args=(subscription_id, resource_group, workspace_name),
            warn_once=self.warn_once,
        )
        self._versions = Versions(self.keys["base_name"], self.keys["version"])
        # Run context tags and system metrics (docs/context.md): env validated here.
        self._context = _context.RunContext(self._environ, self._cwd, enabled=context)
        self._system = _system.sampler(
            self._environ, self._cwd, system_metrics, system_metrics_interval
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Tracker:
        """A Tracker configured from the environment only (SPEC section 6)."""
        return cls(environ=environ, **kwargs)

    def __repr__(self) -> str:
        store, experiment = self._where.shown()
        return f"Tracker(experiment={experiment!r}, store={store!r})"

    def _repr_html_(self) -> str:
        """How a notebook shows the tracker: its experiment and store (never resolves them)."""
        import html

        store, experiment = self._where.shown()
        return (
            f"<b>Tracker</b> experiment <code>{html.escape(experiment)}</code> "
            f"on <code>{html.escape(store)}</code>"
        )

    # Resolution ------------------------------------------------------------------

    @property
    def fallback_to_local(self) -> bool:
        return self._where.fallback_to_local

    @fallback_to_local.setter
    def fallback_to_local(self, value: bool) -> None:
        self._where.fallback_to_local = value

    @property
    def platform(self) -> Platform:
        return self._platform

    @property
    def rank(self) -> int:
        """This process's distributed rank, decided now: torch.distributed when initialised,
        else ``RANK``, ``SLURM_PROCID``, ... of the tracker's environment (default 0)."""
        return _rank.current_rank(self._environ)

    @property
    def tracking_uri(self) -> str:
        return self.setup()[0]

    @property
    def uri_source(self) -> str:
        """Where the tracking URI came from (argument, environment, workspace, local)."""
        self.setup()
        assert self._where.uri_source is not None
        return self._where.uri_source

    @property
    def experiment_id(self) -> str:
        return self.setup()[1]

    @property
    def experiment_name(self) -> str:
        self.setup()
        assert self._where.experiment_name is not None
        return self._where.experiment_name

    @property
    def fell_back_to_local(self) -> bool:
        return self._where.fell_back or self._where.push_to is not None

    @property
    def offline(self) -> bool:
        """Whether runs go to the local store because the tracking store did not answer."""
        return self._where.push_to is not None

    @property
    def store(self) -> Store:
        self.setup()
        assert self._where.store is not None
        return self._where.store

    @property
    def _store(self) -> Store | None:
        """The store, if resolved already (no setup)."""
        return self._where.store

    @property
    def spool_dir(self) -> Path:
        if self._spool_dir is not None:
            return self._spool_dir
        from trainkit_tracking._journal.spool import default_spool_dir

        return default_spool_dir(self._environ)

    def _local_uri(self) -> str:
        return self._where.local_uri()

    def resolve_tracking_uri(self) -> tuple[str, str]:
        """Resolve (uri, source) without creating anything (Azure is checked, bounded)."""
        return self._where.resolve_tracking_uri()

    def warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(redact_value(message), TrackingWarning, stacklevel=3)

    @_scrubbed
    def setup(self) -> tuple[str, str]:
        """Resolve the tracking URI, create the experiment if needed; returns (uri, experiment id).

        A store that does not answer within ``timeout``: the local store instead (runs
        marked for ``trainkit-tracking push``) with ``fallback_to_local``, else
        ``StoreUnavailableError``.
        """
        return self._where.setup()

    # Runs ------------------------------------------------------------------------

    def run_url(self, experiment_id: str, run_id: str) -> str | None:
        self.setup()
        return self._where.run_url(experiment_id, run_id)

    def handover_env(self) -> dict[str, str]:
        """The variables every subprocess gets: store, experiment, spool, naming policy."""
        self.setup()
        env = self._where.handover_env(self.spool_dir)
        env[_env.TRAINKIT_NAMING_POLICY] = env_value(self.policy)
        if self.cv_metrics is not None:
            env[_env.TRAINKIT_CV_METRICS] = ",".join(self.cv_metrics)
        return env

    def _noop_collective(self, spec: RunSpec | None) -> Run:
        """The non-zero-rank side of a collective start_run/child/attach."""
        return _create.noop(self, spec)

    @_scrubbed
    def start_run(
        self, spec: RunSpec, *, parent: Run | str | None = None, resume: bool = False
    ) -> Run:
        """Create (or with ``resume=True`` resume) the run of ``spec``; a child when ``parent``.

        Under torch.distributed this is collective: every rank calls it, rank 0 creates.
        """
        if not isinstance(spec, RunSpec):
            raise TypeError(f"start_run needs a RunSpec, got {type(spec).__name__}")
        return _create.collective(
            self, lambda: _create.start(self, spec, parent=parent, resume=resume), spec
        )

    def _spec_tags(self, spec: RunSpec) -> TagSet:
        return _create.spec_tags(self, spec)

    def _release(self, run: Run, timeout: float | None = None) -> bool:
        """Stop sampling system metrics into ``run``; False if its node's metrics were not stored."""
        return self._system.remove(run, timeout) if self._system is not None else True

    # Handover ----------------------------------------------------------------------

    @_scrubbed
    def attach(self) -> Run:
        """In a subprocess: join the run handed over through the environment, or create its child."""
        return _create.collective(self, lambda: _create.attach(self), None)

    # Queries -------------------------------------------------------------------------

    @_scrubbed
    def find(self, spec: RunSpec) -> list[str]:
        """Ids of the runs in the experiment with the same identity, newest first."""
        return [record.run_id for record in _create.find_records(self, spec)]

    @_scrubbed
    def lineage(self, run_id: str) -> Lineage:
        """The lineage a final_training run trained from this HPO trial/refit/sweep should carry."""

        return lineage_of(self.store, self.keys, run_id)

    def open_runs(self) -> list[Run]:
        """The runs of this tracker that this process has not ended yet."""
        return [run for run in _exit.open_runs() if isinstance(run, Run) and run._tracker is self]

    def close(self, timeout: float | None = None, *, status: str = "FINISHED") -> bool:
        """End every run this tracker still has open (default FINISHED) and flush them all,
        waiting at most ``timeout`` (default ``exit_timeout``) in total."""
        deadline = time.monotonic() + (self.exit_timeout if timeout is None else timeout)
        runs = self.open_runs()
        for run in runs:
            run._end_nowait(status)
        return all(
            [run._logger.flush(max(0.0, deadline - time.monotonic()), ending=True) for run in runs]
        )


def _cv_metrics(value: Sequence[str] | None, environ: Mapping[str, str]) -> tuple[str, ...] | None:
    """``cv_metrics``, else ``TRAINKIT_CV_METRICS`` (comma-separated), checked; None: default."""
    if value is not None:
        return _cv_stats.check_cv_metrics(value)
    raw = environ.get(_env.TRAINKIT_CV_METRICS, "").strip()
    if not raw:
        return None
    names = [part.strip() for part in raw.split(",") if part.strip()]
    try:
        return _cv_stats.check_cv_metrics(names, f"environment variable {_env.TRAINKIT_CV_METRICS}")
    except ValueError as exc:
        raise TrackingError(f"{exc}; fix or unset it") from exc


def _seconds(
    value: float | None, name: str, environ: Mapping[str, str], variable: str, default: float
) -> float:
    if value is None:
        value = _env.read_seconds(environ, variable)
        return default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)
