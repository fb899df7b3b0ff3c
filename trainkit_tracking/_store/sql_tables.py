"""MLflow's own SQL tables, reached directly with SQLAlchemy Core where the store is a SQL
database: the table models of the installed mlflow, never a copy of its schema.

Store calls these through its one door (``Store._call``); nothing here retries or waits.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from trainkit_tracking._core.redact import get_logger

log = get_logger(__name__)

Point = tuple[str, float, int, int]


def engine_of(client: Any) -> Any | None:
    """The SQLAlchemy engine behind an ``MlflowClient`` of a SQL store; None for other stores."""
    try:
        from mlflow.store.tracking.sqlalchemy_store import SqlAlchemyStore

        store = getattr(getattr(client, "_tracking_client", None), "store", None)
        if not isinstance(store, SqlAlchemyStore):
            raise TypeError(f"{type(store).__name__} is not a SQL store")
        return store.engine
    except Exception as exc:
        log.debug("MLflow's tables are reached through the client: %s", exc)
        return None


def history_reader(engine: Any, run_id: str, key: str) -> Callable[[], list[Point]]:
    """A call that reads every point of metric ``key`` as (key, value, timestamp_ms, step).

    Several times faster than ``get_metric_history``, which builds an ORM object and an
    entity per point.
    """
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlMetric

    table: Any = SqlMetric.__table__
    columns = (table.c.value, table.c.timestamp, table.c.step, table.c.is_nan)
    query = sa.select(*columns).where(table.c.run_uuid == run_id, table.c.key == key)
    nan = float("nan")

    def read() -> list[Point]:
        with engine.connect() as conn:
            rows = conn.execute(query).all()
        return [
            (key, nan if is_nan else float(value), int(timestamp), int(step))
            for value, timestamp, step, is_nan in rows
        ]

    return read


def last_point_reader(engine: Any, run_id: str) -> Callable[[], int | None]:
    """A call that reads the timestamp (ms) of the run's latest metric point, or None."""
    import sqlalchemy as sa
    from mlflow.store.tracking.dbmodels.models import SqlMetric

    table: Any = SqlMetric.__table__
    query = sa.select(sa.func.max(table.c.timestamp)).where(table.c.run_uuid == run_id)

    def read() -> int | None:
        with engine.connect() as conn:
            value = conn.execute(query).scalar()
        return None if value is None else int(value)

    return read
