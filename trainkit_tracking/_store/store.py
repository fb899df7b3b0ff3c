"""The only module that talks to MLflow: a thin MlflowClient wrapper with explicit run ids.

Every call goes through one door (``Store._call``, from ``_door.BoundedClient``): a deadline,
retries of transient errors, errors classified once. mlflow is imported lazily.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainkit_tracking._core.redact import get_logger
from trainkit_tracking._store import creation, sql_bulk, sql_tables

# Re-exported: the logger, the sender and sync import them from here.
from trainkit_tracking._store.bounded_client import DEFAULT_TIMEOUT as DEFAULT_TIMEOUT
from trainkit_tracking._store.bounded_client import BoundedClient, error_code, is_already_exists
from trainkit_tracking._store.bounded_client import is_transient as is_transient
from trainkit_tracking._store.bounded_client import sqlite_path as sqlite_path
from trainkit_tracking._store.service_limits import ServiceLimits
from trainkit_tracking.errors import TrackingError

if TYPE_CHECKING:
    from mlflow.tracking import MlflowClient

log = get_logger(__name__)


TERMINAL_STATUSES = frozenset({"FINISHED", "FAILED", "KILLED"})
# Uploads (checkpoints) take longer than control calls; they run in the background only.
ARTIFACT_TIMEOUT = 900.0


@dataclass(frozen=True)
class RunRecord:
    """What the SDK reads back about one run."""

    run_id: str
    experiment_id: str
    name: str
    status: str
    start_time: int | None
    end_time: int | None
    tags: Mapping[str, str] = field(default_factory=dict)
    params: Mapping[str, str] = field(default_factory=dict)
    metrics: Mapping[str, float] = field(default_factory=dict)
    deleted: bool = False  # soft-deleted (``mlflow gc`` purges it)

    @property
    def parent_id(self) -> str | None:
        return self.tags.get("mlflow.parentRunId")


@dataclass(frozen=True)
class ExperimentRecord:
    experiment_id: str
    name: str
    deleted: bool


class Store(ServiceLimits, BoundedClient["MlflowClient"]):
    """MlflowClient with explicit run ids; every call bounded, retried and classified."""

    def _open_client(self) -> MlflowClient:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.tracking_uri)

    def _prepare_open(self) -> None:
        import mlflow.store.tracking.sqlalchemy_store
        import mlflow.tracking  # noqa: F401

    # Experiments -------------------------------------------------------------

    def get_or_create_experiment(self, name: str) -> str:
        """Return the id of experiment ``name``, creating it; safe when processes race."""
        for _ in range(5):
            experiment = self._call(
                lambda: self.client.get_experiment_by_name(name), what="get_experiment_by_name"
            )
            if experiment is not None:
                if experiment.lifecycle_stage == "deleted":
                    raise TrackingError(
                        f"experiment {name!r} exists but is deleted; restore it in the MLflow UI "
                        "or with `mlflow experiments restore`, or use another experiment name"
                    )
                return str(experiment.experiment_id)
            try:
                return str(
                    self._call(
                        lambda: self.client.create_experiment(name), what="create_experiment"
                    )
                )
            except Exception as exc:
                if not is_already_exists(exc):
                    raise
                # Another process created it between our lookup and our create: look again.
        raise TrackingError(f"could not get or create experiment {name!r}")

    def find_experiment(self, name_or_id: str) -> ExperimentRecord | None:
        """The experiment named ``name_or_id`` (else with that id), deleted ones included;
        None when there is none. Failures to ask (network, auth) raise, never None."""
        found = self._call(
            lambda: self.client.get_experiment_by_name(name_or_id), what="get_experiment_by_name"
        )
        if found is None and name_or_id.isdigit():
            try:
                found = self._call(
                    lambda: self.client.get_experiment(name_or_id), what="get_experiment"
                )
            except Exception as exc:
                if error_code(exc) != "RESOURCE_DOES_NOT_EXIST":
                    raise
        if found is None:
            return None
        return ExperimentRecord(
            str(found.experiment_id), str(found.name), found.lifecycle_stage == "deleted"
        )

    def ping(self) -> None:
        """One cheap read: raises when the store does not answer."""
        self._call(lambda: self.client.search_experiments(max_results=1), what="a first read")

    def list_experiments(self) -> list[ExperimentRecord]:
        """Every active experiment of the store (all pages)."""
        return [
            ExperimentRecord(str(e.experiment_id), str(e.name), False)
            for e in self._experiment_pages()
        ]

    def _experiment_pages(self) -> Iterator[Any]:
        """MLflow's active experiments, page after page."""
        token: str | None = None
        while True:
            page = self._call(
                lambda token=token: self.client.search_experiments(  # type: ignore[misc]
                    max_results=self.page_size, page_token=token
                ),
                what="search_experiments",
            )
            yield from page
            token = page.token
            if not token:
                return

    def experiment_name(self, experiment_id: str) -> str:
        experiment = self._call(
            lambda: self.client.get_experiment(experiment_id), what="get_experiment"
        )
        return str(experiment.name)

    def delete_tag(self, run_id: str, key: str) -> None:
        def call() -> None:
            try:
                self.client.delete_tag(run_id, key)
            except Exception as exc:  # already gone: what we wanted
                if error_code(exc) != "RESOURCE_DOES_NOT_EXIST" and "No tag" not in str(exc):
                    raise

        self._call(call, what="delete_tag")

    # Runs --------------------------------------------------------------------

    def create_run(
        self,
        experiment_id: str,
        run_name: str,
        tags: Mapping[str, str],
        start_time: int | None = None,
        *,
        id_tag: str | None = None,
    ) -> RunRecord:
        """A new run; ``start_time`` (ms) None: now (push keeps the source run's).

        ``id_tag``: the tag (in ``tags``) whose unique value makes the creation
        idempotent (``creation.py``).
        """
        calls = creation.calls(self.client, experiment_id, run_name, tags, start_time, id_tag)
        return record_of(self._call(calls.create, what="create_run", **calls.guards))

    def rename_run(self, run_id: str, name: str) -> None:
        self._call(lambda: self.client.update_run(run_id, name=name), what="update_run")

    def set_status(self, run_id: str, status: str) -> None:
        self._call(lambda: self.client.update_run(run_id, status=status), what="update_run")

    def terminate(self, run_id: str, status: str, end_time: int | None = None) -> None:
        from mlflow.entities import RunStatus

        end = end_time or int(time.time() * 1000)

        def call() -> None:
            # MlflowClient.set_terminated() fetches the run again and writes "View run ..."
            # lines to stdout for http stores (mlflow/tracking/_tracking_service/client.py,
            # _log_url): a library must not print into its user's training logs, so go to
            # the store directly when the client exposes it.
            store = getattr(getattr(self.client, "_tracking_client", None), "store", None)
            if store is None or not hasattr(store, "update_run_info"):
                self.client.set_terminated(run_id, status=status, end_time=end)
            else:
                store.update_run_info(
                    run_id, run_status=RunStatus.from_string(status), end_time=end, run_name=None
                )

        self._call(call, what="end run")

    def get_run(self, run_id: str) -> RunRecord:
        return record_of(self._call(lambda: self.client.get_run(run_id), what="get_run"))

    def set_tags(self, run_id: str, tags: Mapping[str, str]) -> None:
        self.log_batch(run_id, tags=tags)

    def search(
        self, experiment_ids: Sequence[str], filter_string: str = "", **options: Any
    ) -> list[RunRecord]:
        """All runs matching ``filter_string`` (every page), newest first by default;
        ``options`` are ``iter_search``'s (``order_by``, ``max_results``, ``include_deleted``)."""
        return list(self.iter_search(experiment_ids, filter_string, **options))

    def iter_search(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        order_by: Sequence[str] = ("attributes.start_time DESC",),
        max_results: int | None = None,
        include_deleted: bool = False,
    ) -> Iterator[RunRecord]:
        for page in self.run_pages(
            experiment_ids,
            filter_string,
            order_by=order_by,
            max_results=max_results,
            include_deleted=include_deleted,
        ):
            for run in page:
                yield record_of(run)

    def run_pages(
        self,
        experiment_ids: Sequence[str],
        filter_string: str = "",
        *,
        order_by: Sequence[str],
        max_results: int | None = None,
        include_deleted: bool = False,
    ) -> Iterator[Any]:
        """MLflow's pages of runs (lists of ``mlflow.entities.Run``), at most ``max_results``."""
        from mlflow.entities import ViewType

        view = ViewType.ALL if include_deleted else ViewType.ACTIVE_ONLY
        token: str | None = None
        seen = 0
        while True:
            limit = self.page_size
            page_size = limit if max_results is None else min(limit, max_results - seen)
            page = self._call(
                lambda page_size=page_size, token=token: self.client.search_runs(  # type: ignore[misc]
                    list(experiment_ids),
                    filter_string=filter_string,
                    run_view_type=view,
                    max_results=page_size,
                    order_by=list(order_by),
                    page_token=token,
                ),
                what="search_runs",
            )
            yield page
            seen += len(page)
            token = page.token
            if not token or (max_results is not None and seen >= max_results):
                return

    # Logging -----------------------------------------------------------------

    def log_batch(
        self,
        run_id: str,
        *,
        metrics: Sequence[tuple[str, float, int, int]] = (),
        params: Mapping[str, str] | None = None,
        tags: Mapping[str, str] | None = None,
    ) -> None:
        """Send one batch: metrics as (key, value, timestamp_ms, step) tuples.

        Re-sending the same batch is harmless: MLflow ignores a metric point with the
        same key, value, timestamp and step, a param with the same value, and tags are
        upserts. The logger's exactly-once guarantee rests on this. Points for a SQL store
        reached directly are bulk-inserted into MLflow's tables (``sql_bulk``), alike. More
        metric values than the store takes per request (Azure ML: 250) go in several
        requests, params and tags with the first: every sender (the spool's, `sync`, `push`)
        gets the cut.
        """
        step_size = self.metrics_per_request
        chunks = [metrics[i : i + step_size] for i in range(0, len(metrics), step_size)] or [()]
        for number, chunk in enumerate(chunks):
            first = not number

            def call(chunk: Sequence[sql_bulk.Point] = chunk, first: bool = first) -> None:
                path = self._metric_path() if chunk else None
                writer = None if path is None else path.writer
                extra = (params or {}, tags or {}) if first else ({}, {})
                sql_bulk.log_batch(self.client, writer, run_id, chunk, *extra)

            self._call(call, what="log_batch")

    def metric_path(self) -> str:
        """How this store's metric points are written, and why (``doctor`` shows it)."""
        return self._call(lambda: self._metric_path().describe(), what="read the schema")

    def _metric_path(self) -> sql_bulk.MetricPath:  # read once per store, within a call
        self._paths = getattr(self, "_paths", None) or sql_bulk.PathCheck(self.shown_uri)
        return self._paths.get(self.client)

    def log_artifact(self, run_id: str, local_path: str, artifact_path: str | None) -> None:
        self._call(
            lambda: self.client.log_artifact(run_id, local_path, artifact_path),
            what="upload artifact",
            timeout=max(self.timeout, ARTIFACT_TIMEOUT),
        )

    def log_artifacts(self, run_id: str, local_dir: str, artifact_path: str | None) -> None:
        self._call(
            lambda: self.client.log_artifacts(run_id, local_dir, artifact_path),
            what="upload artifacts",
            timeout=max(self.timeout, ARTIFACT_TIMEOUT),
        )

    # Metric histories --------------------------------------------------------

    def _sql_engine(self) -> Any | None:
        """The engine of a SQL store (None for others), looked up once."""
        if not hasattr(self, "_engine"):
            self._engine = sql_tables.engine_of(self.client)
        return self._engine

    def last_point_time(self, run_id: str) -> int | None:
        """When (ms) the run's last metric point was logged; None without points. Exact on
        SQL stores; elsewhere the newest of each key's latest point (MLflow's own reads)."""
        engine = self._sql_engine()
        if engine is not None:
            return self._call(sql_tables.last_point_reader(engine, run_id), what="read last point")
        run = self._call(lambda: self.client.get_run(run_id), what="get_run")
        return _latest_point_time(run)

    def metric_history(self, run_id: str, key: str) -> list[tuple[str, float, int, int]]:
        """Every point of metric ``key`` as (key, value, timestamp_ms, step)."""
        engine = self._sql_engine()
        if engine is not None:
            return self._call(
                sql_tables.history_reader(engine, run_id, key),
                what="read metric history",
                timeout=max(self.timeout, ARTIFACT_TIMEOUT),
            )
        history = self._call(
            lambda: self.client.get_metric_history(run_id, key),
            what="get_metric_history",
            timeout=max(self.timeout, ARTIFACT_TIMEOUT),
        )
        return [(key, m.value, m.timestamp, m.step) for m in history]


def _latest_point_time(run: Any) -> int | None:
    # RunData keeps the Metric objects of the latest points in _metric_objs
    # (mlflow/entities/run_data.py); .metrics only has their values.
    stamps = [int(m.timestamp) for m in getattr(run.data, "_metric_objs", None) or []]
    return max(stamps, default=None)


def record_of(run: Any) -> RunRecord:
    info, data = run.info, run.data
    return RunRecord(
        run_id=str(info.run_id),
        experiment_id=str(info.experiment_id),
        name=str(info.run_name or data.tags.get("mlflow.runName", "")),
        status=str(info.status),
        start_time=info.start_time,
        end_time=info.end_time,
        tags=dict(data.tags),
        params=dict(data.params),
        metrics=dict(data.metrics),
        deleted=getattr(info, "lifecycle_stage", "active") == "deleted",
    )
