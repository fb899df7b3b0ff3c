"""Tracker and Run against real stores: resolution, the run tree, versions, resume, statuses."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking import Lineage, RunSpec, Tracker, TrackingError
from trainkit_tracking.testing import TrainkitStore

STUDY = "350a79aa0000ffff"


def sweep_spec(**changes: Any) -> RunSpec:
    fields: dict[str, Any] = {
        "kind": "hpo_sweep",
        "model": "distilbert",
        "environment": "local",
        "study_name": "ner study",
        "study_key_hash": STUDY,
        "study_family_hash": "fam12345",
    }
    fields.update(changes)
    return RunSpec(**fields)


def tags_of(uri: str, run_id: str) -> dict[str, str]:
    return dict(MlflowClient(uri).get_run(run_id).data.tags)


# Resolution -------------------------------------------------------------------


def test_nothing_happens_until_first_use(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/never/mlflow.db"
    Tracker("exp", uri)
    assert not (tmp_path / "never").exists()


def test_default_is_the_embedded_local_store(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    tracker = Tracker("exp")
    uri, experiment_id = tracker.setup()
    assert uri == f"sqlite:///{trainkit_store.root.resolve()}/mlruns/mlflow.db"
    assert tracker.uri_source == "local store"
    assert MlflowClient(uri).get_experiment(experiment_id).name == "exp"


def test_uri_and_experiment_from_environment(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "from-env")
    tracker = Tracker.from_env()
    uri, experiment_id = tracker.setup()
    assert uri == trainkit_store.uri
    assert tracker.uri_source == "MLFLOW_TRACKING_URI"
    assert tracker.experiment_name == "from-env"
    assert Tracker("arg", "sqlite:///" + str(trainkit_store.db_path)).setup()[1] != experiment_id


def test_missing_experiment_is_a_clear_error(trainkit_store: TrainkitStore) -> None:
    with pytest.raises(TrackingError, match="MLFLOW_EXPERIMENT_NAME"):
        Tracker().setup()


def test_experiment_creation_is_race_safe(trainkit_store: TrainkitStore) -> None:
    code = textwrap.dedent(
        """
        import sys, time
        from trainkit_tracking import Tracker
        while time.time() < float(sys.argv[1]):
            time.sleep(0.001)
        print(Tracker("raced", sys.argv[2]).setup()[1])
        """
    )
    start = time.time() + 4
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", code, str(start), trainkit_store.uri],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(6)
    ]
    results = [p.communicate(timeout=120) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err for _, err in results]
    assert len({out.strip() for out, _ in results}) == 1


# The run tree -------------------------------------------------------------------


def build_tree(tracker: Tracker, other: Tracker) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    with tracker.start_run(sweep_spec()) as sweep:
        runs["sweep"] = sweep
        for number in (0, 1):
            with sweep.child(
                "hpo_trial", trial_number=number, trial_key_hash=f"trial{number}xx"
            ) as trial:
                runs[f"trial{number}"] = trial
                for fold in (0, 1):
                    with trial.child("hpo_trial_fold", fold_idx=fold) as fold_run:
                        runs[f"fold{number}{fold}"] = fold_run
        with sweep.child("hpo_refit", trial_number=1, trial_key_hash="trial1xx") as refit:
            runs["refit"] = refit
    lineage = tracker.lineage(runs["refit"].id)
    final_spec = RunSpec(
        kind="final_training",
        model="distilbert",
        environment="local",
        spec_fp="abc123de99",
        exec_fp="fedcba9876",
        variant=2,
        lineage=lineage,
    )
    with tracker.start_run(final_spec) as final:
        runs["final"] = final
    bench = RunSpec(
        kind="benchmarking",
        model="distilbert",
        environment="local",
        study_key_hash=STUDY,
        trial_key_hash="trial1xx",
        benchmark_config_hash="bench5678",
        lineage=Lineage(hpo_trial_run_id=runs["trial1"].id, hpo_sweep_run_id=runs["sweep"].id),
    )
    with tracker.start_run(bench) as bench_run:
        runs["bench"] = bench_run
    conversion = RunSpec(
        kind="conversion",
        model="distilbert",
        environment="local",
        conv_fp="conv0000aa",
        parent_training_id="spec_abc123de99_exec_fedcba9876/v2",
        lineage=Lineage(source="final_training", parent_training_run_id=final.id),
    )
    with other.start_run(conversion) as conversion_run:
        runs["conversion"] = conversion_run
    return runs


def check_tree(tracker: Tracker, other: Tracker, runs: dict[str, Any]) -> None:
    client = MlflowClient(tracker.tracking_uri)
    info = {key: client.get_run(run.id) for key, run in runs.items()}
    sweep_id = runs["sweep"].id
    exp = tracker.experiment_id
    names = {key: run.info.run_name for key, run in info.items()}
    assert names["sweep"] == f"sweep_1 {STUDY[:8]}_nerstudy distilbert"
    assert names["trial1"] == f"t01_1 distilbert study-{STUDY[:8]}"
    assert names["fold11"] == f"t01 fold1 distilbert study-{STUDY[:8]}"
    assert names["refit"] == f"refit t01_1 distilbert study-{STUDY[:8]} trial-trial1xx"
    assert names["final"] == "final abc123de v2 distilbert exec-fedcba98"
    assert names["bench"] == f"bench_1 bench567 distilbert study-{STUDY[:8]} trial-trial1xx"
    assert names["conversion"] == "conv conv0000 abc123de v2 distilbert exec-fedcba98"
    parents = {key: run.data.tags.get("mlflow.parentRunId") for key, run in info.items()}
    assert parents["sweep"] is None and parents["final"] is None and parents["bench"] is None
    assert parents["trial0"] == parents["trial1"] == parents["refit"] == sweep_id
    assert parents["fold00"] == parents["fold01"] == runs["trial0"].id
    assert parents["fold10"] == parents["fold11"] == runs["trial1"].id
    for key, run in info.items():
        expected_exp = other.experiment_id if key == "conversion" else exp
        assert run.info.experiment_id == expected_exp, key
        assert run.info.status == "FINISHED", key
        tags = run.data.tags
        assert tags["code.run_name"] == run.info.run_name, key
        assert tags["mlflow.runName"] == run.info.run_name, key
        for tag in ("code.stage", "code.run_kind", "code.model", "code.env", "code.run_key_hash"):
            assert tags.get(tag), (key, tag)
    fold_tags = info["fold11"].data.tags
    assert fold_tags["code.run_kind"] == "hpo_trial_fold"
    assert fold_tags["code.hpo.fold_idx"] == "1"
    assert fold_tags["code.hpo.trial_number"] == "1"
    assert fold_tags["code.study_key_hash"] == STUDY
    assert fold_tags["mlflow.runType"] == "fold"
    final_tags = info["final"].data.tags
    assert final_tags["code.lineage.source"] == "hpo_best_selected"
    assert final_tags["code.lineage.hpo_refit_run_id"] == runs["refit"].id
    assert final_tags["code.lineage.hpo_trial_run_id"] == runs["trial1"].id
    assert final_tags["code.lineage.hpo_sweep_run_id"] == sweep_id
    assert final_tags["code.trial_key_hash"] == "trial1xx"
    bench_tags = info["bench"].data.tags
    assert bench_tags["code.lineage.parent_kind"] == "trial"
    assert bench_tags["code.lineage.parent_training_run_id"] == runs["trial1"].id
    conv_tags = info["conversion"].data.tags
    assert conv_tags["code.lineage.parent_training_run_id"] == runs["final"].id
    assert conv_tags["code.lineage.parent_spec_fp"] == "abc123de99"


def test_whole_tree_on_sqlite(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("pipeline", project="ner")
    other = Tracker("conversions", project="ner")
    runs = build_tree(tracker, other)
    check_tree(tracker, other, runs)
    assert runs["sweep"].url is None


@pytest.mark.server
def test_whole_tree_on_server(trainkit_server: Any, trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("pipeline-server", trainkit_server.uri, project="ner")
    other = Tracker("conversions-server", trainkit_server.uri, project="ner")
    runs = build_tree(tracker, other)
    check_tree(tracker, other, runs)
    assert runs["sweep"].url == (
        f"{trainkit_server.uri}/#/experiments/{tracker.experiment_id}/runs/{runs['sweep'].id}"
    )


@pytest.mark.postgres
def test_whole_tree_on_postgres(
    trainkit_postgres_server: Any, trainkit_store: TrainkitStore
) -> None:
    tracker = Tracker("pipeline-pg", trainkit_postgres_server.uri, project="ner")
    other = Tracker("conversions-pg", trainkit_postgres_server.uri, project="ner")
    check_tree(tracker, other, build_tree(tracker, other))


def test_parent_given_as_run_id(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    sweep = tracker.start_run(sweep_spec())
    trial = tracker.start_run(sweep_spec(kind="hpo_trial", trial_number=4), parent=sweep.id)
    assert trial.parent_id == sweep.id
    assert tags_of(trainkit_store.uri, trial.id)["mlflow.parentRunId"] == sweep.id
    trial.end()
    sweep.end()


def test_child_of_a_run_in_another_experiment_lands_in_the_parent_experiment(
    trainkit_store: TrainkitStore,
) -> None:
    first = Tracker("first")
    second = Tracker("second")
    sweep = first.start_run(sweep_spec())
    trial = second.start_run(sweep_spec(kind="hpo_trial", trial_number=0), parent=sweep.id)
    assert trial.experiment_id == first.experiment_id
    for run in (trial, sweep):
        run.end()


# Versions ----------------------------------------------------------------------


def test_versions_assigned_at_creation(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    spec = sweep_spec(study_name=None)
    for _ in range(3):
        tracker.policy.base_name(spec)  # building names never consumes a version
    names = []
    for _ in range(3):
        run = tracker.start_run(spec)
        names.append(run.name)
        run.end()
    base = f"sweep {STUDY[:8]} distilbert"
    assert names == [f"sweep_{n} {STUDY[:8]} distilbert" for n in (1, 2, 3)]
    tags = tags_of(trainkit_store.uri, tracker.find(spec)[0])
    assert tags["code.version"] == "3" and tags["code.base_name"] == base
    explicit = tracker.start_run(sweep_spec(run_name="my own name"))
    assert explicit.name == "my own name"
    explicit.end()
    assert tracker.start_run(spec).name == f"sweep_4 {STUDY[:8]} distilbert"


def test_deleted_run_number_is_never_reused(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    spec = sweep_spec(study_name=None)
    first, second = tracker.start_run(spec), tracker.start_run(spec)
    MlflowClient(trainkit_store.uri).delete_run(second.id)
    third = tracker.start_run(spec)
    assert third.name.startswith("sweep_3 ")
    for run in (first, third):
        run.end()


CONCURRENT = textwrap.dedent(
    """
    import os, sys, time
    from trainkit_tracking import RunSpec, Tracker
    uri, barrier = sys.argv[1], sys.argv[2]
    tracker = Tracker("concurrent", uri)
    tracker.setup()
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="cafe0123")
    open(os.path.join(barrier, str(os.getpid())), "w").close()
    while not os.path.exists(os.path.join(barrier, "go")):
        time.sleep(0.001)
    run = tracker.start_run(spec)
    run.end()
    print(run.name)
    """
)


def run_concurrently(uri: str, count: int, barrier: Path) -> list[str]:
    """Start ``count`` processes, wait until all are ready, then let them create at once."""
    Tracker("concurrent", uri).setup()
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CONCURRENT, uri, str(barrier)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    deadline = time.time() + 240
    while len(list(barrier.iterdir())) < count and time.time() < deadline:
        if any(p.poll() is not None for p in procs):
            break
        time.sleep(0.05)
    (barrier / "go").touch()
    outs = [p.communicate(timeout=300) for p in procs]
    assert all(p.returncode == 0 for p in procs), [err[-2000:] for _, err in outs]
    return [out.strip().splitlines()[-1] for out, _ in outs]


def version_of(name: str) -> int:
    """N of a default sweep name ``sweep_N <hash> <model>``."""
    return int(name.split(" ", 1)[0].removeprefix("sweep_"))


@pytest.mark.slow
def test_sixteen_processes_get_distinct_versions_on_sqlite(trainkit_store: TrainkitStore) -> None:
    names = run_concurrently(trainkit_store.uri, 16, trainkit_store.root / "barrier")
    assert sorted(names, key=version_of) == [f"sweep_{n} cafe0123 bert" for n in range(1, 17)]


@pytest.mark.slow
@pytest.mark.postgres
def test_sixteen_processes_get_distinct_versions_on_postgres_server(
    trainkit_postgres_server: Any, trainkit_store: TrainkitStore
) -> None:
    names = run_concurrently(trainkit_postgres_server.uri, 16, trainkit_store.root / "barrier")
    assert sorted(names, key=version_of) == [f"sweep_{n} cafe0123 bert" for n in range(1, 17)]


# Resume and find -----------------------------------------------------------------


def test_resume_unfinished_keeps_id_and_name(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    spec = sweep_spec(kind="hpo_trial", trial_number=7)
    first = tracker.start_run(spec)
    first.end("FAILED")
    again = tracker.start_run(spec, resume=True)
    assert (again.id, again.name) == (first.id, first.name)
    assert MlflowClient(trainkit_store.uri).get_run(again.id).info.status == "RUNNING"
    again.end()
    fresh = tracker.start_run(spec, resume=True)  # the only match is FINISHED: a new run
    assert fresh.id != first.id
    assert fresh.name.startswith("t07_2 ")
    fresh.end()
    assert tracker.find(spec) == [fresh.id, first.id]
    assert tracker.find(sweep_spec(kind="hpo_trial", trial_number=8)) == []


# Statuses --------------------------------------------------------------------------


def status(uri: str, run_id: str) -> str:
    return str(MlflowClient(uri).get_run(run_id).info.status)


def test_context_manager_statuses(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    with tracker.start_run(sweep_spec()) as ok:
        pass
    assert status(trainkit_store.uri, ok.id) == "FINISHED"

    error = ValueError("boom")
    with pytest.raises(ValueError) as raised, tracker.start_run(sweep_spec()) as failed:
        raise error
    assert raised.value is error
    assert status(trainkit_store.uri, failed.id) == "FAILED"

    with pytest.raises(KeyboardInterrupt), tracker.start_run(sweep_spec()) as killed:
        raise KeyboardInterrupt
    assert status(trainkit_store.uri, killed.id) == "KILLED"
    assert tags_of(trainkit_store.uri, killed.id)["code.interrupted"] == "true"

    run = tracker.start_run(sweep_spec())
    run.end("FAILED")
    run.end("FINISHED")  # idempotent: the terminal run is left alone
    assert status(trainkit_store.uri, run.id) == "FAILED"
    with pytest.raises(ValueError, match="status"):
        tracker.start_run(sweep_spec()).end("DONE")


def test_sigterm_ends_the_run_killed(trainkit_store: TrainkitStore) -> None:
    code = textwrap.dedent(
        """
        import sys, time
        from trainkit_tracking import RunSpec, Tracker
        tracker = Tracker("exp", sys.argv[1])
        with tracker.start_run(RunSpec(kind="final_training", model="m", environment="local")) as run:
            print(run.id, flush=True)
            time.sleep(60)
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, trainkit_store.uri], stdout=subprocess.PIPE, text=True
    )
    assert proc.stdout is not None
    run_id = proc.stdout.readline().strip()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=60) == 128 + signal.SIGTERM
    assert status(trainkit_store.uri, run_id) == "KILLED"
    assert tags_of(trainkit_store.uri, run_id)["code.interrupted"] == "true"


