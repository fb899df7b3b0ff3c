"""Metric points written with bulk inserts into MLflow's own tables (SPEC section 17).

MLflow's SQL store inserts points through its ORM, an object and a flush per point; here
the same rows go into its ``metrics`` table with one multi-row insert, and its
``latest_metrics`` with one conditional upsert, through the installed mlflow's table
models and session factory (its sqlite pragmas, its error codes). What MLflow's client
reads back is what ``log_batch`` of the same points leaves:

- a point is stored once: the insert skips a row its primary key already holds (key,
  timestamp, step, value, is_nan), as ``log_batch`` ignores an identical point;
- NaN is stored as 0 with ``is_nan``, +-inf as +-1.7976931348623157e308
  (``SqlAlchemyStore.sanitize_metric_value``);
- a key's latest value is the first point, in logging order, with the greatest
  (step, timestamp, stored value) (``_update_latest_metrics_if_necessary``).

Only the plainly valid goes this way: a batch with anything else (a key MLflow's rules
refuse, a value that is not a float or int, a timestamp or step outside 64 bits, a run id
MLflow would not accept), for a run that is missing or not active, or while MLflow has an
active logged model (its metrics also go to that model) goes through MLflow's API, which
stores it or refuses it in its own words. Params and tags always do.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from trainkit_tracking._core.redact import get_logger

log = get_logger(__name__)

Point = tuple[str, float, int, int]
Row = tuple[str, str, int, int, float, bool]  # a metrics / latest_metrics row in _ORDER

# The mlflow minors whose SQL store this module is tested against (CI runs both ends:
# 3.15.0 in .ci/azure.sh, 3.17.2 in .ci/run). Outside them, points go through MLflow's API.
TESTED_MLFLOW = ((3, 15), (3, 17))
DIALECTS = ("sqlite", "postgresql")
_SQL_STORE_MODULE = "mlflow.store.tracking.sqlalchemy_store"
_COLUMNS = frozenset({"key", "value", "timestamp", "step", "is_nan", "run_uuid"})
_PRIMARY_KEYS = {
    "metrics": frozenset({"key", "timestamp", "step", "run_uuid", "value", "is_nan"}),
    "latest_metrics": frozenset({"key", "run_uuid"}),
}
_ORDER = ("run_uuid", "key", "timestamp", "step", "value", "is_nan")
_MAX_FLOAT = 1.7976931348623157e308
_INT64 = 1 << 63


@dataclass(frozen=True)
class MetricPath:
    """How a store's metric points are written: in bulk (``writer``) or through MLflow."""

    writer: BulkWriter | None
    why: str
    settled: bool = True  # False: the check failed (a busy database?); check again later

    def describe(self) -> str:
        if self.writer is not None:
            return f"bulk inserts into MLflow's tables ({self.why})"
        return f"MLflow's API ({self.why})"


def metric_path(client: Any) -> MetricPath:
    """Whether points for ``client``'s store can be bulk-inserted, and why (not).

    Reads the database's schema (columns, primary keys, alembic revision): call it once
    per store, inside the store's deadline.
    """
    try:
        store: Any = getattr(getattr(client, "_tracking_client", None), "store", None)
        # Exactly MLflow's class (a subclass, with workspaces, may scope or add what we
        # skip), told by name: an http store's sender need not import the SQL store.
        kind = type(store)
        if (kind.__module__, kind.__name__) != (_SQL_STORE_MODULE, "SqlAlchemyStore"):
            return MetricPath(None, "the store is not a SQL database reached directly")
        dialect = str(store.engine.dialect.name)
        if dialect not in DIALECTS:
            return MetricPath(
                None, f"bulk writes are tested on sqlite and PostgreSQL, not {dialect}"
            )
        problem = _unknown_schema(store.engine)
        if problem:
            return MetricPath(None, f"{problem}; the bulk path knows only the tested schema")
        return MetricPath(BulkWriter(store), dialect)
    except Exception as exc:  # anything unexpected: MLflow's own path is always right
        log.debug("metric points go through MLflow's API: %s", exc, exc_info=True)
        why = f"could not check the schema: {type(exc).__name__}: {exc}"
        return MetricPath(None, " ".join(why.split())[:300], settled=False)


