"""Tracker: the facade that resolves the store, creates the run tree and hands runs over."""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import re
import sys
import threading
import time
import warnings
import weakref
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any

from trainkit_tracking import _azure, _context, _env, _rank, _system
from trainkit_tracking._naming import NamingPolicy
from trainkit_tracking._platform import Platform, detect_platform, local_store_path, local_store_uri
from trainkit_tracking._runs import NoopRun, Run
from trainkit_tracking._store import RunRecord, Store
from trainkit_tracking._tags import TagKeys, TagSet, creation_tags
from trainkit_tracking._version import __version__
from trainkit_tracking.errors import TrackingError, TrackingWarning
from trainkit_tracking.models import IDENTITY_FIELDS, Lineage, RunKind, RunSpec, validate_run_id

log = logging.getLogger(__name__)

_HANDED_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

_SEED_INHERITED_TAGS = {
    "model": "model",
    "study_key_hash": "study_key_hash",
    "study_family_hash": "study_family_hash",
    "trial_key_hash": "trial_key_hash",
    "storage_env": "storage_env",
    "env": "environment",
    "project": "project",
}


class Tracker:
    """Resolves the tracking store and experiment, and creates, resumes and joins runs.

    Nothing touches the network or the disk until first use; ``setup()`` does it
    explicitly. The environment is read once, when the Tracker is built.
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
        self._spool_dir = Path(spool_dir) if spool_dir is not None else None
        self.flush_interval = flush_interval
        self.azure_timeout = azure_timeout
        self._azure_args = (subscription_id, resource_group, workspace_name)
        self._cwd = Path(cwd) if cwd is not None else None
        self._platform: Platform = detect_platform(self._environ)
        self._lock = threading.RLock()
        self._store: Store | None = None
        self._tracking_uri: str | None = None
        self._uri_source: str | None = None
        self._experiment_id: str | None = None
        self._experiment_name: str | None = None
        self._fell_back = False
        self._warned: set[str] = set()
        self._open: weakref.WeakSet[Run] = weakref.WeakSet()
        self._atexit_registered = False
        self._next_version: dict[tuple[str, str], int] = {}  # a hint only: claims decide
        self._intact: dict[str, bool] = {}  # per experiment: no `mlflow gc` purged claims
        # Run context tags and system metrics (docs/context.md): env validated here.
        self._context = _context.RunContext(self._environ, self._cwd, enabled=context)
        self._system = _system.sampler(
            self._environ, self._cwd, system_metrics, system_metrics_interval
        )

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **kwargs: Any) -> Tracker:
        """A Tracker configured from the environment only (SPEC section 6)."""
        return cls(environ=environ, **kwargs)

    # Resolution ------------------------------------------------------------------

    @property
    def platform(self) -> Platform:
        return self._platform

    @property
    def tracking_uri(self) -> str:
        self.setup()
        assert self._tracking_uri is not None
        return self._tracking_uri

    @property
    def uri_source(self) -> str:
        """Where the tracking URI came from (argument, environment, workspace, local)."""
        self.setup()
        assert self._uri_source is not None
        return self._uri_source

    @property
    def experiment_id(self) -> str:
        self.setup()
        assert self._experiment_id is not None
        return self._experiment_id

    @property
    def experiment_name(self) -> str:
        self.setup()
        assert self._experiment_name is not None
        return self._experiment_name

    @property
    def fell_back_to_local(self) -> bool:
        return self._fell_back

    @property
    def store(self) -> Store:
        self.setup()
        assert self._store is not None
        return self._store

    @property
    def spool_dir(self) -> Path:
        if self._spool_dir is not None:
            return self._spool_dir
        from trainkit_tracking._logging import default_spool_dir

        return default_spool_dir(self._environ)

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
            cwd = self._cwd or Path.cwd()
            path = local_store_path(self._platform, cwd=cwd, project=self._project)
            uri, source = local_store_uri(path), "local store"
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
            warnings.warn(message, TrackingWarning, stacklevel=3)

    def setup(self) -> tuple[str, str]:
        """Resolve the tracking URI, create the experiment if needed; returns (uri, experiment id)."""
        with self._lock:
            if self._store is not None and self._experiment_id is not None:
                assert self._tracking_uri is not None
                return self._tracking_uri, self._experiment_id
            uri, source = self.resolve_tracking_uri()
            if uri.startswith("sqlite:///"):
                Path(uri[len("sqlite:///") :]).parent.mkdir(parents=True, exist_ok=True)
            store = Store(uri)
            name = self._experiment_arg or self._environ.get(_env.MLFLOW_EXPERIMENT_NAME)
            experiment_id = self._environ.get(_env.MLFLOW_EXPERIMENT_ID) if not name else None
            if self._fell_back:
                experiment_id = None  # an Azure experiment id means nothing in the local store
            try:
                if name:
                    experiment_id = store.get_or_create_experiment(name)
                elif experiment_id:
                    name = store.experiment_name(experiment_id)
                else:
                    raise TrackingError(
                        "no experiment given: pass Tracker(experiment='name') or set "
                        "MLFLOW_EXPERIMENT_NAME"
                    )
            except TrackingError:
                raise
            except Exception as exc:
                raise TrackingError(
                    f"the tracking store {uri!r} did not answer ({exc}); check that it is "
                    "running and reachable"
                ) from exc
            self._tracking_uri, self._uri_source = uri, source
            self._experiment_id, self._experiment_name = experiment_id, name
            self._store = store
            return uri, experiment_id

    # Runs ------------------------------------------------------------------------

    def run_url(self, experiment_id: str, run_id: str) -> str | None:
        uri = self.tracking_uri
        if _azure.is_azure_uri(uri):
            return _azure.studio_url(uri, run_id)
        if uri.startswith(("http://", "https://")):
            return f"{uri.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}"
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

    def _is_rank_zero(self) -> bool:
        # Decided per call, not cached: torch.distributed may be initialised after the
        # Tracker is built. Ranks other than 0 never touch the store (no setup, no
        # migration race on a fresh sqlite file).
        return _rank.current_rank(self._environ) == 0

    def _noop_collective(self, spec: RunSpec | None) -> Run:
        """The non-zero-rank side of a collective start_run/child/attach."""
        run = NoopRun(_rank.broadcast_run_id(None), spec, self)
        if self._system is not None:
            self._system.add_node_leader(run, self)
        return run

    def _collective(self, create: Callable[[], Run], spec: RunSpec | None) -> Run:
        """Rank 0 creates (and broadcasts the id); other ranks get a NoopRun."""
        if not self._is_rank_zero():
            return self._noop_collective(spec)
        run: Run | None = None
        try:
            run = create()
        finally:
            if _rank.process_group_active():
                _rank.broadcast_run_id(run.id if run is not None else None)
        assert run is not None
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
        store = self.store
        parent_id, experiment_id = self._parent(parent)
        if parent_id is None:
            job_run = _azure.job_run_id(self._environ, self.tracking_uri)
            adopted = self._adopt_job_run(spec, job_run) if job_run is not None else None
            if adopted is not None:
                return adopted
        if resume:
            for record in self._find_records(spec, experiment_id):
                if record.status != "FINISHED":
                    if record.status != "RUNNING":
                        store.set_status(record.run_id, "RUNNING")
                    return self._make_run(record, spec, owns_status=True)
        tags = self._spec_tags(spec)
        name = name_override or spec.run_name
        if name is None and self.policy.is_versioned(spec):
            base = self.policy.base_name(spec)
            version = self._assign_version(experiment_id, base)
            name = self.policy.render(spec, version=version)
            tags = tags | {self.keys["base_name"]: base, self.keys["version"]: str(version)}
        elif name is None:
            name = self.policy.render(spec)
        tags = tags | creation_tags(self.keys, run_name=name, parent_run_id=parent_id)
        # The first heartbeat rides on creation; the logger refreshes it from then on.
        tags = tags | {
            self.keys["heartbeat"]: str(int(time.time())),
            self.keys["run_spec"]: spec_identity_json(spec),
        }
        record = store.create_run(experiment_id, name, tags)
        if spec.run_name is None and name_override is None and self.policy.needs_run_id(spec):
            final = self.policy.render(spec, run_id=record.run_id)
            store.rename_run(record.run_id, final)
            store.set_tags(record.run_id, {self.keys["run_name"]: final})
            record = store.get_run(record.run_id)
        return self._make_run(record, spec, owns_status=True)

    def _assign_version(self, experiment_id: str, base: str) -> int:
        """Claim the next version of ``base`` in the experiment (see docs/tracker.md)."""
        key = (experiment_id, base)
        cached = self._next_version.get(key)
        intact = cached is not None or self._claims_intact(experiment_id)  # before claiming
        version = self.store.claim_version(experiment_id, base, cached or 1)
        if not intact:
            # Claims alone decide, unless an admin ran `mlflow gc`, which purges
            # soft-deleted experiments, claims included. Then, the first time this
            # process names a base, check that no live run already carries the number.
            highest = self._highest_version(experiment_id, base)
            if highest >= version:
                version = self.store.claim_version(experiment_id, base, highest + 1)
        self._next_version[key] = version + 1
        return version

    def _claims_intact(self, experiment_id: str) -> bool:
        intact = self._intact.get(experiment_id)
        if intact is None:
            intact = self.store.claims_intact(experiment_id, self.keys["version"])
            self._intact[experiment_id] = intact
        return intact

    def _highest_version(self, experiment_id: str, base: str) -> int:
        if "'" in base or "\\" in base:
            return 0  # not expressible in a filter string; claims still hold
        records = self.store.search([experiment_id], f"tags.`{self.keys['base_name']}` = '{base}'")
        numbers = [r.tags.get(self.keys["version"], "") for r in records]
        return max((int(n) for n in numbers if n.isdigit()), default=0)

    def _spec_tags(self, spec: RunSpec) -> TagSet:
        return self._context.tags(self.keys) | TagSet.for_spec(
            spec,
            self.keys,
            project=self._project or self.experiment_name,
            sdk_version=__version__,
            environ=self._environ,
        )

    def _parent(self, parent: Run | str | None) -> tuple[str | None, str]:
        if parent is None:
            return None, self.experiment_id
        if isinstance(parent, Run):
            if parent.experiment_id:
                return parent.id, parent.experiment_id
            parent = parent.id
        return parent, self._get_handed_run(parent, "parent").experiment_id

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
            tags = _context.keep_mlflow_tags(self._spec_tags(spec), record.tags, self.keys)
            name = spec.run_name
            if name is None and self.policy.is_versioned(spec):
                experiment_id = record.experiment_id
                base = self.policy.base_name(spec)
                version = self._assign_version(experiment_id, base)
                name = self.policy.render(spec, version=version)
                tags = tags | {keys["base_name"]: base, keys["version"]: str(version)}
            elif name is None:
                name = self.policy.render(spec, run_id=run_id)
            created = {
                keys["run_name"]: name,
                keys["heartbeat"]: str(int(time.time())),
                keys["run_spec"]: spec_identity_json(spec),
            }
            store.set_tags(run_id, tags | created)
            record = store.get_run(run_id)
        return self._make_run(dataclasses.replace(record, name=name), spec, owns_status=False)

    def _make_run(self, record: RunRecord, spec: RunSpec | None, *, owns_status: bool) -> Run:
        from trainkit_tracking._logging import RunLogger

        logger = RunLogger(
            self.tracking_uri,
            record.run_id,
            spool_dir=self.spool_dir,
            flush_interval=self.flush_interval,
            known_params=record.params,
            heartbeat_tag=self.keys["heartbeat"],
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
        )
        with self._lock:
            self._open.add(run)
            if not self._atexit_registered:
                # Registered after the logger's own exit hook, so it runs first (LIFO).
                atexit.register(_end_open_runs, weakref.ref(self))
                _watch_uncaught(self)
                self._atexit_registered = True
        if self._system is not None:
            self._system.add(run)
        return run

    def _forget(self, run: Run) -> None:
        with self._lock:
            self._open.discard(run)
        self._release(run)

    def _release(self, run: Run, timeout: float | None = None) -> bool:
        """Stop sampling system metrics into ``run``; False if its node's metrics were not stored."""
        return self._system.remove(run, timeout) if self._system is not None else True

    # Handover ----------------------------------------------------------------------

    def attach(self) -> Run:
        """In a subprocess: join the run handed over through the environment, or create its child."""
        return self._collective(self._attach, None)

    def _attach(self) -> Run:
        env = self._environ
        run_id = env.get(_env.TRAINKIT_RUN_ID)
        spec_json = env.get(_env.TRAINKIT_RUN_SPEC)
        parent_id = env.get(_env.TRAINKIT_PARENT_RUN_ID)
        name = env.get(_env.MLFLOW_RUN_NAME) or None
        if run_id:
            return self._join(run_id)
        if parent_id and spec_json:
            spec = RunSpec.model_validate_json(spec_json)
            return self._start(spec, parent=parent_id, resume=False, name_override=name)
        seed_parent = env.get(_env.MLFLOW_PARENT_RUN_ID)
        if seed_parent:
            spec = self._seed_child_spec(seed_parent)
            return self._start(spec, parent=seed_parent, resume=False, name_override=name)
        if env.get(_env.MLFLOW_RUN_ID) and not self._fell_back:
            return self._join(env[_env.MLFLOW_RUN_ID])
        raise TrackingError(
            "nothing to attach to: the parent process must hand over a run with "
            "run.subprocess_env() (TRAINKIT_RUN_ID, or TRAINKIT_PARENT_RUN_ID and "
            "TRAINKIT_RUN_SPEC), or set MLFLOW_RUN_ID / MLFLOW_PARENT_RUN_ID"
        )

    def _join(self, run_id: str) -> Run:
        record = self._get_handed_run(run_id, _env.TRAINKIT_RUN_ID)
        spec = _spec_from_tags(record.tags, self.keys)
        return self._make_run(record, spec, owns_status=False)

    def _get_handed_run(self, run_id: str, source: str) -> RunRecord:
        """Read a run named by the caller or the environment, with an error that says why not.

        Run ids are MLflow's 32-hex ids on most stores, but an Azure ML job's run id is
        its job name, so only the character set is checked here.
        """
        if not isinstance(run_id, str) or not _HANDED_RUN_ID.match(run_id):
            raise TrackingError(f"{source} must be a run id, got {run_id!r}")
        try:
            return self.store.get_run(run_id)
        except Exception as exc:
            hint = (
                " (the tracker fell back to the local store, where the Azure run does not exist)"
                if self._fell_back
                else ""
            )
            raise TrackingError(
                f"run {run_id!r} from {source} is not in the store {self.tracking_uri!r}{hint}: {exc}"
            ) from exc

    def _seed_child_spec(self, parent_id: str) -> RunSpec:
        parent = self._get_handed_run(parent_id, _env.MLFLOW_PARENT_RUN_ID)
        fields: dict[str, Any] = {}
        for logical, field in _SEED_INHERITED_TAGS.items():
            value = parent.tags.get(self.keys[logical])
            if value:
                fields[field] = value
        if "model" not in fields:
            raise TrackingError(
                f"parent run {parent_id!r} has no {self.keys['model']!r} tag; create it with "
                "trainkit_tracking or hand the child over with run.subprocess_env(child=spec)"
            )
        trial = self._environ.get(_env.MLFLOW_TRIAL_NUMBER) or parent.tags.get(
            self.keys["trial_number"]
        )
        fold = self._environ.get(_env.MLFLOW_FOLD_IDX)
        fields["kind"] = RunKind.HPO_TRIAL_FOLD if fold else RunKind.HPO_TRIAL
        if trial:
            fields["trial_number"] = int(trial)
        if fold:
            fields["fold_idx"] = int(fold)
        return RunSpec(**fields)

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
        validate_run_id(run_id)
        record = self.store.get_run(run_id)
        tags, keys = record.tags, self.keys
        kind = tags.get(keys["run_kind"])
        study = tags.get(keys["study_key_hash"])
        trial_key = tags.get(keys["trial_key_hash"])
        if kind == RunKind.HPO_TRIAL.value:
            return Lineage(
                hpo_study_key_hash=study,
                hpo_trial_key_hash=trial_key,
                hpo_trial_run_id=run_id,
                hpo_sweep_run_id=record.parent_id,
            )
        if kind == RunKind.HPO_REFIT.value:
            trial_run = self._trial_of_refit(record)
            if trial_key is None and trial_run is not None:
                trial_key = trial_run.tags.get(keys["trial_key_hash"])
            return Lineage(
                hpo_study_key_hash=study,
                hpo_trial_key_hash=trial_key,
                hpo_trial_run_id=trial_run.run_id if trial_run else None,
                hpo_refit_run_id=run_id,
                hpo_sweep_run_id=record.parent_id,
            )
        if kind == RunKind.HPO_SWEEP.value:
            best = tags.get("best_trial_run_id")
            best_record = self.store.get_run(best) if best else None
            return Lineage(
                hpo_study_key_hash=study,
                hpo_trial_key_hash=best_record.tags.get(keys["trial_key_hash"])
                if best_record
                else None,
                hpo_trial_run_id=best,
                hpo_sweep_run_id=run_id,
            )
        if kind == RunKind.FINAL_TRAINING.value:
            return Lineage(source="final_training", parent_training_run_id=run_id)
        raise TrackingError(
            f"run {run_id!r} is a {kind or 'non-trainkit'} run; lineage comes from an "
            "hpo_trial, hpo_refit, hpo_sweep or final_training run"
        )

    def _trial_of_refit(self, refit: RunRecord) -> RunRecord | None:
        if refit.parent_id is None:
            return None
        keys = self.keys
        number = refit.tags.get(keys["trial_number"])
        if number is None:
            return None
        records = self.store.search(
            [refit.experiment_id],
            f"tags.`mlflow.parentRunId` = '{refit.parent_id}' and "
            f"tags.`{keys['run_kind']}` = 'hpo_trial' and tags.`{keys['trial_number']}` = '{number}'",
        )
        return records[0] if records else None

    def close(self, timeout: float | None = 10.0, *, status: str = "FINISHED") -> None:
        """End every run this tracker still has open (default FINISHED) and flush."""
        for run in list(self._open):
            if status == "KILLED":
                run._interrupted()
            else:
                run.end(status, timeout=timeout)


