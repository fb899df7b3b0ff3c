"""Points bulk-inserted into MLflow's own tables (SPEC section 17) read back exactly as
``MlflowClient.log_batch`` leaves them, on sqlite and on PostgreSQL (``postgresql://``
against a throwaway cluster); what MLflow refuses is refused alike; an unknown schema
falls back to MLflow's API and ``doctor`` says which path a store uses.

Also run at the low end of the mlflow range (.ci/azure.sh).
"""

from __future__ import annotations

import math
import multiprocessing
import os
import shutil
import sqlite3
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path
from typing import Any

import mlflow
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from pg import PostgresCluster, postgres_unavailable_reason

from trainkit_tracking._store import sql_bulk
from trainkit_tracking._store.store import Store
from trainkit_tracking.cli import cli
from trainkit_tracking.testing import TrainkitStore

Point = tuple[str, float, int, int]
BULK = "bulk inserts into MLflow's tables"
# mlflow 3.15 refuses a batch with points that are one row once stored (a NaN point sent
# again: its duplicate check compares NaN with NaN; inf beside 1.797e308): the bulk path
# stores the row once, as later versions do.
OLD_DUPLICATE_CHECK = tuple(int(p) for p in mlflow.__version__.split(".")[:2]) < (3, 17)


# Stores ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sqlite_uri(trainkit_sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory) -> str:
    db = tmp_path_factory.mktemp("bulk-sqlite") / "mlflow.db"
    shutil.copyfile(trainkit_sqlite_template, db)
    return f"sqlite:///{db}"


@pytest.fixture(scope="module")
def postgresql_uri() -> Iterator[str]:
    reason = postgres_unavailable_reason()
    if reason is not None:
        if os.environ.get("TRAINKIT_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{reason}, and TRAINKIT_REQUIRE_POSTGRES=1 requires PostgreSQL")
        pytest.skip(reason)
    with PostgresCluster() as cluster:
        Store(cluster.uri, timeout=300).ping()  # creates the schema
        yield cluster.uri


@pytest.fixture(scope="module", params=["sqlite", "postgresql"])
def uri(request: pytest.FixtureRequest) -> str:
    return str(request.getfixturevalue(f"{request.param}_uri"))


def new_run(store: Store, name: str) -> str:
    return store.create_run(store.get_or_create_experiment("bulk"), name, {}).run_id


# What MLflow's client reads back --------------------------------------------------------


def same(a: float, b: float) -> bool:
    return (math.isnan(a) and math.isnan(b)) or (
        a == b and math.copysign(1, a) == math.copysign(1, b)
    )


def history(client: MlflowClient, run_id: str, key: str) -> list[tuple[int, int, str]]:
    """``get_metric_history`` as sortable rows (its order among exact ties is the DB's)."""
    return sorted(
        (m.timestamp, m.step, repr(m.value)) for m in client.get_metric_history(run_id, key)
    )


def latest(client: MlflowClient, run_id: str) -> dict[str, tuple[str, int, int]]:
    """``get_run().data.metrics`` with each latest point's timestamp and step."""
    data: Any = client.get_run(run_id).data
    values = {k: repr(v) for k, v in data.metrics.items()}
    objs = {m.key: (repr(m.value), m.timestamp, m.step) for m in data._metric_objs}
    assert {k: v[0] for k, v in objs.items()} == values
    return objs


def assert_alike(client: MlflowClient, ours: str, theirs: str, keys: set[str]) -> None:
    for key in keys:
        assert history(client, ours, key) == history(client, theirs, key), key
    assert latest(client, ours) == latest(client, theirs)


def reference_log_batch(client: MlflowClient, run_id: str, batch: list[Point]) -> None:
    """``MlflowClient.log_batch``, past mlflow 3.15's refusal of points that are one row
    once stored: it sends the batch again without them, as later versions store it."""
    try:
        client.log_batch(run_id, metrics=[Metric(*p) for p in batch])
    except MlflowException as exc:
        one_row = any(text in str(exc) for text in ("UNIQUE constraint", "duplicate key"))
        if not (OLD_DUPLICATE_CHECK and one_row):
            raise
        keys = {p[0] for p in batch}
        stored = {
            row(m.key, m.value, m.timestamp, m.step)
            for k in keys
            for m in client.get_metric_history(run_id, k)
        }
        kept: list[Point] = []
        for p in batch:
            if row(*p) not in stored:
                stored.add(row(*p))
                kept.append(p)
        client.log_batch(run_id, metrics=[Metric(*p) for p in kept])


def row(key: str, value: float, timestamp: int, step: int) -> tuple[str, int, int, float, bool]:
    """The ``metrics`` row of a point: NaN stored as 0, +-inf as the largest float."""
    value = float(value)
    if math.isnan(value):
        return key, timestamp, step, 0.0, True
    if math.isinf(value):
        value = math.copysign(MAX, value)
    return key, timestamp, step, value, False


