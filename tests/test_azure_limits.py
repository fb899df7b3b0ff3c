"""Azure ML's own limits (SPEC section 19), against a simulated workspace: a plain-HTTP
proxy in front of a real `mlflow server` that refuses what Azure ML refuses
(tests/azure_workspace.py), with ``TRAINKIT_STORE_FLAVOR=azureml``.

Every test asserts that the proxy refused nothing: the SDK keeps the limits itself.
"""

from __future__ import annotations

import multiprocessing
import re
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from azure_workspace import SimulatedWorkspace
from click.testing import CliRunner
from mlflow.tracking import MlflowClient
from test_push import build_pipeline, spec

from trainkit_tracking import RunSpec, Tracker, TrackingError, push
from trainkit_tracking.cli import cli
from trainkit_tracking.testing import MlflowServer

pytestmark = [pytest.mark.server, pytest.mark.slow]


def version_of(name: str) -> int:
    """The `_N` of a run name, in the default policy's names and the seed's alike."""
    found = re.search(r"_(\d+)(?: |$)", name)
    assert found, name
    return int(found.group(1))


@pytest.fixture(scope="module")
def azure_server(
    trainkit_sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """A fresh `mlflow server` of this module's own (experiment counts start from zero)."""
    root = tmp_path_factory.mktemp("azure-server")
    db = root / "mlflow.db"
    shutil.copyfile(trainkit_sqlite_template, db)
    server = MlflowServer(f"sqlite:///{db}", root / "artifacts").start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def workspace(
    azure_server: MlflowServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[SimulatedWorkspace]:
    monkeypatch.setenv("TRAINKIT_STORE_FLAVOR", "azureml")
    with SimulatedWorkspace(azure_server.uri) as proxy:
        yield proxy
    assert proxy.violations == []


def test_the_pipeline_runs_through_the_workspace_within_its_limits(
    workspace: SimulatedWorkspace,
    tmp_path: Path,
    trainkit_sqlite_template: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("TRAINKIT_CV_METRICS", "loss")  # the folds log a plain `loss`
    uri = workspace.uri
    ids = build_pipeline(uri, tmp_path)  # sweep, trials, folds, refit, final, benchmark
    tracker = Tracker("pipeline", uri, project="ner")
    # Many points in one go: the spool's batches hold 1000, Azure takes 250 per request.
    with tracker.start_run(spec("final_training", spec_fp="aa11", exec_fp="bb22")) as run:
        for step in range(1200):
            run.log_metric("loss", 1.0 / (step + 1), step=step)
        run.log_params({f"p{i}": i for i in range(150)})
    history = MlflowClient(uri).get_metric_history(run.id, "loss")
    assert len(history) == 1200
    # The CV summary and the leaderboard were written at the ends.
    client = MlflowClient(uri)
    trial = client.get_run(ids["trial1"])
    assert trial.data.metrics["cv.loss.mean"] > 0
    assert "leaderboard.csv" in [a.path for a in client.list_artifacts(ids["sweep"])]
    # find and resume.
    trial_spec = spec("hpo_trial", study_key_hash="350a79aa0000ffff", trial_number=0,
                      trial_key_hash="trial0xx", study_name="ner study")  # fmt: skip
    assert tracker.find(trial_spec) == [ids["trial0"]]
    failed = tracker.start_run(spec("hpo_trial", study_key_hash="cafe", trial_number=3))
    failed.end("FAILED")
    resumed = tracker.start_run(
        spec("hpo_trial", study_key_hash="cafe", trial_number=3), resume=True
    )
    assert resumed.id == failed.id
    resumed.end()
    # tree reads every run (pages under 1000).
    result = CliRunner().invoke(cli, ["tree", "-e", "pipeline", "--tracking-uri", uri])
    assert result.exit_code == 0, result.output
    assert "fold" in result.output
    # push: offline runs of a local store into the workspace, twice (nothing doubled).
    local = tmp_path / "local.db"
    shutil.copyfile(trainkit_sqlite_template, local)
    offline = Tracker("offline", f"sqlite:///{local}")
    for _ in range(2):
        with offline.start_run(RunSpec(kind="hpo_sweep", model="m", environment="local",
                                       study_key_hash="beef")) as sweep:  # fmt: skip
            for step in range(600):
                sweep.log_metric("loss", float(step), step=step)
    offline.close()
    first = push(from_uri=f"sqlite:///{local}", to_uri=uri)
    again = push(from_uri=f"sqlite:///{local}", to_uri=uri)
    assert first.created == 2 and again.created == 0
    pushed = client.search_runs(
        [client.get_experiment_by_name("offline").experiment_id], max_results=10
    )
    assert sorted(version_of(r.info.run_name) for r in pushed) == [1, 2]
    tracker.close()


def test_the_201st_param_is_refused_at_the_call(workspace: SimulatedWorkspace) -> None:
    tracker = Tracker("params", workspace.uri)
    trial = spec("hpo_trial", study_key_hash="feed", trial_number=1)
    run = tracker.start_run(trial)
    run.log_params({"model": {f"layer{i}": i for i in range(150)}})  # flattened: 150 params
    run.end("FAILED")
    resumed = tracker.start_run(trial, resume=True)  # the params it holds count
    resumed.log_params({f"extra{i}": i for i in range(50)})  # 200: the limit
    with pytest.raises(TrackingError) as refused:
        resumed.log_params({"extra49": 49, "one_too_many": 1})
    text = str(refused.value)
    assert "'one_too_many'" in text and run.id in text and "200" in text
    resumed.log_params({"extra0": 0})  # known params are no new ones
    assert resumed.flush()
    resumed.end()
    assert len(MlflowClient(workspace.uri).get_run(run.id).data.params) == 200
    tracker.close()


def test_experiments_grow_by_at_most_two_after_100_versioned_runs(
    workspace: SimulatedWorkspace,
) -> None:
    client = MlflowClient(workspace.uri)
    before = len(client.search_experiments(view_type=3, max_results=500))
    tracker = Tracker("hundred", workspace.uri)
    names = []
    for number in range(100):
        run = tracker.start_run(
            spec("hpo_trial", study_key_hash="0ddba11", trial_number=number % 7)
        )
        names.append(run.name)
        run.end()
    tracker.close()
    after = client.search_experiments(view_type=3, max_results=500)
    assert len(after) - before <= 2
    assert len(set(names)) == 100
    assert not [e.name for e in after if "/" in e.name]


def _racer(uri: str, experiment: str, barrier: Any, results: Any, runs: int) -> None:
    import os

    os.environ["TRAINKIT_STORE_FLAVOR"] = "azureml"
    try:
        tracker = Tracker(experiment, uri)
        tracker.setup()
        barrier.wait(timeout=300)
        for _ in range(runs):
            run = tracker.start_run(
                RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd")
            )
            results.put(run.name)
            run.end()
        tracker.close()
    except BaseException as exc:
        results.put(f"error: {type(exc).__name__}: {exc}")
        raise


def race(uri: str, experiment: str, racers: int, runs: int) -> list[str]:
    Tracker(experiment, uri).setup()
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(racers)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(uri, experiment, barrier, results, runs))
        for _ in range(racers)
    ]
    for proc in procs:
        proc.start()
    names = [results.get(timeout=600) for _ in range(racers * runs)]
    for proc in procs:
        proc.join(timeout=120)
    return names


@pytest.mark.parametrize("params_per_run", [200, 5], ids=["azure", "full-claims-runs"])
def test_version_races_through_the_workspace_are_exact(
    azure_server: MlflowServer, monkeypatch: pytest.MonkeyPatch, params_per_run: int
) -> None:
    # With 5 params per run, claims runs fill up during the race: new ones are made
    # while racers claim, and versions must stay exact.
    monkeypatch.setenv("TRAINKIT_STORE_FLAVOR", "azureml")
    with SimulatedWorkspace(azure_server.uri, params_per_run=params_per_run) as proxy:
        names = race(proxy.uri, f"race-{params_per_run}", racers=8, runs=2)
    assert not [n for n in names if n.startswith("error")], names
    assert sorted(version_of(n) for n in names) == list(range(1, 17))
    assert proxy.violations == [] or params_per_run < 200  # full runs refuse by design
