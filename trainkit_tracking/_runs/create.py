"""How a Tracker makes a Run: create (named, tagged, versioned), resume, adopt an Azure ML
job's run, or attach to the run a parent process handed over."""

from __future__ import annotations

import dataclasses
import secrets
import time
from collections.abc import Callable
from pathlib import Path
from typing import Protocol

from trainkit_tracking._core.naming import NamingPolicy
from trainkit_tracking._core.redact import get_logger, redact_value
from trainkit_tracking._core.spec import RunKind, RunSpec
from trainkit_tracking._core.tags import TagSet, creation_tags
from trainkit_tracking._insight import context as _context
from trainkit_tracking._insight.system import Sampler
from trainkit_tracking._process import rank as _rank
from trainkit_tracking._runs import exit as _exit
from trainkit_tracking._runs import handover as _handover
from trainkit_tracking._runs import shared as _shared
from trainkit_tracking._runs.lineage import lineage_links, lineage_note, reader
from trainkit_tracking._runs.other_ranks import NoopRun
from trainkit_tracking._runs.resolve import Resolution, run_url
from trainkit_tracking._runs.run import Run, RunOwner
from trainkit_tracking._store import azure as _azure
from trainkit_tracking._store.store import RunRecord
from trainkit_tracking._store.versions import Versions
from trainkit_tracking._version import __version__
from trainkit_tracking.errors import StoreUnavailableError, TrackingError

log = get_logger(__name__)


class Tracker(RunOwner, Protocol):
    """What making a run needs of the Tracker (``tracker.py`` implements it; this module is
    the Tracker's implementation of start_run and attach, split off for size)."""

    policy: NamingPolicy
    timeout: float
    heartbeat_interval: float
    flush_interval: float
    _environ: dict[str, str]
    _project: str | None
    _where: Resolution
    _versions: Versions
    _context: _context.RunContext
    _system: Sampler | None

    @property
    def tracking_uri(self) -> str: ...

    @property
    def experiment_id(self) -> str: ...

    @property
    def experiment_name(self) -> str: ...

    @property
    def spool_dir(self) -> Path: ...

    @property
    def offline(self) -> bool: ...

    @property
    def fell_back_to_local(self) -> bool: ...

    def setup(self) -> tuple[str, str]: ...

    def resolve_tracking_uri(self) -> tuple[str, str]: ...


def collective(tracker: Tracker, create: Callable[[], Run], spec: RunSpec | None) -> Run:
    """Rank 0 creates (and broadcasts the id); other ranks get a NoopRun.

    The rank is decided per call: torch.distributed may be initialised after the Tracker
    is built. Other ranks never touch the store.
    """
    if _rank.current_rank(tracker._environ) != 0:
        return noop(tracker, spec)
    run: Run | None = None
    try:
        run = create()
    finally:
        if _rank.process_group_active():
            _rank.broadcast_run_id(run.id if run is not None else None)
    assert run is not None
    return run


def noop(tracker: Tracker, spec: RunSpec | None) -> Run:
    """The non-zero-rank side of a collective start_run/child/attach."""
    run = NoopRun(_rank.broadcast_run_id(None), spec, tracker)
    if tracker._system is not None:
        tracker._system.add_node_leader(run, tracker)
    return run


def start(
    tracker: Tracker,
    spec: RunSpec,
    *,
    parent: Run | str | None,
    resume: bool,
    name_override: str | None = None,
) -> Run:
    """Create (or resume) the run of ``spec``; offline in the local store if the store
    stops answering."""
    tracker.setup()
    try:
        return _create(tracker, spec, parent, resume, name_override)
    except StoreUnavailableError as exc:
        tracker._where.store_failed(exc)
        return _create(tracker, spec, parent, resume, name_override)


def _create(
    tracker: Tracker,
    spec: RunSpec,
    parent: Run | str | None,
    resume: bool,
    name_override: str | None,
) -> Run:
    store = tracker.store
    parent_id, experiment_id, remote_parent = _parent(tracker, parent)
    if spec.kind == RunKind.HPO_TRIAL_FOLD and parent_id is not None:
        _made_a_fold(parent, parent_id)
    if parent_id is None and remote_parent is None and not tracker.fell_back_to_local:
        job_run = _azure.job_run_id(tracker._environ, tracker.tracking_uri)
        adopted = _adopt_job_run(tracker, spec, job_run) if job_run is not None else None
        if adopted is not None:
            return adopted
    if resume:  # race-free get-or-create; every caller holds the run
        record = _shared.get_or_create(
            store,
            spec,
            experiment_id,
            lambda: find_records(tracker, spec, experiment_id, include_deleted=True),
            lambda: _new_record(
                tracker, spec, parent_id, remote_parent, experiment_id, name_override
            ),
            timeout=tracker.timeout,
        )
        return make_run(tracker, record, spec, owns_status=True, shared=True)
    record = _new_record(tracker, spec, parent_id, remote_parent, experiment_id, name_override)
    return make_run(tracker, record, spec, owns_status=True, fresh=True)


