"""What a push knows of its target store: the experiments, the runs that came from a push
(found by origin, one search per experiment), and the target id of each source run."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._push import store_calls as _push_store
from trainkit_tracking._push.background_calls import call
from trainkit_tracking._push.marks import PUSHED_FROM, Source, read_source
from trainkit_tracking._push.report import PushReport
from trainkit_tracking._push.store_calls import PushRun
from trainkit_tracking._store.store import Store
from trainkit_tracking.errors import TrackingError

T = TypeVar("T")


class TargetIndex:
    """The target's experiments and pushed runs, read once per push and kept current."""

    def __init__(
        self,
        source: Store,
        target: Store,
        store_id: str | None,
        report: PushReport,
        timeout: float,
    ) -> None:
        self.source, self.target, self.store_id = source, target, store_id
        self.report, self.timeout = report, timeout
        self.shown = redact_value(target.tracking_uri)
        self.experiments: dict[str, str | None] = {}
        self.index: dict[str, dict[str, PushRun]] = {}
        self.mapping: dict[str, str] = {}  # source run id -> target run id
        self.missing: set[str] = set()  # source runs that are not in the target

    def _t(self, fn: Callable[[], T], what: str) -> T:
        return call(fn, self.timeout, what)

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
