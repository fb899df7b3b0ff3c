"""push into a store that already has the names (SPEC section 18): versioned runs get a
version claimed in the target, their offline name kept; the lineage description links the
target's runs."""

from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from trainkit_tracking import RunSpec, Tracker, push
from trainkit_tracking.testing import TrainkitStore

STUDY = "350a79aa0000ffff"


@pytest.fixture
def target(trainkit_sqlite_template: Path, tmp_path: Path) -> str:
    db = tmp_path / "target" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(trainkit_sqlite_template, db)
    return f"sqlite:///{db}"


def spec(kind: str, **fields: Any) -> RunSpec:
    return RunSpec(kind=kind, model="distilbert", environment="local", **fields)


def sweep_with_trials(uri: str, numbers: tuple[int, ...] = (0, 1)) -> dict[str, str]:
    tracker = Tracker("exp", uri)
    ids: dict[str, str] = {}
    with tracker.start_run(spec("hpo_sweep", study_key_hash=STUDY)) as sweep:
        ids["sweep"] = sweep.id
        for number in numbers:
            with sweep.child("hpo_trial", trial_number=number) as trial:
                ids[f"trial{number}"] = trial.id
                with trial.child("hpo_trial_fold", fold_idx=0) as fold:
                    ids[f"fold{number}"] = fold.id
    return ids


def runs_by_origin(uri: str) -> dict[str, Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    runs = client.search_runs([exp.experiment_id])
    return {run.data.tags.get("code.pushed_from", "here:").split(":")[1]: run for run in runs}


def versioned_names(uri: str) -> list[str]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("exp")
    runs = client.search_runs([exp.experiment_id], "tags.`code.version` LIKE '%'")
    return [run.info.run_name for run in runs]


def test_pushed_runs_get_versions_claimed_in_the_target(
    trainkit_store: TrainkitStore, target: str
) -> None:
    sweep_with_trials(target, (0,))  # the target already has sweep_1 and t00_1
    ids = sweep_with_trials(trainkit_store.uri)  # offline: sweep_1, t00_1, t01_1 again
    assert (
        MlflowClient(trainkit_store.uri).get_run(ids["sweep"]).info.run_name.startswith("sweep_1 ")
    )
    push(trainkit_store.uri, target)
    copies = runs_by_origin(target)
    sweep, trial0, trial1 = (copies[ids[k]] for k in ("sweep", "trial0", "trial1"))
    assert sweep.info.run_name == "sweep_2 350a79aa distilbert"
    assert sweep.data.tags["code.offline_name"] == "sweep_1 350a79aa distilbert"
    assert sweep.data.tags["code.version"] == "2"
    assert sweep.data.tags["mlflow.runName"] == sweep.data.tags["code.run_name"] == "sweep_2 350a79aa distilbert"  # fmt: skip
    assert trial0.info.run_name == "t00_2 distilbert study-350a79aa"
    assert trial0.data.tags["code.offline_name"] == "t00_1 distilbert study-350a79aa"
    # A name the target did not have yet: claimed there all the same, the same number here.
    assert trial1.info.run_name == "t01_1 distilbert study-350a79aa"
    assert trial1.data.tags["code.offline_name"] == trial1.info.run_name
    # Folds are named by their identity, never versioned: their names are kept as they are.
    assert copies[ids["fold0"]].info.run_name == "t00 fold0 distilbert study-350a79aa"
    assert "code.offline_name" not in copies[ids["fold0"]].data.tags
    names = versioned_names(target)
    assert len(names) == len(set(names)) == 5, Counter(names)

    # Pushing again renames nothing and creates nothing.
    again = push(trainkit_store.uri, target)
    assert {r.action for r in again.runs} == {"unchanged"}
    assert runs_by_origin(target)[ids["sweep"]].info.run_name == "sweep_2 350a79aa distilbert"
    # Runs made in the target later take the next free number: the push's was claimed.
    with Tracker("exp", target).start_run(spec("hpo_sweep", study_key_hash=STUDY)) as later:
        assert later.name == "sweep_3 350a79aa distilbert"
    # The source keeps its names.
    source = MlflowClient(trainkit_store.uri).get_run(ids["sweep"])
    assert source.info.run_name == "sweep_1 350a79aa distilbert"


def test_seed_names_are_renumbered_at_their_end(
    trainkit_store: TrainkitStore, target: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINKIT_NAMING_POLICY", "seed")
    sweep_with_trials(target, (0,))
    ids = sweep_with_trials(trainkit_store.uri, (0,))
    push(trainkit_store.uri, target)
    copies = runs_by_origin(target)
    assert copies[ids["sweep"]].info.run_name == "local_distilbert_hpo_study-350a79aa_2"
    assert copies[ids["trial0"]].info.run_name == "local_distilbert_hpo_trial_study-350a79aa_t00_2"
    assert copies[ids["trial0"]].data.tags["code.offline_name"].endswith("_t00_1")


def test_a_dry_run_claims_nothing(trainkit_store: TrainkitStore, target: str) -> None:
    sweep_with_trials(target, (0,))
    sweep_with_trials(trainkit_store.uri, (0,))
    push(trainkit_store.uri, target, dry_run=True)
    with Tracker("exp", target).start_run(spec("hpo_sweep", study_key_hash=STUDY)) as later:
        assert later.name == "sweep_2 350a79aa distilbert"


def test_pushed_lineage_description_names_the_target_runs(
    trainkit_store: TrainkitStore, target: str
) -> None:
    sweep_with_trials(target, (0,))
    tracker = Tracker("exp", trainkit_store.uri)
    ids = sweep_with_trials(trainkit_store.uri, (0,))
    final_spec = spec("final_training", lineage=tracker.lineage(ids["trial0"]))
    with tracker.start_run(final_spec) as final:
        pass
    push(trainkit_store.uri, target)
    copies = runs_by_origin(target)
    note = copies[final.id].data.tags["mlflow.note.content"]
    trial = copies[ids["trial0"]]
    assert f"- trial: `{trial.info.run_name}`, run id `{trial.info.run_id}`" in note
    assert ids["trial0"] not in note and "t00_2 " in note