# The property: generated batches, both paths -------------------------------------------

KEYS = ["loss", "val/f1", "late key"]
# Values that tie once stored (NaN is stored as 0, -0.0 equals 0.0, inf as the largest
# float), mostly on a few (timestamp, step) slots: duplicates, equal steps with other
# timestamps and ties at a key's latest point are common; the wide points add the rest.
MAX = 1.7976931348623157e308
TIES = [math.nan, 0.0, -0.0, 0, math.inf, MAX, -math.inf, 1.0]
tight = st.tuples(st.sampled_from(KEYS[:2]), st.sampled_from(TIES), st.just(1), st.just(1))
near = st.tuples(
    st.sampled_from(KEYS[:2]), st.sampled_from(TIES), st.integers(0, 1), st.integers(0, 1)
)
wide = st.tuples(
    st.sampled_from(KEYS),
    st.one_of(st.floats(), st.integers(-2, 2)),
    st.integers(0, 3),
    st.integers(-1, 3),
)
batches = st.lists(
    st.lists(st.one_of(tight, near, wide), min_size=1, max_size=12), min_size=1, max_size=5
)


@settings(
    max_examples=int(os.environ.get("TRAINKIT_BULK_EXAMPLES", "40")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(batches=batches, resent=st.lists(st.integers(0, 4), max_size=3))
# The ties at a key's latest point, always: NaN before 0 in one batch and across batches,
# -0.0 against 0, inf against the largest float; a key first seen later, steps back.
@example(batches=[[("loss", math.nan, 1, 1), ("loss", 0.0, 1, 1)]], resent=[])
@example(
    batches=[[("loss", 0.0, 1, 1)], [("loss", math.nan, 1, 1), ("loss", -0.0, 1, 1)]], resent=[0]
)
@example(
    batches=[
        [("loss", -0.0, 1, 1), ("loss", 0, 1, 1), ("val/f1", math.inf, 0, 0), ("val/f1", MAX, 0, 0)]
    ],
    resent=[0],
)
@example(
    batches=[
        [("loss", 1.0, 2, 2)],
        [("loss", 5.0, 1, 2), ("late key", 2.0, 0, -1), ("loss", 0.5, 3, 1)],
    ],
    resent=[1],
)
def test_bulk_path_reads_back_as_log_batch_does(
    uri: str, batches: list[list[Point]], resent: list[int]
) -> None:
    """Keys, NaN/inf, duplicates, out-of-order steps and timestamps, equal steps with other
    timestamps, a key first seen in a later batch, and batches re-sent after a "crash"."""
    store = Store(uri)
    assert store.metric_path().startswith(BULK)
    ours, theirs = new_run(store, "bulk"), new_run(store, "mlflow")
    sent = batches + [batches[i] for i in resent if i < len(batches)]
    for batch in sent:
        store.log_batch(ours, metrics=batch)
        reference_log_batch(store.client, theirs, batch)
    assert_alike(store.client, ours, theirs, {p[0] for b in sent for p in b})


# Exactly once, and refusals alike -------------------------------------------------------


def test_a_resent_batch_stores_nothing_twice(uri: str) -> None:
    """Regression at mlflow 3.15: its log_batch refused a re-sent NaN point for good."""
    store = Store(uri)
    run_id = new_run(store, "resent")
    batch = [("loss", math.nan, 7, 1), ("loss", 0.5, 7, 2), ("acc", math.inf, 8, 2)]
    for _ in range(3):
        store.log_batch(run_id, metrics=[(k, float(v), t, s) for k, v, t, s in batch])
    assert history(store.client, run_id, "loss") == [(7, 1, "nan"), (7, 2, "0.5")]
    assert latest(store.client, run_id)["loss"] == ("0.5", 7, 2)


def refusal(call: Any) -> tuple[type[BaseException], str | None]:
    with pytest.raises(Exception) as caught:
        call()
    return type(caught.value), getattr(caught.value, "error_code", None)


@pytest.mark.parametrize(
    "point",
    [
        ("bad\x00key", 1.0, 1, 0),  # a key MLflow's rules refuse
        ("../up", 1.0, 1, 0),  # a path that is not unique
        ("k" * 251, 1.0, 1, 0),  # too long
        ("loss", 1.0, -1, 0),  # a negative timestamp
        ("loss", "1.0x", 1, 0),  # not a number
    ],
)
def test_a_point_mlflow_refuses_is_refused_alike(uri: str, point: Point) -> None:
    store = Store(uri)
    run_id = new_run(store, "refused")
    ours = refusal(lambda: store.log_batch(run_id, metrics=[point]))
    theirs = refusal(lambda: store.client.log_batch(run_id, metrics=[Metric(*point)]))
    assert ours == theirs
    assert store.client.get_run(run_id).data.metrics == {}


def test_a_batch_for_a_deleted_or_missing_run_is_refused_alike(uri: str) -> None:
    store = Store(uri)
    run_id = new_run(store, "deleted")
    store.client.delete_run(run_id)
    points = [("loss", 1.0, 1, 0)]
    for target in (run_id, "0" * 32):
        ours = refusal(lambda t=target: store.log_batch(t, metrics=points))
        theirs = refusal(lambda t=target: store.client.log_batch(t, metrics=[Metric(*points[0])]))
        assert ours == theirs
        assert ours[1] in ("INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST")
    store.client.restore_run(run_id)
    assert store.client.get_metric_history(run_id, "loss") == []


def test_params_and_tags_go_through_mlflow_beside_bulk_points(uri: str) -> None:
    store = Store(uri)
    run_id = new_run(store, "mixed")
    store.log_batch(run_id, metrics=[("loss", 1.0, 1, 0)], params={"lr": "0.1"}, tags={"t": "x"})
    run = store.client.get_run(run_id)
    assert (run.data.params, run.data.tags["t"], run.data.metrics) == (
        {"lr": "0.1"},
        "x",
        {"loss": 1.0},
    )
    with pytest.raises(MlflowException) as caught:  # a param changed: MLflow's own refusal
        store.log_batch(run_id, metrics=[("loss", 2.0, 2, 1)], params={"lr": "0.2"})
    assert caught.value.error_code == "INVALID_PARAMETER_VALUE"


def _log_steps(uri: str, run_id: str, first: int, barrier: Any) -> None:
    store = Store(uri)
    store.log_batch(run_id, metrics=[("warm", 0.0, 0, 0)])
    barrier.wait()
    for step in range(first, first + 40, 2):
        store.log_batch(run_id, metrics=[("loss", float(step), 1000 - step, step)])


def test_writers_racing_on_one_run_keep_the_latest_point(uri: str) -> None:
    """Two processes log alternate steps of one key at once: every point is stored once and
    the latest is the greatest step, whoever wrote last (an upsert, not read-then-write)."""
    store = Store(uri)
    run_id = new_run(store, "race")
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(2)
    workers = [
        context.Process(target=_log_steps, args=(uri, run_id, first, barrier)) for first in (0, 1)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    assert len(store.client.get_metric_history(run_id, "loss")) == 40
    assert latest(store.client, run_id)["loss"] == ("39.0", 961, 39)


# Falling back to MLflow's API -----------------------------------------------------------


def test_a_database_with_other_columns_falls_back_to_mlflows_api(
    trainkit_store: TrainkitStore,
) -> None:
    with closing(sqlite3.connect(trainkit_store.db_path)) as conn, conn:
        conn.execute("ALTER TABLE metrics ADD COLUMN origin VARCHAR(20)")
    store = Store(trainkit_store.uri)
    path = store.metric_path()
    assert path.startswith("MLflow's API (the database's table metrics has columns"), path
    run_id = new_run(store, "fallback")
    store.log_batch(run_id, metrics=[("loss", 1.0, 1, 0), ("loss", 1.0, 1, 0)])
    assert store.client.get_run(run_id).data.metrics == {"loss": 1.0}


def test_a_database_at_another_revision_falls_back(trainkit_store: TrainkitStore) -> None:
    store = Store(trainkit_store.uri)
    store.ping()  # opened (MLflow checks the revision when it opens a store)
    with closing(sqlite3.connect(trainkit_store.db_path)) as conn, conn:
        conn.execute("UPDATE alembic_version SET version_num = 'abc123'")
    assert store.metric_path() == (
        "MLflow's API (the database is at schema revision abc123, mlflow "
        f"{mlflow.__version__} at {_head()}; the bulk path knows only the tested schema)"
    )


def _head() -> str:
    from mlflow.store.db.utils import _get_latest_schema_revision

    return str(_get_latest_schema_revision())


def test_an_mlflow_outside_the_tested_range_falls_back(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(sql_bulk, "TESTED_MLFLOW", ((2, 0), (2, 22)))
    path = Store(trainkit_store.uri).metric_path()
    assert path.startswith(
        f"MLflow's API (mlflow {mlflow.__version__} is outside the tested 2.0-2.22"
    )


def test_an_active_logged_model_gets_its_points_through_mlflow(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = Store(trainkit_store.uri)
    run_id = new_run(store, "model")
    model = store.client.create_logged_model(store.client.get_run(run_id).info.experiment_id)
    monkeypatch.setenv("MLFLOW_ACTIVE_MODEL_ID", model.model_id)
    store.log_batch(run_id, metrics=[("loss", 0.5, 1, 3)])
    assert [m.value for m in store.client.get_logged_model(model.model_id).metrics] == [0.5]
    assert store.client.get_run(run_id).data.metrics == {"loss": 0.5}


def test_doctor_says_which_path_a_store_uses(trainkit_store: TrainkitStore) -> None:
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    lines = [line for line in result.stdout.splitlines() if "metric writes" in line]
    assert lines == [f"  metric writes   {BULK} (sqlite)"], result.stdout
