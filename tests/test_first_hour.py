"""What a new user meets first: clear errors from lineage(), notebook displays, doctor and tree
on a misspelt experiment, and the public helpers the docs use."""

from __future__ import annotations

import re
import subprocess
import sys
from typing import Any

import pytest
from click.testing import CliRunner
from pydantic import ValidationError

import trainkit_tracking
from trainkit_tracking import RunSpec, Tracker, TrackingError, training_id
from trainkit_tracking.cli import cli
from trainkit_tracking.testing import TrainkitStore

STUDY = "350a79aa9c1e4b2f"


def sweep_spec() -> RunSpec:
    return RunSpec(kind="hpo_sweep", model="distilbert", environment="local", study_key_hash=STUDY)


# lineage() --------------------------------------------------------------------------


def test_lineage_of_an_unknown_run_id_says_so(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("lineage-errors")
    unknown = "0" * 32
    with pytest.raises(TrackingError, match=f"run '{unknown}' is not in the store") as caught:
        tracker.lineage(unknown)
    assert type(caught.value) is TrackingError  # not mlflow's MlflowException
    with pytest.raises(TrackingError, match="lineage\\(\\) needs a run id"):
        tracker.lineage("not-an-id")


def test_lineage_of_a_sweep_without_best_trial_says_so(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("lineage-errors")
    with tracker.start_run(sweep_spec()) as sweep:
        sweep.child("hpo_trial", trial_number=0).end()
    with pytest.raises(TrackingError, match="has no best trial") as caught:
        tracker.lineage(sweep.id)
    assert sweep.id in str(caught.value)


def test_lineage_of_a_sweep_whose_best_trial_is_gone(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("lineage-errors")
    gone = "f" * 32
    with tracker.start_run(sweep_spec()) as sweep:
        sweep.set_tags({"best_trial_run_id": gone})
    with pytest.raises(TrackingError, match=f"the best trial of sweep '{sweep.id}' '{gone}'"):
        tracker.lineage(sweep.id)


def test_lineage_of_another_kind_reads_well(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("lineage-errors")
    with (
        tracker.start_run(sweep_spec()) as sweep,
        sweep.child("hpo_trial", trial_number=1) as trial,
    ):
        fold = trial.child("hpo_trial_fold", fold_idx=0)
        fold.end()
    with pytest.raises(TrackingError, match="is an hpo_trial_fold run"):
        tracker.lineage(fold.id)


def test_messages_say_an_hpo_kind() -> None:
    with pytest.raises(ValidationError, match="an hpo_trial RunSpec needs") as caught:
        RunSpec(kind="hpo_trial", model="m")
    assert "a hpo" not in str(caught.value)
    with pytest.raises(ValidationError, match="a conversion RunSpec needs"):
        RunSpec(kind="conversion", model="m")


# Notebook displays --------------------------------------------------------------------


def test_run_displays_name_status_and_link_in_a_notebook(
    trainkit_server: Any, trainkit_store: TrainkitStore
) -> None:
    tracker = Tracker("repr-html", trainkit_server.uri)
    run = tracker.start_run(
        RunSpec(kind="final_training", model="r&d", environment="local", spec_fp="ab", exec_fp="cd")
    )
    html = run._repr_html_()
    assert "(open)" in html
    assert "final ab v1 r&amp;d" in html and "r&d" not in html  # escaped
    assert f'href="{run.url}"' in html and run.id in html
    run.end()
    assert "(ended)" in run._repr_html_()
    local = Tracker("repr-html").start_run(sweep_spec())
    assert "href" not in local._repr_html_()  # sqlite: no web page to link to
    local.end()


def test_tracker_repr_shows_store_and_experiment_without_setup() -> None:
    tracker = Tracker(
        "my-exp", "https://alice:hunter2@mlflow.example.invalid", environ={"USER": "x"}
    )
    text = repr(tracker)
    assert text == "Tracker(experiment='my-exp', store='https://***@mlflow.example.invalid')"
    assert "hunter2" not in tracker._repr_html_() and "my-exp" in tracker._repr_html_()
    assert tracker._store is None  # nothing was resolved or contacted
    bare = Tracker(environ={})
    assert repr(bare) == "Tracker(experiment='(not set)', store='(resolved on first use)')"


def test_tracker_repr_after_setup_names_the_resolved_store(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("set-up")
    _, experiment_id = tracker.setup()
    assert repr(tracker) == (
        f"Tracker(experiment='set-up (id {experiment_id})', store={trainkit_store.uri!r})"
    )


# doctor and tree on an experiment that does not exist -----------------------------------


def test_doctor_on_a_misspelt_experiment_is_a_problem(trainkit_store: TrainkitStore) -> None:
    Tracker("ner-hpo").setup()
    result = CliRunner().invoke(cli, ["doctor", "-e", "ner-hop"])
    assert result.exit_code == 1, result.output
    assert re.search(r"experiment\s+ner-hop \(does not exist yet\)", result.stdout)
    assert "problem: experiment 'ner-hop' does not exist yet" in result.stdout
    assert "did you mean 'ner-hpo'?" in result.stdout
    assert "no problems found" not in result.stdout


def test_doctor_with_an_experiment_and_no_store_yet(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    fresh = trainkit_store.root / "fresh"
    fresh.mkdir()
    monkeypatch.chdir(fresh)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    result = CliRunner().invoke(cli, ["doctor", "-e", "typo"])
    assert result.exit_code == 1, result.output
    assert "problem: experiment 'typo' does not exist yet" in result.stdout
    assert not (fresh / "mlruns").exists()  # doctor still creates nothing


def test_store_commands_agree_on_a_missing_experiment(trainkit_store: TrainkitStore) -> None:
    Tracker("exists").setup()
    for args in (["doctor"], ["tree"], ["reap", "--older-than", "1h"]):
        result = CliRunner().invoke(cli, [*args, "-e", "missing"])
        assert result.exit_code == 1, (args, result.output)
    assert CliRunner().invoke(cli, ["tree", "-e", "exists"]).exit_code == 0
    assert CliRunner().invoke(cli, ["tree", "--run", "nope"]).exit_code == 2


# Public helpers the docs use ----------------------------------------------------------------


def test_training_id_builds_a_conversion_parent() -> None:
    parent = training_id("ABC123de", "0f9e8d7c", 2)
    assert parent == "spec_ABC123de_exec_0f9e8d7c/v2"
    spec = RunSpec(kind="conversion", model="m", conv_fp="c0ffee", parent_training_id=parent)
    assert spec.parent_training_id == parent
    assert training_id("ab", "cd") == "spec_ab_exec_cd/v1"
    for bad in (("not hex", "cd", 1), ("ab", "cd", 0), ("ab", "cd", True)):
        with pytest.raises(ValueError):
            training_id(*bad)  # type: ignore[arg-type]


def test_study_and_trial_keys_are_public() -> None:
    study = trainkit_tracking.study_key("distilbert", {"lr": [1e-5, 1e-4]}, folds=5)
    assert len(study) == 64
    assert trainkit_tracking.trial_key(study, {"lr": 3e-5}) != trainkit_tracking.trial_key(
        study, {"lr": 1e-5}
    )


def test_sync_and_pending_are_public_and_lazy(tmp_path: object) -> None:
    code = (
        "import sys, trainkit_tracking as t;"
        "assert 'trainkit_tracking._journal.run_logger' not in sys.modules;"
        "from trainkit_tracking import sync, pending;"
        "import pathlib, tempfile; d = pathlib.Path(tempfile.mkdtemp());"
        "assert pending(d) == 0 and sync(d).sent == 0;"
        "print('ok')"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        trainkit_tracking.nope  # noqa: B018