def _new_record(
    tracker: Tracker,
    spec: RunSpec,
    parent_id: str | None,
    remote_parent: str | None,
    experiment_id: str,
    name_override: str | None,
) -> RunRecord:
    store, keys, push_to = tracker.store, tracker.keys, tracker._where.push_to
    tags, name = _named_tags(tracker, spec, experiment_id, name_override)
    tags = tags | creation_tags(keys, run_name=name, parent_run_id=parent_id)
    if push_to is not None:
        tags = tags | {keys["push_to"]: push_to}
    if remote_parent is not None:
        tags = tags | {keys["remote_parent_id"]: remote_parent}
    tags = tags | {keys["creation_id"]: secrets.token_hex(16)}
    _check_storable(name, tags)
    record = store.create_run(experiment_id, name, tags, id_tag=keys["creation_id"])
    if push_to is not None:
        _exit.created_offline(tracker.tracking_uri)
    policy = tracker.policy
    if spec.run_name is None and name_override is None and policy.needs_run_id(spec):
        final = redact_value(policy.render(spec, run_id=record.run_id))
        store.rename_run(record.run_id, final)
        store.set_tags(record.run_id, {keys["run_name"]: final})
        record = store.get_run(record.run_id)
    return record


def _named_tags(
    tracker: Tracker, spec: RunSpec, experiment_id: str, name_override: str | None, run_id: str = ""
) -> tuple[TagSet, str]:
    """The spec's tags and the run's name (a version claimed when the policy has one)."""
    keys, policy = tracker.keys, tracker.policy
    tags = spec_tags(tracker, spec)
    name = name_override or spec.run_name
    if name is None and policy.is_versioned(spec):
        base = policy.base_name(spec)
        version = tracker._versions.assign(tracker.store, experiment_id, base)
        name = policy.render(spec, version=version)
        tags = tags | {keys["base_name"]: base, keys["version"]: str(version)}
    elif name is None:
        name = policy.render(spec, run_id=run_id or None)
    # Names pass the same masking as tag values: MLflow requires mlflow.runName to
    # equal the run's name, and neither may carry a secret.
    name = redact_value(name)
    note = _lineage_note(tracker, tags)
    if note is not None:
        tags = tags | {keys["description"]: note}
    # The first heartbeat rides on creation; the logger refreshes it from then on.
    tags = tags | {
        keys["heartbeat"]: str(int(time.time())),
        keys["run_spec"]: _handover.spec_identity_json(spec),
    }
    return tags, name


def _check_storable(name: str, tags: TagSet) -> None:
    """What every store can take at creation: PostgreSQL-backed stores refuse a NUL
    character (after a long wait for MLflow's retries), and a run's identity with one is a
    mistake anywhere, so it is said here, before any store call."""
    for key, value in {"the run name": name, **{f"tag {k!r}": v for k, v in tags.items()}}.items():
        if "\x00" in value:
            raise TrackingError(
                f"{key} has a NUL character (\\x00) in {value[:100]!r}; remove it from the "
                "spec (its tags, model, study name...): tag values are text, and "
                "PostgreSQL-backed stores refuse NUL"
            )


def _lineage_note(tracker: Tracker, tags: TagSet) -> str | None:
    """The description of a final, benchmark or conversion run: links to the runs it comes
    from (run ids where the store has no UI). A description in spec.tags wins."""
    keys = tracker.keys
    links = lineage_links(tags, keys)
    if not links or keys["description"] in tags:
        return None
    uri = tracker.tracking_uri
    return lineage_note(
        links,
        reader(tracker.store),
        lambda record: run_url(uri, record.experiment_id, record.run_id),
    )


def spec_tags(tracker: Tracker, spec: RunSpec) -> TagSet:
    """The run context's tags and the spec's."""
    return tracker._context.tags(tracker.keys) | TagSet.for_spec(
        spec,
        tracker.keys,
        project=tracker._project or tracker.experiment_name,
        sdk_version=__version__,
        environ=tracker._environ,
    )


def _made_a_fold(parent: Run | str | None, parent_id: str) -> None:
    """Tell the parent's Run (when this process holds it) that it has a fold to summarise."""
    for run in [parent, *_exit.open_runs()]:
        if isinstance(run, Run) and run._id == parent_id:
            run._made_folds = True


def _parent(tracker: Tracker, parent: Run | str | None) -> tuple[str | None, str, str | None]:
    """(parent id in this store, experiment id, parent id in the target store if offline)."""
    if parent is None:
        return None, tracker.experiment_id, None
    if isinstance(parent, Run):
        if parent.experiment_id and parent._uri == tracker.tracking_uri:
            return parent._id, parent.experiment_id, None
        parent_id = parent._id
    else:
        parent_id = _handover.check_run_id(parent, "parent")
    if tracker.offline:
        try:
            local = tracker.store.get_run(parent_id)
        except Exception:  # not in the local store: the parent lives in the target
            return None, tracker.experiment_id, parent_id
        return parent_id, local.experiment_id, None
    return parent_id, get_handed_run(tracker, parent_id, "parent").experiment_id, None


