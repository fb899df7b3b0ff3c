"""Push one run into a target store: find it by origin, send only what it lacks, mark it."""

from __future__ import annotations

import os
import posixpath
import tempfile
from collections.abc import Callable, Mapping, Sequence
from typing import TypeVar

from trainkit_tracking._core.limits import MAX_METRICS
from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._journal.spool import Point, make_batches
from trainkit_tracking._process.bounded import Pending
from trainkit_tracking._push import store_calls as _push_store
from trainkit_tracking._push.background_calls import call, read_ahead
from trainkit_tracking._push.marks import (
    NOT_COPIED,
    PARENT,
    PUSHED_FROM,
    REMOTE_PARENT,
    SYNC_MARK,
    Source,
    lineage_refs,
    missing_points,
    status_differs,
    sync_mark,
)
from trainkit_tracking._push.names import RUN_NAME, TargetNames
from trainkit_tracking._push.report import Counter, PushedRun, PushReport
from trainkit_tracking._push.store_calls import PushRun
from trainkit_tracking._push.target_index import TargetIndex
from trainkit_tracking._store.store import TERMINAL_STATUSES, RunRecord, Store

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
        self.where = TargetIndex(source, target, store_id, report, timeout)
        self.mapping = self.where.mapping  # source run id -> target run id
        self.parents_checked: dict[str, bool] = {}
        self.names = TargetNames(target, timeout)

    def _t(self, fn: Callable[[], T], what: str) -> T:
        return call(fn, self.timeout, what)

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
            mapped = self.where.target_id_of(ref)
            if mapped is None:
                unresolved.append(f"{key}={ref}")
            else:
                tags[key] = mapped
        remote = src.tags.get(REMOTE_PARENT)
        parent = src.run.record.parent_id
        if remote:
            tags[PARENT] = remote
        elif parent is not None:
            mapped = self.where.target_id_of(parent)
            if mapped is None:
                unresolved.append(f"{PARENT}={parent}")
            else:
                tags[PARENT] = mapped
        return tags, unresolved

    def push_one(self, src: Source) -> None:
        existing = self.where.find(src)
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
        where = lambda: self.where.target_experiment(src.experiment, create=True)  # noqa: E731
        found = existing.record if existing is not None else None
        self.names.settle(src, found, tags, where, write=not self.dry_run)
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
        identity = self.where.identity(src)
        assert identity is not None  # a store id exists whenever we write
        experiment_id = self.where.target_experiment(src.experiment, create=True)
        assert experiment_id is not None
        record = src.run.record
        # The origin goes in with the run itself: a push killed right after this call
        # finds the run again instead of creating a second one.
        first = {PUSHED_FROM: identity}
        for key in (PARENT, "mlflow.runName", "mlflow.user"):
            if key in tags:
                first[key] = tags[key]
        created = self._t(
            lambda: self.target.create_run(
                experiment_id, tags.get(RUN_NAME, record.name), first, record.start_time
            ),
            "create_run",
        )
        self.mapping[src.id] = created.run_id
        self.where.pushed_runs(experiment_id)[identity] = PushRun(created, {}, False)
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
