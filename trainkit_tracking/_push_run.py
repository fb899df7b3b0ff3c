"""Push one run into a target store: find it by origin, send only what it lacks, mark it."""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from trainkit_tracking import _push_store
from trainkit_tracking._limits import MAX_METRICS
from trainkit_tracking._push_lanes import call, read_ahead
from trainkit_tracking._push_marks import (
    NOT_COPIED,
    PARENT,
    PUSHED_FROM,
    REMOTE_PARENT,
    SYNC_MARK,
    Source,
    lineage_refs,
    missing_points,
    read_source,
    status_differs,
    sync_mark,
)
from trainkit_tracking._push_report import Counter, PushedRun, PushReport
from trainkit_tracking._push_store import PushRun
from trainkit_tracking._redact import redact_value
from trainkit_tracking._spool import Point, make_batches
from trainkit_tracking._store import TERMINAL_STATUSES, RunRecord, Store
from trainkit_tracking._timeout import Pending
from trainkit_tracking.errors import TrackingError

T = TypeVar("T")
# Whole metric histories and artifact files may take longer to move than one metadata call.
_MIN_TRANSFER_TIMEOUT = 600.0


class Pusher:
    """Pushes runs into one target store."""

    def __init__(
        self,
        source: Store,
        target: Store,
        store_id: str | None,
        report: PushReport,
        counter: Counter,
        dry_run: bool,
        timeout: float,
        verify: bool,
    ) -> None:
        self.source, self.target, self.store_id = source, target, store_id
        self.report, self.counter = report, counter
        self.dry_run, self.timeout, self.verify = dry_run, timeout, verify
        self.shown = redact_value(target.tracking_uri)
        self.experiments: dict[str, str | None] = {}
        self.index: dict[str, dict[str, PushRun]] = {}
        self.mapping: dict[str, str] = {}
        self.missing: set[str] = set()  # source runs that are not in the target
        self.parents_checked: dict[str, bool] = {}

    def _t(self, fn: Callable[[], T], what: str) -> T:
        return call(fn, self.timeout, what)

    # Lookups

    def identity(self, src: Source) -> str | None:
        """The origin a target run records: kept from a run that was itself pushed."""
        origin = src.tags.get(PUSHED_FROM)
        if origin:
            return origin
        return None if self.store_id is None else f"{self.store_id}:{src.id}"

    def target_experiment(self, name: str, *, create: bool) -> str | None:
        if self.experiments.get(name) is None:
            found = self._t(
                lambda: _push_store.find_experiment_by_name(self.target, name), "get_experiment"
            )
            if found is not None and found.deleted:
                raise TrackingError(
                    f"experiment {name!r} is deleted in the target {self.shown}; restore it "
                    "(`mlflow experiments restore`) or rename it in the source"
                )
            if found is None and create:
                experiment_id = self._t(
                    lambda: self.target.get_or_create_experiment(name), "create_experiment"
                )
                self.report.experiments_created.append(name)
                self.experiments[name] = experiment_id
            else:
                self.experiments[name] = None if found is None else found.experiment_id
        return self.experiments[name]

    def pushed_runs(self, experiment_id: str) -> dict[str, PushRun]:
        """The target runs of an experiment that came from a push, by origin: one search."""
        if experiment_id not in self.index:
            runs = self._t(
                lambda: _push_store.search_latest(
                    self.target,
                    [experiment_id],
                    f"tags.`{PUSHED_FROM}` LIKE '%'",
                    include_deleted=True,
                ),
                "search_runs",
            )
            self.index[experiment_id] = {
                run.record.tags[PUSHED_FROM]: run for run in runs if PUSHED_FROM in run.record.tags
            }
        return self.index[experiment_id]

    def find(self, src: Source) -> PushRun | None:
        identity = self.identity(src)
        experiment_id = self.target_experiment(src.experiment, create=False)
        if identity is None or experiment_id is None:
            return None
        return self.pushed_runs(experiment_id).get(identity)

    def target_id_of(self, source_run_id: str) -> str | None:
        """The target id of a source run outside this push, if it was pushed before."""
        if source_run_id not in self.mapping:
            if source_run_id in self.missing:
                return None
            src = read_source(self.source, source_run_id, self.timeout)
            found = None if src is None else self.find(src)
            if found is None:
                self.missing.add(source_run_id)
                return None
            self.mapping[source_run_id] = found.record.run_id
        return self.mapping[source_run_id]

    # One run

    def push_all(self, runs: Sequence[Source]) -> None:
        for src in runs:
            self.push_one(src)
            self.counter.add(runs=1)

    def desired(self, src: Source) -> tuple[dict[str, str], list[str]]:
        """The target's tags for ``src`` (source ids mapped) and what could not be mapped."""
        tags = {k: v for k, v in src.tags.items() if k not in NOT_COPIED}
        unresolved: list[str] = []
        for key, ref in lineage_refs(src.tags).items():
            mapped = self.target_id_of(ref)
            if mapped is None:
                unresolved.append(f"{key}={ref}")
            else:
                tags[key] = mapped
        remote = src.tags.get(REMOTE_PARENT)
        parent = src.run.record.parent_id
        if remote:
            tags[PARENT] = remote
        elif parent is not None:
            mapped = self.target_id_of(parent)
            if mapped is None:
                unresolved.append(f"{PARENT}={parent}")
            else:
                tags[PARENT] = mapped
        return tags, unresolved

    def push_one(self, src: Source) -> None:
        existing = self.find(src)
        record = src.run.record
        if existing is not None and existing.deleted:
            self.mapping[src.id] = existing.record.run_id
            self.note(src, existing.record.run_id, "skipped")
            self.report.warnings.append(
                f"run {src.id} ({record.name}) was pushed to {existing.record.run_id}, which "
                f"is deleted in {self.shown}: left alone (restore it to push into it again)"
            )
            return
        tags, unresolved = self.desired(src)
        files = self._t(lambda: _push_store.artifact_files(self.source, src.id), "list_artifacts")
        mark = sync_mark(src.run, tags, files)
        if existing is not None:
            self.mapping[src.id] = existing.record.run_id
            if not self.verify and existing.record.tags.get(SYNC_MARK) == mark:
                self.note(src, existing.record.run_id, "unchanged")
                return
        for item in unresolved:
            self.report.warnings.append(
                f"run {src.id} ({record.name}): {item} names a source run that is not in "
                f"{self.shown}; push it too, then push again to remap the id"
            )
        if tags.get(PARENT) and src.tags.get(REMOTE_PARENT):
            self.check_remote_parent(src, tags[PARENT])
        if existing is None and self.dry_run:
            self.mapping[src.id] = f"new:{src.id}"  # its children and lineage map to it
            points = sum(len(self.history(self.source, src.id, key)) for key in src.run.latest)
            self.note(src, None, "create", points, len(record.params), len(tags), len(files))
            self.counter.add(points=points)
            return
        if existing is None:
            target = self.create(src, tags)
            target_run, target_latest = target, {}
        else:
            target_run, target_latest = existing.record, dict(existing.latest)
        self.update(
            src, target_run, target_latest, tags, files, mark, unresolved, created=existing is None
        )

    def check_remote_parent(self, src: Source, parent: str) -> None:
        if parent not in self.parents_checked:
            try:
                self._t(lambda: self.target.get_run(parent), "get_run")
                self.parents_checked[parent] = True
            except TimeoutError:
                raise
            except Exception:
                self.parents_checked[parent] = False
        if not self.parents_checked[parent]:
            self.report.warnings.append(
                f"run {src.id}: its {REMOTE_PARENT} {parent} is not a run of {self.shown}; "
                "pushed with that parent id anyway"
            )

    def create(self, src: Source, tags: Mapping[str, str]) -> RunRecord:
        identity = self.identity(src)
        assert identity is not None  # a store id exists whenever we write
        experiment_id = self.target_experiment(src.experiment, create=True)
        assert experiment_id is not None
        record = src.run.record
        # The origin goes in with the run itself: a push killed right after this call
        # finds the run again instead of creating a second one.
        first = {PUSHED_FROM: identity}
        for key in (PARENT, "mlflow.runName", "mlflow.user"):
            if key in tags:
                first[key] = tags[key]
        created = self._t(
            lambda: self.target.create_run(experiment_id, record.name, first, record.start_time),
            "create_run",
        )
        self.mapping[src.id] = created.run_id
        self.pushed_runs(experiment_id)[identity] = PushRun(created, {}, False)
        return created

    def history(self, store: Store, run_id: str, key: str) -> list[Point]:
        return self._t(lambda: store.metric_history(run_id, key), "get_metric_history")

    def update(
        self,
        src: Source,
        target: RunRecord,
        target_latest: Mapping[str, object],
        tags: Mapping[str, str],
        files: Mapping[str, int],
        mark: str,
        unresolved: Sequence[str],
        *,
        created: bool,
    ) -> None:
        record, target_id = src.run.record, target.run_id
        params: dict[str, str] = {}
        for key, value in record.params.items():
            old = target.params.get(key)
            if old is None:
                params[key] = value
            elif old != value:
                self.report.warnings.append(
                    f"run {src.id}: param {key!r} is {value!r} in the source but {old!r} in "
                    f"target run {target_id}; MLflow params cannot change, left as is"
                )
        new_tags = {k: v for k, v in tags.items() if target.tags.get(k) != v}
        points = self.send_points(src, target_id, target_latest, params, new_tags)
        there = (
            self._t(lambda: _push_store.artifact_files(self.target, target_id), "list_artifacts")
            if files and not created
            else {}
        )
        copy = sorted(path for path, size in files.items() if there.get(path) != size or size < 0)
        status_changes = status_differs(record, target)
        if created:
            action = "create"
        elif points or params or new_tags or copy or status_changes:
            action = "update"
        else:
            action = "unchanged"
        if self.dry_run:
            self.note(src, target_id, action, points, len(params), len(new_tags), len(copy))
            return
        self.copy_artifacts(src.id, target_id, copy)
        self.set_status(record, target, target_id)
        if not unresolved:  # last: a push killed before this line compares again next time
            self._t(lambda: self.target.set_tags(target_id, {SYNC_MARK: mark}), "set_tag")
        self.note(src, target_id, action, points, len(params), len(new_tags), len(copy))

    def read_key(
        self, source_id: str, target_id: str, key: str, in_target: bool
    ) -> Pending[list[Point]]:
        """Read ahead the points of ``key`` that the target lacks."""
        return read_ahead(
            lambda: missing_points(self.source, self.target, source_id, target_id, key, in_target)
        )

    def send_points(
        self,
        src: Source,
        target_id: str,
        target_latest: Mapping[str, object],
        params: Mapping[str, str],
        tags: Mapping[str, str],
    ) -> int:
        """Send the params, tags and points the target lacks, in full batches, while the
        next key's history is read; the number of points (to send, in a dry run)."""
        keys = list(src.run.latest)
        limit = max(self.timeout, _MIN_TRANSFER_TIMEOUT)
        pending: list[Point] = []
        first: tuple[Mapping[str, str], Mapping[str, str]] | None = (params, tags)
        total = 0

        def send(cut: int) -> None:
            nonlocal pending, first
            chunk, pending = pending[:cut], pending[cut:]
            extra = first or ({}, {})
            first = None
            for batch in make_batches(chunk, *extra):
                metrics = batch.get("m", ())
                self._t(
                    lambda b=batch, m=metrics: self.target.log_batch(  # type: ignore[misc]
                        target_id, metrics=m, params=b.get("p"), tags=b.get("g")
                    ),
                    "log_batch",
                )
                self.counter.add(points=len(metrics))

        ahead = (
            self.read_key(src.id, target_id, keys[0], keys[0] in target_latest) if keys else None
        )
        for index in range(len(keys)):
            assert ahead is not None
            new = ahead.wait(limit, "get_metric_history")
            if index + 1 < len(keys):
                following = keys[index + 1]
                ahead = self.read_key(src.id, target_id, following, following in target_latest)
            total += len(new)
            if self.dry_run:
                self.counter.add(points=len(new))
                continue
            pending.extend(new)
            if len(pending) >= MAX_METRICS:
                send(len(pending) - len(pending) % MAX_METRICS)
        if not self.dry_run and (pending or first is not None):
            send(len(pending))
        return total

    def copy_artifacts(self, source_id: str, target_id: str, paths: Sequence[str]) -> None:
        if not paths:
            return
        limit = max(self.timeout, _MIN_TRANSFER_TIMEOUT)
        with tempfile.TemporaryDirectory(prefix="trainkit-push-") as tmp:
            for path in paths:
                local = call(
                    lambda p=path: _push_store.download_artifact(self.source, source_id, p, tmp),  # type: ignore[misc]
                    limit,
                    "download_artifacts",
                )
                folder = posixpath.dirname(path) or None
                call(
                    lambda lp=local, f=folder: self.target.log_artifact(target_id, lp, f),  # type: ignore[misc]
                    limit,
                    "log_artifact",
                )
                os.unlink(local)

    def set_status(self, record: RunRecord, target: RunRecord, target_id: str) -> None:
        status, end = record.status, record.end_time
        if not status_differs(record, target):
            return
        if status in TERMINAL_STATUSES:
            self._t(lambda: self.target.terminate(target_id, status, end), "set_terminated")
        else:
            self._t(lambda: self.target.set_status(target_id, status), "update_run")

    def note(
        self,
        src: Source,
        target_id: str | None,
        action: str,
        points: int = 0,
        params: int = 0,
        tags: int = 0,
        artifacts: int = 0,
    ) -> None:
        self.report.runs.append(
            PushedRun(
                src.id,
                target_id,
                src.experiment,
                src.run.record.name,
                self.shown,
                action,
                points,
                params,
                tags,
                artifacts,
            )
        )