def _adopt_job_run(tracker: Tracker, spec: RunSpec, run_id: str) -> Run | None:
    """Inside an Azure ML job: take over the run the job created instead of a second one.

    Azure ML owns that run's status (the Run never ends it) and shows the job's display
    name; the policy name goes to ``code.run_name`` and ``run.name``. None when the job's
    run already holds another identity: that start_run then creates an ordinary
    top-level run.
    """
    store, keys = tracker.store, tracker.keys
    record = store.get_run(run_id)
    held = record.tags.get(keys["run_key_hash"])
    if held is not None and held != spec.run_key_hash:
        log.info("the Azure ML job's run %s holds another run; creating a new one", run_id)
        return None
    name = record.tags.get(keys["run_name"]) if held is not None else None
    if name is None:
        tags, name = _named_tags(tracker, spec, record.experiment_id, None, run_id=run_id)
        tags = _context.keep_mlflow_tags(tags, record.tags, keys)
        store.set_tags(run_id, tags | {keys["run_name"]: name})
        record = store.get_run(run_id)
    return make_run(tracker, dataclasses.replace(record, name=name), spec, owns_status=False)


def make_run(
    tracker: Tracker,
    record: RunRecord,
    spec: RunSpec | None,
    *,
    owns_status: bool,
    spec_problem: str | None = None,
    shared: bool = False,
    fresh: bool = False,
) -> Run:
    """The Run of ``record``: its logger, its hold on the exit path and system metrics.

    ``fresh``: created by this call, so no other process can know it yet (until its id
    is read or handed over): its end reads fold children only if it may have some.
    """
    from trainkit_tracking._journal.run_logger import RunLogger

    store, keys = tracker.store, tracker.keys
    holder = _shared.take_hold(store, record.run_id, keys) if shared else None
    logger = RunLogger(
        tracker.tracking_uri,
        record.run_id,
        spool_dir=tracker.spool_dir,
        flush_interval=tracker.flush_interval,
        known_params=record.params,
        heartbeat_tag=keys["heartbeat"],
        heartbeat_interval=tracker.heartbeat_interval,
        timeout=tracker.timeout,
        holder_tag=holder,
        max_params=store.params_per_run,
    )
    run = Run(
        tracker,
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
    _exit.hold(run, tracker.exit_timeout)
    if tracker._system is not None:
        tracker._system.add(run)
    run._known_only_here = fresh  # from now on, reading run.id hands it out
    return run


def attach(tracker: Tracker) -> Run:
    """Join the run handed over through the environment, or create its child."""
    tracker.setup()
    handover = _handover.read_handover(tracker._environ, fell_back=tracker.fell_back_to_local)
    if handover.run_id is not None:
        record = get_handed_run(tracker, handover.run_id, handover.source)
        spec, problem = _handover.spec_from_tags(record.tags, tracker.keys)
        return make_run(tracker, record, spec, owns_status=False, spec_problem=problem)
    assert handover.parent_id is not None
    spec = handover.spec
    if spec is None:  # the seed's variables: the child's spec comes from its parent
        parent = get_handed_run(tracker, handover.parent_id, handover.source)
        spec = _handover.seed_child_spec(
            handover.parent_id, parent.tags, tracker._environ, tracker.keys
        )
    return start(
        tracker, spec, parent=handover.parent_id, resume=False, name_override=handover.name
    )


def get_handed_run(tracker: Tracker, run_id: str, source: str) -> RunRecord:
    """Read a run named by the caller or the environment, with an error that says why not."""
    _handover.check_run_id(run_id, source)
    try:
        return tracker.store.get_run(run_id)
    except StoreUnavailableError:
        raise
    except Exception as exc:
        hint = (
            " (the tracker fell back to the local store, where that run does not exist)"
            if tracker.fell_back_to_local
            else ""
        )
        raise TrackingError(
            f"run {run_id!r} from {source} is not in the store "
            f"{redact_value(tracker.tracking_uri)}{hint}: {redact_value(str(exc))}"
        ) from exc


def find_records(
    tracker: Tracker,
    spec: RunSpec,
    experiment_id: str | None = None,
    *,
    include_deleted: bool = False,
) -> list[RunRecord]:
    """The runs of the experiment with the identity of ``spec``, newest first."""
    key = tracker.keys["run_key_hash"]
    return tracker.store.search(
        [experiment_id or tracker.experiment_id],
        f"tags.`{key}` = '{spec.run_key_hash}'",
        include_deleted=include_deleted,
    )
