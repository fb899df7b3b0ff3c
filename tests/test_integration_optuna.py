"""TrackedStudy against a real store: the sweep/trial/fold tree, statuses, best trial, hashes."""

from __future__ import annotations

from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking import Run, Tracker, fingerprint
from trainkit_tracking._core.fingerprint import study_key, trial_key
from trainkit_tracking.testing import TrainkitStore

optuna = pytest.importorskip("optuna")

from optuna.distributions import (  # noqa: E402
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from trainkit_tracking.integrations.optuna import (  # noqa: E402
    RUN_ID_ATTR,
    TrackedStudy,
    search_space_description,
)

optuna.logging.set_verbosity(optuna.logging.WARNING)

SPACE = {
    "lr": FloatDistribution(1e-4, 1e-1, log=True),
    "layers": IntDistribution(1, 4),
    "opt": CategoricalDistribution(["adam", "sgd"]),
}


def runs_by_id(uri: str, experiment: str) -> dict[str, Any]:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    return {r.info.run_id: r for r in client.search_runs([exp.experiment_id], max_results=1000)}


def kfold_objective(trial: Any, trial_run: Run) -> float:
    lr = trial.suggest_float("lr", 1e-4, 1e-1, log=True)  # the same value as pre-sampled
    scores = []
    for k in range(2):
        with trial_run.child("hpo_trial_fold", fold_idx=k) as fold_run:
            score = lr * 10 + k
            fold_run.log_metric("f1", score)
            scores.append(score)
    mean = sum(scores) / len(scores)
    trial_run.log_metric("f1_mean", mean)
    return mean


def test_sweep_trials_folds_and_best(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("hpo")
    study = optuna.create_study(
        study_name="ner sweep", direction="maximize", sampler=optuna.samplers.RandomSampler(seed=1)
    )
    with TrackedStudy(
        tracker, study, model="distilbert", search_space=SPACE, metric="f1", environment="local"
    ) as tracked:
        best = tracked.optimize(kfold_objective, n_trials=3)
        refit = tracked.start_refit()
        refit.end()
    assert best is not None and best.number == study.best_trial.number

    runs = runs_by_id(trainkit_store.uri, "hpo")
    sweep_id = tracked.sweep_run.id
    sweep = runs[sweep_id]
    expected_study = study_key("distilbert", search_space_description(SPACE))
    assert tracked.study_key_hash == expected_study
    assert sweep.data.tags["code.run_kind"] == "hpo_sweep"
    assert sweep.data.tags["code.study_key_hash"] == expected_study
    assert sweep.info.run_name.startswith("sweep_1 ") and "_nersweep " in sweep.info.run_name
    assert sweep.info.status == "FINISHED"
    assert sweep.data.params["search_space.opt"] == '{"choices": ["adam", "sgd"]}'

    trials = [r for r in runs.values() if r.data.tags["code.run_kind"] == "hpo_trial"]
    folds = [r for r in runs.values() if r.data.tags["code.run_kind"] == "hpo_trial_fold"]
    refits = [r for r in runs.values() if r.data.tags["code.run_kind"] == "hpo_refit"]
    assert len(runs) == 1 + 3 + 6 + 1
    assert len(trials) == 3 and len(folds) == 6 and len(refits) == 1
    by_number = {int(t.data.tags["code.hpo.trial_number"]): t for t in trials}
    assert sorted(by_number) == [0, 1, 2]
    for frozen in study.trials:
        trial_run = by_number[frozen.number]
        assert frozen.user_attrs[RUN_ID_ATTR] == trial_run.info.run_id
        assert trial_run.data.tags["mlflow.parentRunId"] == sweep_id
        assert trial_run.info.status == "FINISHED"
        assert trial_run.data.params == {k: str(v) for k, v in frozen.params.items()}
        assert trial_run.data.tags["code.trial_key_hash"] == trial_key(
            expected_study, frozen.params
        )
        assert trial_run.data.metrics["f1"] == pytest.approx(frozen.value)
        children = [f for f in folds if f.data.tags["mlflow.parentRunId"] == trial_run.info.run_id]
        assert sorted(f.data.tags["code.hpo.fold_idx"] for f in children) == ["0", "1"]
        for fold in children:  # folds inherit the trial's identity
            assert (
                fold.data.tags["code.trial_key_hash"] == trial_run.data.tags["code.trial_key_hash"]
            )
            assert fold.data.tags["code.hpo.trial_number"] == str(frozen.number)

    best_run = by_number[study.best_trial.number]
    assert sweep.data.tags["best_trial_run_id"] == best_run.info.run_id
    assert sweep.data.tags["best_trial_number"] == str(study.best_trial.number)
    assert sweep.data.metrics["best_f1"] == pytest.approx(study.best_value)
    refit_run = refits[0]
    assert refit_run.data.tags["mlflow.parentRunId"] == sweep_id
    assert refit_run.data.tags["code.hpo.trial_number"] == str(study.best_trial.number)
    assert refit_run.data.tags["code.trial_key_hash"] == best_run.data.tags["code.trial_key_hash"]

    # The core's lineage reads the sweep's best-trial tag and the refit's trial.
    lineage = tracker.lineage(sweep_id)
    assert lineage.hpo_trial_run_id == best_run.info.run_id
    assert lineage.hpo_trial_key_hash == best_run.data.tags["code.trial_key_hash"]
    refit_lineage = tracker.lineage(refit_run.info.run_id)
    assert refit_lineage.hpo_trial_run_id == best_run.info.run_id
    assert refit_lineage.hpo_sweep_run_id == sweep_id


def test_pruned_and_failed_trials_map_to_statuses(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("hpo")
    study = optuna.create_study(direction="minimize")

    def objective(trial: Any, trial_run: Run) -> float:
        if trial.number == 1:
            trial.report(1.0, step=0)
            raise optuna.TrialPruned()
        if trial.number == 2:
            raise RuntimeError("boom")
        if trial.number == 3:
            return float("nan")
        return 0.5

    with TrackedStudy(tracker, study, model="m", search_space=SPACE, environment="local") as ts:
        ts.optimize(objective, n_trials=4, catch=(RuntimeError,))
    states = {t.number: t.state for t in study.trials}
    assert states == {
        0: optuna.trial.TrialState.COMPLETE,
        1: optuna.trial.TrialState.PRUNED,
        2: optuna.trial.TrialState.FAIL,
        3: optuna.trial.TrialState.FAIL,
    }
    runs = runs_by_id(trainkit_store.uri, "hpo")
    trials = {
        int(r.data.tags["code.hpo.trial_number"]): r
        for r in runs.values()
        if r.data.tags["code.run_kind"] == "hpo_trial"
    }
    assert {n: r.info.status for n, r in trials.items()} == {
        0: "FINISHED",
        1: "KILLED",
        2: "FAILED",
        3: "FAILED",
    }
    assert trials[1].data.tags["code.pruned"] == "true"
    assert "code.pruned" not in trials[0].data.tags
    assert trials[0].data.metrics == {"value": 0.5}
    assert "value" not in trials[3].data.metrics
    sweep = runs[ts.sweep_run.id]
    assert sweep.data.tags["best_trial_number"] == "0"
    assert sweep.data.metrics["best_value"] == 0.5


def test_an_uncaught_error_fails_trial_and_sweep(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("hpo")
    study = optuna.create_study()

    def objective(trial: Any, trial_run: Run) -> float:
        raise ValueError("bad data")

    with (
        pytest.raises(ValueError, match="bad data"),
        TrackedStudy(tracker, study, model="m", search_space=SPACE, environment="local") as ts,
    ):
        ts.optimize(objective, n_trials=1)
    statuses = {
        r.data.tags["code.run_kind"]: r.info.status
        for r in runs_by_id(trainkit_store.uri, "hpo").values()
    }
    assert statuses == {"hpo_sweep": "FAILED", "hpo_trial": "FAILED"}


def test_threads_keep_the_tree(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("hpo")
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.RandomSampler(0))
    with TrackedStudy(tracker, study, model="m", search_space=SPACE, environment="local") as ts:
        ts.optimize(kfold_objective, n_trials=6, n_jobs=3)
    runs = runs_by_id(trainkit_store.uri, "hpo")
    sweep_id = ts.sweep_run.id
    trials = {
        r.info.run_id: r for r in runs.values() if r.data.tags["code.run_kind"] == "hpo_trial"
    }
    folds = [r for r in runs.values() if r.data.tags["code.run_kind"] == "hpo_trial_fold"]
    assert len(trials) == 6 and len(folds) == 12
    assert all(t.data.tags["mlflow.parentRunId"] == sweep_id for t in trials.values())
    for fold in folds:
        parent = trials[fold.data.tags["mlflow.parentRunId"]]
        assert fold.data.tags["code.hpo.trial_number"] == parent.data.tags["code.hpo.trial_number"]
    # Versioned trial names are unique even when created concurrently.
    assert len({t.info.run_name for t in trials.values()}) == 6
    numbers = sorted(int(t.data.tags["code.hpo.trial_number"]) for t in trials.values())
    assert numbers == list(range(6))
    assert {t.info.status for t in trials.values()} == {"FINISHED"}


def test_study_key_depends_on_model_space_and_settings() -> None:
    study = optuna.create_study()
    tracker = Tracker("unused", "sqlite:////nonexistent/never.db")
    a = TrackedStudy(tracker, study, model="m", search_space=SPACE)
    b = TrackedStudy(tracker, study, model="m2", search_space=SPACE)
    c = TrackedStudy(tracker, study, model="m", search_space={"lr": SPACE["lr"]})
    d = TrackedStudy(tracker, study, model="m", search_space=SPACE, study_settings={"folds": 5})
    assert len({a.study_key_hash, b.study_key_hash, c.study_key_hash, d.study_key_hash}) == 4
    assert a.study_key_hash == fingerprint(
        {"model": "m", "search_space": search_space_description(SPACE), "settings": {}}
    )
    assert a.sweep_spec.study_name is None  # Optuna's generated "no-name-..." is not kept
    with pytest.raises(TypeError, match="optuna distribution"):
        TrackedStudy(tracker, study, model="m", search_space={"lr": (0.1, 0.2)})  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("module", "blocked", "extra"),
    [
        ("optuna", "optuna", "optuna"),
        ("transformers", "transformers", "transformers"),
        ("torch", "torch", "torch"),
    ],
)
def test_missing_framework_names_the_extra(module: str, blocked: str, extra: str) -> None:
    import subprocess
    import sys

    # sys.modules[name] = None makes `import name` raise ImportError, as if not installed.
    code = (
        "import sys\n"
        f"sys.modules[{blocked!r}] = None\n"
        "try:\n"
        f"    import trainkit_tracking.integrations.{module}\n"
        "except ImportError as exc:\n"
        "    print(exc)\n"
        "else:\n"
        "    print('imported')\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert f'pip install "trainkit-tracking[{extra}]"' in done.stdout


def test_importing_the_package_loads_no_framework() -> None:
    import subprocess
    import sys

    code = (
        "import sys, trainkit_tracking, trainkit_tracking.integrations\n"
        "print(sorted(m for m in ('torch', 'transformers', 'optuna') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.stdout.strip() == "[]", done.stderr


def test_pruning_reports_and_cv_mean_objective(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("hpo-cv")
    # Prunes every trial whose reported value falls below 0.5 (trial 1 reports 0.2).
    study = optuna.create_study(
        direction="maximize",
        sampler=optuna.samplers.RandomSampler(seed=3),
        pruner=optuna.pruners.ThresholdPruner(lower=0.5),
    )
    fold_scores = {0: [0.7, 0.8, 0.9], 1: [0.2, 0.9, 0.9], 2: [0.6, 0.6, 0.9]}

    def objective(trial: Any, trial_run: Run) -> float:
        assert isinstance(trial, optuna.Trial)
        assert trial.suggest_float("lr", 1e-4, 1e-1, log=True) == trial.params["lr"]
        for k, score in enumerate(fold_scores[trial.number]):
            with trial_run.child("hpo_trial_fold", fold_idx=k) as fold_run:
                fold_run.log_metric("f1", score)
            trial.report(score, step=k)
            with pytest.warns(UserWarning, match="already reported"):
                trial.report(score + 1, step=k)  # Optuna ignores a step reported again; we too
            if trial.should_prune():
                raise optuna.TrialPruned()
        summary: float = trial_run.cv_summary()["cv.f1.mean"]
        return summary

    with TrackedStudy(
        tracker, study, model="m", search_space=SPACE, metric="f1", environment="local"
    ) as ts:
        ts.optimize(objective, n_trials=3)

    assert [t.state for t in study.trials] == [
        optuna.trial.TrialState.COMPLETE,
        optuna.trial.TrialState.PRUNED,
        optuna.trial.TrialState.COMPLETE,
    ]
    assert study.trials[0].value == pytest.approx(0.8)
    runs = runs_by_id(trainkit_store.uri, "hpo-cv")
    trials = {
        int(r.data.tags["code.hpo.trial_number"]): r
        for r in runs.values()
        if r.data.tags["code.run_kind"] == "hpo_trial"
    }
    pruned = trials[1]
    assert pruned.info.status == "KILLED" and pruned.data.tags["code.pruned"] == "true"
    # The folds the pruned trial finished are summarised too.
    assert pruned.data.metrics["cv.n_folds"] == 1.0 and pruned.data.metrics["cv.f1.mean"] == 0.2
    client = MlflowClient(trainkit_store.uri)
    history = client.get_metric_history(trials[0].info.run_id, "intermediate_f1")
    assert sorted((m.step, m.value) for m in history) == [(0, 0.7), (1, 0.8), (2, 0.9)]
    pruned_history = client.get_metric_history(pruned.info.run_id, "intermediate_f1")
    assert [(m.step, m.value) for m in pruned_history] == [(0, 0.2)]
    # The objective returned the CV mean; the trial logs it as the study metric.
    assert trials[2].data.metrics["f1"] == pytest.approx(0.7)
    assert trials[2].data.metrics["cv.f1.mean"] == pytest.approx(0.7)
    sweep = runs[ts.sweep_run.id]
    assert sweep.data.tags["code.hpo.metric"] == "f1"
    assert sweep.data.tags["best_trial_number"] == "0"
    files = {a.path for a in client.list_artifacts(ts.sweep_run.id)}
    assert "leaderboard.csv" in files