def spec_identity_json(spec: RunSpec) -> str:
    """The identity fields of ``spec`` (and its environment) as compact JSON."""
    return spec.model_dump_json(include={*IDENTITY_FIELDS, "environment"}, exclude_none=True)


def _spec_from_tags(tags: Mapping[str, str], keys: TagKeys) -> RunSpec | None:
    """Rebuild the RunSpec of a run from its tags (for joined runs), when it has them."""
    stored = tags.get(keys["run_spec"])
    if stored:
        try:
            return RunSpec.model_validate_json(stored)
        except ValueError:
            pass  # written by another version: fall back to the individual tags
    fields: dict[str, Any] = {}
    mapping = {
        "run_kind": "kind",
        "model": "model",
        "project": "project",
        "env": "environment",
        "storage_env": "storage_env",
        "study_name": "study_name",
        "study_key_hash": "study_key_hash",
        "study_family_hash": "study_family_hash",
        "trial_key_hash": "trial_key_hash",
        "trial_number": "trial_number",
        "variant": "variant",
        "fold_idx": "fold_idx",
        "spec_fp": "spec_fp",
        "exec_fp": "exec_fp",
        "conv_fp": "conv_fp",
        "parent_training_id": "parent_training_id",
        "benchmark_config_hash": "benchmark_config_hash",
        "refit_protocol_fp": "refit_protocol_fp",
        "group_id": "group_id",
    }
    for logical, field in mapping.items():
        value = tags.get(keys[logical])
        if value:
            fields[field] = value
    if "kind" not in fields or "model" not in fields:
        return None
    try:
        return RunSpec(**fields)
    except Exception:
        return None


_WATCHED: weakref.WeakSet[Tracker] = weakref.WeakSet()


def _watch_uncaught(tracker: Tracker) -> None:
    """End open runs FAILED (KILLED for Ctrl-C) when the program dies of an uncaught error.

    sys.excepthook is Python's documented hook for this; ours calls the previous one.
    Without it, the exit hook below would mark the runs of a crashed script FINISHED.
    """
    if not _WATCHED:
        previous = sys.excepthook

        def hook(
            exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
        ) -> None:
            status = "KILLED" if issubclass(exc_type, KeyboardInterrupt) else "FAILED"
            for watched in list(_WATCHED):
                try:
                    watched.close(timeout=10.0, status=status)
                except Exception as error:  # never hide the user's traceback
                    log.warning("could not end open runs after an uncaught error: %s", error)
            previous(exc_type, exc, tb)

        sys.excepthook = hook
    _WATCHED.add(tracker)


def _end_open_runs(ref: weakref.ref[Tracker]) -> None:
    tracker = ref()
    if tracker is not None:
        try:
            tracker.close(timeout=10.0)
        except Exception as exc:  # never fail interpreter exit
            log.warning("could not end open runs at exit: %s", exc)
