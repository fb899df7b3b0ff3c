"""Issue 24's shared-run cases through the public API: eight Optuna workers on a fresh
sqlite store, holders never brought back by a heartbeat in flight, staleness that counts
only time in which the store answered, and resume over deleted runs in one lookup.

The holder and outage cases run through a proxy in front of a real `mlflow server`
(tests/azure_workspace.py, without Azure's limits) that holds chosen requests or answers
503 for a while.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from azure_workspace import SimulatedWorkspace
from mlflow.tracking import MlflowClient
from test_shared import optuna_workers

from trainkit_tracking import RunSpec, Tracker
from trainkit_tracking.testing import MlflowServer

pytestmark = pytest.mark.slow

SPEC = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="5eed5eed")


@pytest.mark.parametrize("round_", [1, 2])
def test_eight_optuna_workers_on_a_fresh_sqlite_store_share_one_sweep(
    tmp_path: Path, round_: int
) -> None:
    # A store that does not exist yet: the first opening makes the schema while the other
    # workers wait; they once queued ~5 s each behind it and found the sweep ended.
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    store, sweep_id = optuna_workers(uri, f"journal:{tmp_path / 'journal.log'}", tmp_path, 8, 2)
    sweep = store.get_run(sweep_id)
    trials = store.search([sweep.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep_id}'")
    assert sweep.status == "FINISHED"
    assert sweep.end_time is not None
    assert all(t.end_time is not None and t.end_time <= sweep.end_time for t in trials)
    assert not [k for k in sweep.tags if k.startswith("code.holder.")]


@pytest.fixture
def proxy(trainkit_server: MlflowServer) -> Iterator[SimulatedWorkspace]:
    with SimulatedWorkspace(trainkit_server.uri, limits=False) as workspace:
        yield workspace


def _holder_beat_at(uri: str, run_id: str, holder: str) -> float:
    value = MlflowClient(uri).get_run(run_id).data.tags.get(holder, "0")
    return float(value)


@pytest.mark.server
def test_a_heartbeat_in_flight_never_brings_a_released_holder_back(
    proxy: SimulatedWorkspace,
) -> None:
    first = Tracker("holders-in-flight", proxy.uri, heartbeat_interval=0.3, holder_timeout=60)
    second = Tracker("holders-in-flight", proxy.uri, heartbeat_interval=0.3, holder_timeout=60)
    a = first.start_run(SPEC, resume=True)
    b = second.start_run(SPEC, resume=True)
    assert a.id == b.id
    holder = a._holder
    assert holder is not None
    proxy.delay[(holder, "code.heartbeat")] = 4.0  # a's next beat is held at the proxy
    assert proxy.held.wait(30)
    a.end()  # released while its beat is in flight
    time.sleep(5)  # the beat has landed
    proxy.delay.clear()
    b.end()  # the last live holder ends the run
    assert MlflowClient(proxy.uri).get_run(a.id).info.status == "FINISHED"
    first.close()
    second.close()


@pytest.mark.server
def test_an_outage_does_not_count_towards_a_holder_s_staleness(
    proxy: SimulatedWorkspace, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    # `a` beats every 30 s, `b` every 0.2 s; `b` takes a holder for dead after 4 s.
    first = Tracker("holders-outage", proxy.uri, heartbeat_interval=30, holder_timeout=4, timeout=3)
    second = Tracker(
        "holders-outage", proxy.uri, heartbeat_interval=0.2, holder_timeout=4, timeout=3
    )
    a = first.start_run(SPEC, resume=True)
    b = second.start_run(SPEC, resume=True)
    assert a.id == b.id and b._holder is not None
    proxy.down = True
    time.sleep(6)  # an outage longer than the staleness threshold
    proxy.down = False
    back = time.time()
    deadline = time.monotonic() + 30
    while _holder_beat_at(proxy.uri, b.id, b._holder) < int(back):  # b beats again
        assert time.monotonic() < deadline
        time.sleep(0.1)
    b.end()  # `a` lives: an outage is no evidence against it
    assert MlflowClient(proxy.uri).get_run(a.id).info.status == "RUNNING"
    a.end()
    assert MlflowClient(proxy.uri).get_run(a.id).info.status == "FINISHED"
    first.close()
    second.close()


@pytest.mark.server
def test_resume_over_deleted_runs_of_the_identity_is_one_lookup(
    proxy: SimulatedWorkspace,
) -> None:
    tracker = Tracker("deleted-identity", proxy.uri, timeout=5)
    client = MlflowClient(proxy.uri)
    for _ in range(2):
        run = tracker.start_run(SPEC, resume=True)
        run.end("FAILED")
        client.delete_run(run.id)
    searches = proxy.calls.get("/api/2.0/mlflow/runs/search", 0)
    again = tracker.start_run(SPEC, resume=True)  # once: timeout x 2 and ~300 calls
    searched = proxy.calls.get("/api/2.0/mlflow/runs/search", 0) - searches
    assert searched <= 2, searched
    assert again.name.startswith("sweep_3 ")
    again.end()
    tracker.close()
