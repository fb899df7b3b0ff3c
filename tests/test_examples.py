"""examples/quickstart.py, the README's first command, runs end to end on the embedded store."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from mlflow.tracking import MlflowClient

from trainkit_tracking.testing import TrainkitStore

QUICKSTART = Path(__file__).resolve().parents[1] / "examples" / "quickstart.py"


def test_quickstart_builds_the_tree_in_the_local_store(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    workdir = tmp_path / "fresh-dir"
    workdir.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = subprocess.run(
        [sys.executable, str(QUICKSTART)], cwd=workdir, env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr
    db = workdir / "mlruns" / "mlflow.db"
    assert db.exists()  # the embedded store, resolved from the working directory
    assert f"mlflow ui --backend-store-uri sqlite:///{db}" in done.stdout
    client = MlflowClient(f"sqlite:///{db}")
    experiment = client.get_experiment_by_name("quickstart")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    kinds = sorted(r.data.tags["code.run_kind"] for r in runs)
    assert kinds.count("hpo_sweep") == 1
    assert kinds.count("hpo_trial") == 4
    assert kinds.count("hpo_trial_fold") == 12
    assert kinds.count("hpo_refit") == 1
    assert kinds.count("final_training") == 1
    assert all(r.info.status == "FINISHED" for r in runs)
    by_id = {r.info.run_id: r for r in runs}
    final = next(r for r in runs if r.data.tags["code.run_kind"] == "final_training")
    refit_id = final.data.tags["code.lineage.hpo_refit_run_id"]
    assert by_id[refit_id].data.tags["code.run_kind"] == "hpo_refit"
    sweep_id = final.data.tags["code.lineage.hpo_sweep_run_id"]
    assert by_id[refit_id].data.tags["mlflow.parentRunId"] == sweep_id
    for run in runs:
        if run.data.tags["code.run_kind"] == "hpo_trial_fold":
            parent = by_id[run.data.tags["mlflow.parentRunId"]]
            assert parent.data.tags["code.run_kind"] == "hpo_trial"
            assert "accuracy" in run.data.metrics
    # The printed tree shows every run.
    for run in runs:
        assert run.info.run_name in done.stdout


OPTUNA_SUBPROCESS = QUICKSTART.with_name("optuna_subprocess_trials.py")


def test_optuna_trials_with_folds_in_subprocesses(trainkit_store: TrainkitStore) -> None:
    done = subprocess.run(
        [sys.executable, str(OPTUNA_SUBPROCESS), "--trials", "2", "--folds", "2"],
        cwd=trainkit_store.root,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    client = MlflowClient(trainkit_store.uri)
    experiment = client.get_experiment_by_name("optuna-subprocess-example")
    runs = client.search_runs([experiment.experiment_id], max_results=100)
    by_id = {r.info.run_id: r for r in runs}
    kinds = sorted(r.data.tags["code.run_kind"] for r in runs)
    assert kinds == ["hpo_refit", "hpo_sweep", "hpo_trial", "hpo_trial", *["hpo_trial_fold"] * 4]
    assert all(r.info.status == "FINISHED" for r in runs)
    folds = [r for r in runs if r.data.tags["code.run_kind"] == "hpo_trial_fold"]
    for fold in folds:
        trial = by_id[fold.data.tags["mlflow.parentRunId"]]
        assert trial.data.tags["code.run_kind"] == "hpo_trial"
        assert fold.data.tags["code.trial_key_hash"] == trial.data.tags["code.trial_key_hash"]
        assert "accuracy" in fold.data.metrics
        # The parent found each fold run its subprocess created (tracker.find).
        assert f"run {fold.info.run_id}" in done.stdout
    sweep = next(r for r in runs if r.data.tags["code.run_kind"] == "hpo_sweep")
    assert sweep.data.tags["best_trial_run_id"] in by_id
    for run in runs:
        assert run.info.run_name in done.stdout  # the printed tree