class PathCheck:
    """One store's metric path, checked on first use; a failed check again a minute on."""

    RECHECK = 60.0

    def __init__(self, shown_uri: str) -> None:
        self.shown_uri = shown_uri
        self._path: MetricPath | None = None
        self._checked = 0.0

    def get(self, client: Any) -> MetricPath:
        path = self._path
        if path is None or (not path.settled and time.monotonic() - self._checked > self.RECHECK):
            self._checked = time.monotonic()
            self._path = path = metric_path(client)
            log.debug("metric points for %s: %s", self.shown_uri, path.describe())
        return path


def _unknown_schema(engine: Any) -> str | None:
    """What makes the installed mlflow or the database unlike the tested ones; None if not."""
    import mlflow
    import sqlalchemy as sa
    from mlflow.store.db import utils as db_utils
    from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric

    version = str(mlflow.__version__)
    found_minor = re.match(r"(\d+)\.(\d+)", version)
    minor = tuple(int(n) for n in found_minor.groups()) if found_minor else (0, 0)
    low, high = TESTED_MLFLOW
    if not low <= minor <= high:
        return f"mlflow {version} is outside the tested {low[0]}.{low[1]}-{high[0]}.{high[1]}"
    inspector = sa.inspect(engine)
    for model in (SqlMetric, SqlLatestMetric):
        table: Any = model.__table__
        name = str(table.name)
        declared = (
            frozenset(c.name for c in table.columns),
            frozenset(c.name for c in table.primary_key.columns),
        )
        if declared != (_COLUMNS, _PRIMARY_KEYS[name]):
            return f"mlflow {version} declares table {name} as {sorted(declared[0])}"
        found = (
            frozenset(c["name"] for c in inspector.get_columns(name)),
            frozenset(inspector.get_pk_constraint(name)["constrained_columns"]),
        )
        if found != declared:
            return (
                f"the database's table {name} has columns {sorted(found[0])}, primary key "
                f"{sorted(found[1])}"
            )
    head = cast(Any, db_utils)._get_latest_schema_revision()
    with engine.connect() as conn:
        revision = conn.execute(sa.text("SELECT version_num FROM alembic_version")).scalar()
    if revision != head:
        return f"the database is at schema revision {revision}, mlflow {version} at {head}"
    return None


