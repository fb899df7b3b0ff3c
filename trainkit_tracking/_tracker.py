"""Tracker: the facade that resolves the store, creates the run tree and hands runs over."""

from __future__ import annotations

import dataclasses
import os
import threading
import time
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from trainkit_tracking import _azure, _context, _env, _exit, _handover, _rank, _shared, _system
from trainkit_tracking._naming import NamingPolicy
from trainkit_tracking._platform import Platform, detect_platform, local_store_path, local_store_uri
from trainkit_tracking._redact import get_logger, redact_value
from trainkit_tracking._runs import NoopRun, Run
from trainkit_tracking._store import DEFAULT_TIMEOUT, RunRecord, Store, sqlite_path
from trainkit_tracking._tags import TagKeys, TagSet, creation_tags
from trainkit_tracking._version import __version__
from trainkit_tracking._versions import Versions
from trainkit_tracking.errors import StoreUnavailableError, TrackingError, TrackingWarning
from trainkit_tracking.models import Lineage, RunSpec

log = get_logger(__name__)


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
    ) -> None:
        self._environ: dict[str, str] = dict(os.environ if environ is None else environ)
        self._experiment_arg = experiment
        self._uri_arg = tracking_uri
        self._project = project or self._environ.get(_env.TRAINKIT_PROJECT) or None
        self.policy = policy or NamingPolicy.default()
        self.keys = keys or TagKeys.default()
        self.fallback_to_local = fallback_to_local
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
        self._azure_args = (subscription_id, resource_group, workspace_name)
        self._cwd = Path(cwd) if cwd is not None else None
        self._platform: Platform = detect_platform(self._environ)
        self._rank_checked = _rank.current_rank(self._environ)  # a malformed RANK fails here
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._tracking_uri: str | None = None
        self._uri_source: str | None = None
        self._experiment_id: str | None = None
        self._experiment_name: str | None = None
        self._fell_back = False  # Azure was not available: the local store instead
        self._push_to: str | None = None  # offline: the store the runs are meant for (redacted)
        self._warned: set[str] = set()
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
        store, experiment = self._shown()
        return f"Tracker(experiment={experiment!r}, store={store!r})"

    def _repr_html_(self) -> str:
        """How a notebook shows the tracker: its experiment and store (never resolves them)."""
        import html

        store, experiment = self._shown()
        return (
            f"<b>Tracker</b> experiment <code>{html.escape(experiment)}</code> "
            f"on <code>{html.escape(store)}</code>"
        )

    def _shown(self) -> tuple[str, str]:
        # What is known without setup(): no network, no disk; credentials masked.
        store = (
            self._tracking_uri
            or self._uri_arg
            or self._environ.get(_env.MLFLOW_TRACKING_URI)
            or "(resolved on first use)"
        )
        experiment = (
            self._experiment_name
            or self._experiment_arg
            or self._environ.get(_env.MLFLOW_EXPERIMENT_NAME)
            or "(not set)"
        )
        if self._experiment_id is not None:
            experiment = f"{experiment} (id {self._experiment_id})"
        return redact_value(store), experiment

    # Resolution ------------------------------------------------------------------

    @property
    def platform(self) -> Platform:
        return self._platform

    @property
    def tracking_uri(self) -> str:
        return self.setup()[0]

    @property
    def uri_source(self) -> str:
        """Where the tracking URI came from (argument, environment, workspace, local)."""
        self.setup()
        assert self._uri_source is not None
        return self._uri_source

    @property
    def experiment_id(self) -> str:
        return self.setup()[1]

    @property
    def experiment_name(self) -> str:
        self.setup()
        assert self._experiment_name is not None
        return self._experiment_name

    @property
    def fell_back_to_local(self) -> bool:
        return self._fell_back or self._push_to is not None

    @property
    def offline(self) -> bool:
        """Whether runs go to the local store because the tracking store did not answer."""
        return self._push_to is not None

    @property
    def store(self) -> Store:
        self.setup()
        assert self._store is not None
        return self._store

    @property
    def spool_dir(self) -> Path:
        if self._spool_dir is not None:
            return self._spool_dir
        from trainkit_tracking._spool import default_spool_dir

        return default_spool_dir(self._environ)

    def _local_uri(self) -> str:
        cwd = self._cwd or Path.cwd()
        return local_store_uri(local_store_path(self._platform, cwd=cwd, project=self._project))

    def resolve_tracking_uri(self) -> tuple[str, str]:
        """Resolve (uri, source) without creating anything (Azure is checked, bounded)."""
        uri, source = self._uri_arg, "argument"
        if not uri:
            uri, source = (
                self._environ.get(_env.MLFLOW_TRACKING_URI) or None,
                _env.MLFLOW_TRACKING_URI,
            )
        workspace = None if uri else _azure.workspace_configured(self._environ, *self._azure_args)
        if workspace is not None or _azure.is_azure_uri(uri):
            try:
                uri = _azure.connect(uri, workspace, timeout=self.azure_timeout)
            except Exception as exc:
                self._azure_failed(exc)
                uri = None
            else:
                source = "azure workspace" if workspace is not None else source
                timeout = self._environ.setdefault(
                    _env.AZUREML_ARTIFACTS_DEFAULT_TIMEOUT, _azure.ARTIFACTS_TIMEOUT_DEFAULT
                )
                # The one documented write to os.environ: azureml-mlflow reads it there.
                os.environ.setdefault(_env.AZUREML_ARTIFACTS_DEFAULT_TIMEOUT, timeout)
        if not uri:
            uri, source = self._local_uri(), "local store"
        return uri, source

    def _azure_failed(self, exc: BaseException) -> None:
        failure = _azure.explain(exc)
        if not self.fallback_to_local:
            raise failure from exc
        self._fell_back = True
        self.warn_once(
            "azure",
            f"Azure ML tracking is not available: {failure.reason}; using the local store "
            f"instead (fallback_to_local=True); to fix it, {failure.fix}",
        )

    def warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(redact_value(message), TrackingWarning, stacklevel=3)

    def setup(self) -> tuple[str, str]:
        """Resolve the tracking URI, create the experiment if needed; returns (uri, experiment id).

        A store that does not answer within ``timeout``: the local store instead (runs
        marked for ``trainkit-tracking push``) with ``fallback_to_local``, else
        ``StoreUnavailableError``.
        """
        with self._lock:
            if self._store is not None and self._experiment_id is not None:
                assert self._tracking_uri is not None
                return self._tracking_uri, self._experiment_id
            uri, source = self.resolve_tracking_uri()
            try:
                self._open(uri, source)
            except StoreUnavailableError as exc:
                self._go_offline(uri, exc)
            assert self._tracking_uri is not None and self._experiment_id is not None
            return self._tracking_uri, self._experiment_id

    def _open(self, uri: str, source: str) -> None:
        db = sqlite_path(uri)
        if db is not None:
            db.parent.mkdir(parents=True, exist_ok=True)
        store = Store(uri, timeout=self.timeout)
        name = self._experiment_arg or self._environ.get(_env.MLFLOW_EXPERIMENT_NAME)
        experiment_id = self._environ.get(_env.MLFLOW_EXPERIMENT_ID) if not name else None
        if self._fell_back or self._push_to is not None:
            experiment_id = None  # an id of the other store means nothing in the local one
        if not name and not experiment_id:
            raise TrackingError(
                "no experiment given: pass Tracker(experiment='name') or set MLFLOW_EXPERIMENT_NAME"
            )
        try:
            if name:
                experiment_id = store.get_or_create_experiment(name)
            else:
                assert experiment_id is not None
                name = store.experiment_name(experiment_id)
        except TrackingError:
            raise
        except Exception as exc:
            raise TrackingError(
                f"the tracking store {redact_value(uri)} refused to open experiment "
                f"{name or experiment_id!r}: {redact_value(str(exc))}"
            ) from exc
        self._tracking_uri, self._uri_source = uri, source
        self._experiment_id, self._experiment_name = experiment_id, name
        self._store = store

    def _go_offline(self, target: str, exc: StoreUnavailableError) -> None:
        """Create runs in the local store from now on, marked for a push to ``target``."""
        local = self._local_uri()
        if not self.fallback_to_local or target == local or Store(target).is_local:
            raise exc  # a local file store that does not answer: another one would not help
        if not (self._experiment_arg or self._environ.get(_env.MLFLOW_EXPERIMENT_NAME)):
            raise TrackingError(
                f"{exc}; the local store cannot stand in for it without an experiment name "
                "(pass Tracker(experiment=...) or set MLFLOW_EXPERIMENT_NAME)"
            ) from exc
        self._push_to = redact_value(target)
        self._store = None
        self._open(local, "local store (offline)")
        self.warn_once(
            "offline",
            f"{exc}. Training goes on: runs are created in the local store {local} and marked "
            f"for `trainkit-tracking push` to {self._push_to} (fallback_to_local=True)",
        )

    # Runs ------------------------------------------------------------------------

    def run_url(self, experiment_id: str, run_id: str) -> str | None:
        uri = self.tracking_uri
        if _azure.is_azure_uri(uri):
            return _azure.studio_url(uri, run_id)
        if uri.startswith(("http://", "https://")):
            # Without user:password@: a link is shown and shared; the browser asks instead.
            parts = urlsplit(uri)
            base = urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
            return f"{base.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
        return None

    def handover_env(self) -> dict[str, str]:
        """The variables every subprocess gets: store, experiment, spool."""
        env = {
            _env.MLFLOW_TRACKING_URI: self.tracking_uri,
            _env.MLFLOW_EXPERIMENT_NAME: self.experiment_name,
            _env.MLFLOW_EXPERIMENT_ID: self.experiment_id,
            _env.TRAINKIT_SPOOL_DIR: str(self.spool_dir),
        }
        if self._project:
            env[_env.TRAINKIT_PROJECT] = self._project
        if _azure.is_azure_uri(self.tracking_uri):
            env[_env.AZUREML_ARTIFACTS_DEFAULT_TIMEOUT] = self._environ.get(
                _env.AZUREML_ARTIFACTS_DEFAULT_TIMEOUT, _azure.ARTIFACTS_TIMEOUT_DEFAULT
            )
            # Keeps azureml-mlflow's job-token sign-in working in the child (join mode
            # replaces it with the joined run); never set after a fallback to local.
            auth_run = _azure.token_auth_run_id(self._environ, self.tracking_uri)
            if auth_run is not None:
                env[_env.MLFLOW_RUN_ID] = auth_run
        return env

    def _collective(self, create: Callable[[], Run], spec: RunSpec | None) -> Run:
        """Rank 0 creates (and broadcasts the id); other ranks get a NoopRun.

        The rank is decided per call: torch.distributed may be initialised after the
        Tracker is built. Other ranks never touch the store.
        """
        if _rank.current_rank(self._environ) != 0:
            return self._noop_collective(spec)
        run: Run | None = None
        try:
            run = create()
        finally:
            if _rank.process_group_active():
                _rank.broadcast_run_id(run.id if run is not None else None)
        assert run is not None
        return run

    def _noop_collective(self, spec: RunSpec | None) -> Run:
        """The non-zero-rank side of a collective start_run/child/attach."""
        run = NoopRun(_rank.broadcast_run_id(None), spec, self)
        if self._system is not None:
            self._system.add_node_leader(run, self)
        return run

    def start_run(
        self, spec: RunSpec, *, parent: Run | str | None = None, resume: bool = False
    ) -> Run:
        """Create (or with ``resume=True`` resume) the run of ``spec``; a child when ``parent``.

        Under torch.distributed this is collective: every rank calls it, rank 0 creates.
        """
        if not isinstance(spec, RunSpec):
            raise TypeError(f"start_run needs a RunSpec, got {type(spec).__name__}")
        return self._collective(lambda: self._start(spec, parent=parent, resume=resume), spec)

    def _start(
        self,
        spec: RunSpec,
        *,
        parent: Run | str | None,
        resume: bool,
        name_override: str | None = None,
    ) -> Run:
        self.setup()
        try:
            return self._create(spec, parent, resume, name_override)
        except StoreUnavailableError as exc:
            with self._lock:
                if self._push_to is None:
                    self._go_offline(self.tracking_uri, exc)
            return self._create(spec, parent, resume, name_override)

    def _create(
        self, spec: RunSpec, parent: Run | str | None, resume: bool, name_override: str | None
    ) -> Run:
        store = self.store
        parent_id, experiment_id, remote_parent = self._parent(parent)
        if parent_id is None and remote_parent is None and not self.fell_back_to_local:
            job_run = _azure.job_run_id(self._environ, self.tracking_uri)
            adopted = self._adopt_job_run(spec, job_run) if job_run is not None else None
            if adopted is not None:
                return adopted
        if resume:  # race-free get-or-create; every caller holds the run
            record = _shared.get_or_create(
                store,
                spec,
                experiment_id,
                lambda: self._find_records(spec, experiment_id),
                lambda: self._new_record(
                    spec, parent_id, remote_parent, experiment_id, name_override
                ),
                timeout=self.timeout,
            )
            return self._make_run(record, spec, owns_status=True, shared=True)
        record = self._new_record(spec, parent_id, remote_parent, experiment_id, name_override)
        return self._make_run(record, spec, owns_status=True)

    def _new_record(
        self,
        spec: RunSpec,
        parent_id: str | None,
        remote_parent: str | None,
        experiment_id: str,
        name_override: str | None,
    ) -> RunRecord:
        store, keys = self.store, self.keys
        tags, name = self._named_tags(spec, experiment_id, name_override)
        tags = tags | creation_tags(keys, run_name=name, parent_run_id=parent_id)
        if self._push_to is not None:
            tags = tags | {keys["push_to"]: self._push_to}
        if remote_parent is not None:
            tags = tags | {keys["remote_parent_id"]: remote_parent}
        record = store.create_run(experiment_id, name, tags)
        if self._push_to is not None:
            _exit.created_offline(self.tracking_uri)
        if spec.run_name is None and name_override is None and self.policy.needs_run_id(spec):
            final = redact_value(self.policy.render(spec, run_id=record.run_id))
            store.rename_run(record.run_id, final)
            store.set_tags(record.run_id, {keys["run_name"]: final})
            record = store.get_run(record.run_id)
        return record

    def _named_tags(
        self, spec: RunSpec, experiment_id: str, name_override: str | None, run_id: str = ""
    ) -> tuple[TagSet, str]:
        """The spec's tags and the run's name (a version claimed when the policy has one)."""
        keys = self.keys
        tags = self._spec_tags(spec)
        name = name_override or spec.run_name
        if name is None and self.policy.is_versioned(spec):
            base = self.policy.base_name(spec)
            version = self._versions.assign(self.store, experiment_id, base)
            name = self.policy.render(spec, version=version)
            tags = tags | {keys["base_name"]: base, keys["version"]: str(version)}
        elif name is None:
            name = self.policy.render(spec, run_id=run_id or None)
        # Names pass the same masking as tag values: MLflow requires mlflow.runName to
        # equal the run's name, and neither may carry a secret.
        name = redact_value(name)
        # The first heartbeat rides on creation; the logger refreshes it from then on.
        tags = tags | {
            keys["heartbeat"]: str(int(time.time())),
            keys["run_spec"]: _handover.spec_identity_json(spec),
        }
        return tags, name

    def _spec_tags(self, spec: RunSpec) -> TagSet:
        return self._context.tags(self.keys) | TagSet.for_spec(
            spec,
            self.keys,
            project=self._project or self.experiment_name,
            sdk_version=__version__,
            environ=self._environ,
        )

    def _parent(self, parent: Run | str | None) -> tuple[str | None, str, str | None]:
        """(parent id in this store, experiment id, parent id in the target store if offline)."""
        if parent is None:
            return None, self.experiment_id, None
        if isinstance(parent, Run):
            if parent.experiment_id and parent._uri == self.tracking_uri:
                return parent.id, parent.experiment_id, None
            parent_id = parent.id
        else:
            parent_id = _handover.check_run_id(parent, "parent")
        if self._push_to is not None:
            try:
                local = self.store.get_run(parent_id)
            except Exception:  # not in the local store: the parent lives in the target
                return None, self.experiment_id, parent_id
            return parent_id, local.experiment_id, None
        return parent_id, self._get_handed_run(parent_id, "parent").experiment_id, None

    def _adopt_job_run(self, spec: RunSpec, run_id: str) -> Run | None:
        """Inside an Azure ML job: take over the run the job created instead of a second one.

        Azure ML owns that run's status (the Run never ends it) and shows the job's
        display name; the policy name goes to ``code.run_name`` and ``run.name``. None
        when the job's run already holds another identity: that start_run then creates
        an ordinary top-level run.
        """
        store, keys = self.store, self.keys
        record = store.get_run(run_id)
        held = record.tags.get(keys["run_key_hash"])
        if held is not None and held != spec.run_key_hash:
            log.info("the Azure ML job's run %s holds another run; creating a new one", run_id)
            return None
        name = record.tags.get(keys["run_name"]) if held is not None else None
        if name is None:
            tags, name = self._named_tags(spec, record.experiment_id, None, run_id=run_id)
            tags = _context.keep_mlflow_tags(tags, record.tags, self.keys)
            store.set_tags(run_id, tags | {keys["run_name"]: name})
            record = store.get_run(run_id)
        return self._make_run(dataclasses.replace(record, name=name), spec, owns_status=False)

    def _make_run(
        self,
        record: RunRecord,
        spec: RunSpec | None,
        *,
        owns_status: bool,
        spec_problem: str | None = None,
        shared: bool = False,
    ) -> Run:
        from trainkit_tracking._logging import RunLogger

        holder = _shared.take_hold(self.store, record.run_id, self.keys) if shared else None
        logger = RunLogger(
            self.tracking_uri,
            record.run_id,
            spool_dir=self.spool_dir,
            flush_interval=self.flush_interval,
            known_params=record.params,
            heartbeat_tag=self.keys["heartbeat"],
            heartbeat_interval=self.heartbeat_interval,
            timeout=self.timeout,
            holder_tag=holder,
        )
        run = Run(
            self,
            run_id=record.run_id,
            name=record.name,
            spec=spec,
            parent_id=record.parent_id,
            experiment_id=record.experiment_id,
            logger=logger,
            owns_status=owns_status,
            spec_problem=spec_problem,
            holder=holder,
        )
        _exit.hold(run, self.exit_timeout)
        if self._system is not None:
            self._system.add(run)
        return run

    def _release(self, run: Run, timeout: float | None = None) -> bool:
        """Stop sampling system metrics into ``run``; False if its node's metrics were not stored."""
        return self._system.remove(run, timeout) if self._system is not None else True

    # Handover ----------------------------------------------------------------------

    def attach(self) -> Run:
        """In a subprocess: join the run handed over through the environment, or create its child."""
        return self._collective(self._attach, None)

    def _attach(self) -> Run:
        self.setup()
        handover = _handover.read_handover(self._environ, fell_back=self.fell_back_to_local)
        if handover.run_id is not None:
            record = self._get_handed_run(handover.run_id, handover.source)
            spec, problem = _handover.spec_from_tags(record.tags, self.keys)
            return self._make_run(record, spec, owns_status=False, spec_problem=problem)
        assert handover.parent_id is not None
        spec = handover.spec
        if spec is None:  # the seed's variables: the child's spec comes from its parent
            parent = self._get_handed_run(handover.parent_id, handover.source)
            spec = _handover.seed_child_spec(
                handover.parent_id, parent.tags, self._environ, self.keys
            )
        return self._start(
            spec, parent=handover.parent_id, resume=False, name_override=handover.name
        )

    def _get_handed_run(self, run_id: str, source: str) -> RunRecord:
        """Read a run named by the caller or the environment, with an error that says why not."""
        _handover.check_run_id(run_id, source)
        try:
            return self.store.get_run(run_id)
        except StoreUnavailableError:
            raise
        except Exception as exc:
            hint = (
                " (the tracker fell back to the local store, where that run does not exist)"
                if self.fell_back_to_local
                else ""
            )
            raise TrackingError(
                f"run {run_id!r} from {source} is not in the store "
                f"{redact_value(self.tracking_uri)}{hint}: {redact_value(str(exc))}"
            ) from exc

    # Queries -------------------------------------------------------------------------

    def _find_records(self, spec: RunSpec, experiment_id: str | None = None) -> list[RunRecord]:
        key = self.keys["run_key_hash"]
        return self.store.search(
            [experiment_id or self.experiment_id], f"tags.`{key}` = '{spec.run_key_hash}'"
        )

    def find(self, spec: RunSpec) -> list[str]:
        """Ids of the runs in the experiment with the same identity, newest first."""
        return [record.run_id for record in self._find_records(spec)]

    def lineage(self, run_id: str) -> Lineage:
        """The lineage a final_training run trained from this HPO trial/refit/sweep should carry."""
        from trainkit_tracking._lineage import lineage_of

        return lineage_of(self.store, self.keys, run_id)

    def open_runs(self) -> list[Run]:
        """The runs of this tracker that this process has not ended yet."""
        return [run for run in _exit.open_runs() if run._tracker is self]

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


def _seconds(
    value: float | None, name: str, environ: Mapping[str, str], variable: str, default: float
) -> float:
    if value is None:
        value = _env.read_seconds(environ, variable)
        return default if value is None else value
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise ValueError(f"{name} must be a number of seconds > 0, got {value!r}")
    return float(value)
