"""run.subprocess_env() and Tracker.from_env().attach(), with real subprocesses."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking import RunSpec, Tracker, TrackingError
from trainkit_tracking.testing import TrainkitStore

STUDY = "5eed5eed12345678"

CHILD_SCRIPT = textwrap.dedent(
    """
    import json, sys
    from trainkit_tracking import Tracker
    tracker = Tracker.from_env()
    run = tracker.attach()
    run.log_metrics({"loss": 0.25}, step=3)
    run.log_params({"optim": {"lr": 0.01}})
    run.end()
    key = run.spec.run_key_hash if run.spec is not None else None
    print(json.dumps({"id": run.id, "name": run.name, "parent": run.parent_id, "key": key}))
    """
)


def run_child(env: dict[str, str]) -> dict[str, str]:
    import json

    result = subprocess.run(
        [sys.executable, "-c", CHILD_SCRIPT], env=env, capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def trial_spec() -> RunSpec:
    return RunSpec(
        kind="hpo_trial",
        model="distilbert",
        environment="local",
        study_key_hash=STUDY,
        trial_number=2,
        trial_key_hash="tk12345678",
    )


def test_join_mode_logs_into_the_parents_run(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    run = tracker.start_run(trial_spec())
    before = dict(os.environ)
    env = run.subprocess_env()
    assert dict(os.environ) == before  # never writes the caller's environment
    assert env["MLFLOW_RUN_ID"] == env["TRAINKIT_RUN_ID"] == run.id
    assert env["MLFLOW_EXPERIMENT_ID"] == tracker.experiment_id
    assert env["MLFLOW_EXPERIMENT_NAME"] == "exp"
    assert env["MLFLOW_TRACKING_URI"] == trainkit_store.uri
    child = run_child(env)
    assert child["id"] == run.id
    assert child["key"] == trial_spec().run_key_hash  # the joined run knows its exact spec
    client = MlflowClient(trainkit_store.uri)
    assert client.get_run(run.id).info.status == "RUNNING"  # the owner ends it, not the child
    run.end()
    data = client.get_run(run.id).data
    assert data.metrics["loss"] == 0.25
    assert data.params["optim.lr"] == "0.01"
    assert client.get_run(run.id).info.status == "FINISHED"


def test_child_mode_creates_the_child_in_the_subprocess(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    trial = tracker.start_run(trial_spec())
    fold_spec = trial_spec().child("hpo_trial_fold", fold_idx=3)
    env = trial.subprocess_env(child=fold_spec)
    assert "MLFLOW_RUN_ID" not in env and "TRAINKIT_RUN_ID" not in env
    assert env["TRAINKIT_PARENT_RUN_ID"] == trial.id
    assert RunSpec.model_validate_json(env["TRAINKIT_RUN_SPEC"]) == fold_spec
    child = run_child(env)
    assert child["parent"] == trial.id
    assert child["name"] == f"t02 fold3 distilbert study-{STUDY[:8]}"
    info = MlflowClient(trainkit_store.uri).get_run(child["id"])
    assert info.info.status == "FINISHED"
    assert info.info.experiment_id == tracker.experiment_id
    assert info.data.tags["code.hpo.fold_idx"] == "3"
    # The same tree as creating the child in-process.
    in_process = trial.child("hpo_trial_fold", fold_idx=3)
    local_tags = MlflowClient(trainkit_store.uri).get_run(in_process.id).data.tags
    for key in ("code.run_key_hash", "code.run_kind", "mlflow.parentRunId", "code.run_name"):
        assert local_tags[key] == info.data.tags[key]
    in_process.end()
    trial.end()


def test_mlflow_run_name_names_only_the_attached_child(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    trial = tracker.start_run(trial_spec())
    env = trial.subprocess_env(child=trial_spec().child("hpo_trial_fold", fold_idx=0))
    env["MLFLOW_RUN_NAME"] = "custom-fold-name"
    assert run_child(env)["name"] == "custom-fold-name"
    trial.end()


def test_stale_variables_are_dropped(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    run = tracker.start_run(trial_spec())
    base = {
        "PATH": os.environ["PATH"],
        "MLFLOW_RUN_ID": "f" * 32,
        "MLFLOW_PARENT_RUN_ID": "e" * 32,
        "MLFLOW_RUN_NAME": "stale",
        "MLFLOW_TRIAL_NUMBER": "9",
        "MLFLOW_FOLD_IDX": "9",
        "TRAINKIT_RUN_SPEC": "{}",
        "KEEP_ME": "1",
    }
    env = run.subprocess_env(base)
    assert env["MLFLOW_RUN_ID"] == run.id
    for key in (
        "MLFLOW_PARENT_RUN_ID",
        "MLFLOW_RUN_NAME",
        "MLFLOW_TRIAL_NUMBER",
        "MLFLOW_FOLD_IDX",
    ):
        assert key not in env
    assert "TRAINKIT_RUN_SPEC" not in env
    assert env["KEEP_ME"] == "1"
    assert set(env) - set(base) <= {
        "TRAINKIT_RUN_ID",
        "MLFLOW_TRACKING_URI",
        "MLFLOW_EXPERIMENT_NAME",
        "MLFLOW_EXPERIMENT_ID",
        "TRAINKIT_SPOOL_DIR",
        "TRAINKIT_NAMING_POLICY",  # the child names runs as the parent's tracker does
    }
    assert env["TRAINKIT_NAMING_POLICY"] == "default"
    assert base["MLFLOW_RUN_ID"] == "f" * 32  # the given mapping is not modified
    run.end()


def test_seed_pipeline_variables_create_trial_and_fold(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("exp")
    sweep = tracker.start_run(
        RunSpec(
            kind="hpo_sweep", model="deberta-v3/base", environment="local", study_key_hash=STUDY
        )
    )
    base = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_RUN", "TRAINKIT_R"))}
    env = dict(base, MLFLOW_TRACKING_URI=trainkit_store.uri, MLFLOW_EXPERIMENT_NAME="exp")
    env.update(MLFLOW_PARENT_RUN_ID=sweep.id, MLFLOW_TRIAL_NUMBER="4")
    trial = run_child(env)
    assert trial["parent"] == sweep.id
    assert trial["name"] == f"t04_1 deberta_v3_base study-{STUDY[:8]}"
    env.update(MLFLOW_PARENT_RUN_ID=trial["id"], MLFLOW_FOLD_IDX="1")
    del env["MLFLOW_TRIAL_NUMBER"]
    fold = run_child(env)
    assert fold["parent"] == trial["id"]
    assert fold["name"] == f"t04 fold1 deberta_v3_base study-{STUDY[:8]}"
    tags = MlflowClient(trainkit_store.uri).get_run(fold["id"]).data.tags
    assert tags["code.model"] == "deberta-v3/base"
    assert tags["code.study_key_hash"] == STUDY
    sweep.end()


def test_attach_with_nothing_handed_over_is_a_clear_error(trainkit_store: TrainkitStore) -> None:
    with pytest.raises(TrackingError, match="nothing to attach to"):
        Tracker("exp").attach()