class BulkWriter:
    """Points of one SQL store into MLflow's ``metrics`` and ``latest_metrics`` tables."""

    def __init__(self, store: Any) -> None:
        import sqlalchemy as sa
        from mlflow.entities import LifecycleStage
        from mlflow.store.tracking.dbmodels.models import SqlLatestMetric, SqlMetric, SqlRun
        from mlflow.utils import validation

        self._sessions = store.ManagedSessionMaker
        self._active = LifecycleStage.ACTIVE
        self._rules: Any = validation
        self._keys: set[str] = set()  # keys MLflow's rules accept, checked once each
        runs: Any = SqlRun.__table__
        self._stage = sa.select(runs.c.lifecycle_stage).where(runs.c.run_uuid == sa.bindparam("r"))
        self._arrays = store.engine.dialect.name == "postgresql"
        self._insert_points = self._insert(SqlMetric.__table__).on_conflict_do_nothing()
        latest: Any = SqlLatestMetric.__table__
        upsert = self._insert(latest)
        new, old = upsert.excluded, latest.c
        # Strictly newer by (step, timestamp, value), as _compare_metrics: a tie keeps the row.
        newer = sa.or_(
            new["step"] > old["step"],
            sa.and_(
                new["step"] == old["step"],
                sa.or_(
                    new["timestamp"] > old["timestamp"],
                    sa.and_(new["timestamp"] == old["timestamp"], new["value"] > old["value"]),
                ),
            ),
        )
        self._upsert_latest = upsert.on_conflict_do_update(
            index_elements=[old["key"], old["run_uuid"]],
            set_={name: new[name] for name in ("value", "timestamp", "step", "is_nan")},
            where=newer,
        )

    def _insert(self, table: Any) -> Any:
        """An insert of rows in ``_ORDER``: sqlite runs it for each row (executemany); on
        PostgreSQL it is one statement over one array per column, since SQLAlchemy sends
        an ``ON CONFLICT`` insert there row by row, a round trip each."""
        import sqlalchemy as sa
        from sqlalchemy.dialects import postgresql, sqlite

        if not self._arrays:
            return sqlite.insert(table)
        arrays = [sa.cast(sa.bindparam(n), postgresql.ARRAY(table.c[n].type)) for n in _ORDER]
        source = sa.func.unnest(*arrays).table_valued(*_ORDER).render_derived(name="point")
        select = sa.select(*(source.c[n] for n in _ORDER))
        return postgresql.insert(table).from_select(_ORDER, select)

    def _params(self, rows: list[Row]) -> Any:
        if self._arrays:
            return {
                name: list(column)
                for name, column in zip(_ORDER, zip(*rows, strict=True), strict=True)
            }
        return [dict(zip(_ORDER, row, strict=True)) for row in rows]

    def rows(self, run_id: str, points: Sequence[Point]) -> tuple[list[Row], list[Row]] | None:
        """The ``metrics`` rows (each once, in logging order) and the newest point per key
        as ``latest_metrics`` rows; None when a point is not plainly valid."""
        if not self._valid_run_id(run_id):
            return None
        stored: dict[tuple[str, int, int, float, bool], None] = {}
        newest: dict[str, tuple[int, int, float, bool]] = {}
        for point in points:
            entry = self._sanitised(point)
            if entry is None:
                return None
            if entry in stored:
                continue
            stored[entry] = None
            key, timestamp, step, value, is_nan = entry
            best = newest.get(key)
            if best is None or (step, timestamp, value) > best[:3]:
                newest[key] = (step, timestamp, value, is_nan)
        points_rows = [(run_id, k, t, s, v, n) for k, t, s, v, n in stored]
        # One row per key, in one order for every writer (row locks on PostgreSQL).
        latest_rows = [(run_id, k, t, s, v, n) for k, (s, t, v, n) in sorted(newest.items())]
        return points_rows, latest_rows

    def _valid_run_id(self, run_id: str) -> bool:
        try:
            self._rules._validate_run_id(run_id)
        except Exception:
            return False
        return True

    def _sanitised(self, point: Point) -> tuple[str, int, int, float, bool] | None:
        """(key, timestamp, step, stored value, is_nan) as MLflow stores the point."""
        key, value, timestamp, step = point
        if key not in self._keys:
            if type(key) is not str:
                return None
            try:
                self._rules._validate_metric(key, 0.0, 0, 0)
            except Exception:
                return None
            self._keys.add(key)
        if type(value) is not float:
            if type(value) is not int or not -_INT64 < value < _INT64:
                return None  # MLflow converts numpy scalars, bools and tensors its own way
            value = float(value)
        if type(timestamp) is not int or not 0 <= timestamp < _INT64:
            return None
        if type(step) is not int or not -_INT64 <= step < _INT64:
            return None
        if value != value:
            return key, timestamp, step, 0.0, True
        if value in (float("inf"), float("-inf")):
            value = _MAX_FLOAT if value > 0 else -_MAX_FLOAT
        return key, timestamp, step, value, False

    def write(self, run_id: str, points_rows: list[Row], latest_rows: list[Row]) -> bool:
        """Insert the rows in one transaction; False (nothing written) when the run is
        missing or not active, for MLflow to refuse in its own words."""
        with self._sessions(read_only=False) as session:
            conn = session.connection()
            if conn.execute(self._stage, {"r": run_id}).scalar() != self._active:
                return False
            conn.execute(self._insert_points, self._params(points_rows))
            conn.execute(self._upsert_latest, self._params(latest_rows))
        return True


def log_batch(
    client: Any,
    writer: BulkWriter | None,
    run_id: str,
    metrics: Sequence[Point],
    params: Mapping[str, str],
    tags: Mapping[str, str],
) -> None:
    """One batch: points in bulk where ``writer`` can, the rest through MLflow's client."""
    rows = writer.rows(run_id, metrics) if writer is not None and metrics else None
    if writer is None or rows is None or _active_model():
        client_log_batch(client, run_id, metrics, params, tags)
        return
    if params or tags:
        client_log_batch(client, run_id, (), params, tags)
    if not writer.write(run_id, *rows):
        client_log_batch(client, run_id, metrics, {}, {})  # raises MLflow's own refusal


def _active_model() -> bool:
    """Whether MLflow would also log points to an active logged model (this thread's)."""
    from mlflow.tracking.fluent import get_active_model_id

    return get_active_model_id() is not None


def client_log_batch(
    client: Any,
    run_id: str,
    metrics: Sequence[Point],
    params: Mapping[str, str],
    tags: Mapping[str, str],
) -> None:
    """``MlflowClient.log_batch`` with (key, value, timestamp_ms, step) points."""
    from mlflow.entities import Metric, Param, RunTag

    client.log_batch(
        run_id,
        metrics=[Metric(k, v, ts, step) for k, v, ts, step in metrics],
        params=[Param(k, v) for k, v in params.items()],
        tags=[RunTag(k, v) for k, v in tags.items()],
        synchronous=True,
    )