def test_unended_run_is_finished_at_exit(trainkit_store: TrainkitStore) -> None:
    code = textwrap.dedent(
        """
        import sys
        from trainkit_tracking import RunSpec, Tracker
        run = Tracker("exp", sys.argv[1]).start_run(
            RunSpec(kind="final_training", model="m", environment="local"))
        run.log_metric("loss", 0.5, step=1)
        print(run.id)
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code, trainkit_store.uri], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert status(trainkit_store.uri, out) == "FINISHED"
    history = MlflowClient(trainkit_store.uri).get_metric_history(out, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]


# Fallback name ------------------------------------------------------------------------


def test_final_training_without_fingerprints_uses_run_id_fallback(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("exp")
    with tracker.start_run(
        RunSpec(kind="final_training", model="bert-base", environment="colab")
    ) as run:
        pass
    assert run.name == f"final {run.id[:8]} bert_base"
    assert MlflowClient(trainkit_store.uri).get_run(run.id).info.run_name == run.name
    assert tags_of(trainkit_store.uri, run.id)["code.run_name"] == run.name


@pytest.mark.parametrize("deleted", [False, True], ids=["gc", "claims-deleted-then-gc"])
def test_versions_stay_unique_after_mlflow_gc_for_every_later_process(
    trainkit_store: TrainkitStore, deleted: bool
) -> None:
    # Issue 24: after `mlflow gc`, only the first later process rebuilt the numbering;
    # the next ones got _2 and _3, which live runs had. Issue 27: a user deleting the
    # claims experiment (then gc) loses every claim: they are re-derived from live runs.
    spec = sweep_spec(study_name=None)
    first = Tracker("exp")
    names = [first.start_run(spec).name, first.start_run(spec).name]
    for run in first.open_runs():
        run.end()
    client = MlflowClient(trainkit_store.uri)
    if deleted:
        claims = client.get_experiment_by_name(".trainkit-claims")
        assert claims is not None
        client.delete_experiment(claims.experiment_id)
    subprocess.run(
        [sys.executable, "-m", "mlflow", "gc", "--backend-store-uri", trainkit_store.uri],
        check=True,
        capture_output=True,
    )
    later = []
    for _ in range(3):  # three later processes: a Tracker starts with no cached numbers
        run = Tracker("exp").start_run(spec)
        later.append(run.name)
        run.end()
    versions = [re.match(r"sweep_(\d+) ", n) for n in names + later]
    assert [m.group(1) if m else n for m, n in zip(versions, names + later, strict=True)] == [
        "1", "2", "3", "4", "5"
    ]  # fmt: skip


def test_claims_leave_one_claims_experiment_and_no_name_with_a_slash(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("exp")
    tracker.setup()
    client = MlflowClient(trainkit_store.uri)
    before = len(client.search_experiments(view_type=3))
    for _ in range(12):
        tracker.start_run(sweep_spec(study_name=None)).end()
    experiments = client.search_experiments(view_type=3)  # ViewType.ALL: hidden ones too
    assert len(experiments) <= before + 1
    assert not [e.name for e in experiments if "/" in e.name]


def test_uncaught_error_ends_open_runs_failed(trainkit_store: TrainkitStore) -> None:
    code = textwrap.dedent(
        """
        import sys
        from trainkit_tracking import RunSpec, Tracker
        run = Tracker("exp", sys.argv[1]).start_run(
            RunSpec(kind="final_training", model="m", environment="local"))
        run.log_metric("loss", 0.5, step=1)
        print(run.id, flush=True)
        raise RuntimeError("training crashed")
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code, trainkit_store.uri], capture_output=True, text=True
    )
    assert done.returncode == 1
    assert "RuntimeError: training crashed" in done.stderr  # the user's traceback is kept
    run_id = done.stdout.strip()
    assert status(trainkit_store.uri, run_id) == "FAILED"
    history = MlflowClient(trainkit_store.uri).get_metric_history(run_id, "loss")
    assert [(m.step, m.value) for m in history] == [(1, 0.5)]
