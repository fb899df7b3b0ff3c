"""Optuna trials whose CV folds train in subprocesses, each fold a child run its subprocess creates.

    hpo_sweep ── hpo_trial ── hpo_trial_fold (x folds, one subprocess each)
             └── hpo_refit                     the best trial, refit in this process

The parent hands each fold over with ``trial_run.subprocess_env(child=fold_spec)``; the
subprocess (this script with ``--worker``) calls ``Tracker.from_env().attach()``, which
creates that fold run under the trial and ends it when its ``with`` block ends. The parent
then finds the fold run by its identity: ``tracker.find(fold_spec)``.

Needs the optuna extra: pip install "trainkit-tracking[optuna]". Runs on CPU in seconds:
the "training" is a formula, so that the tracking is what you look at.
"""

from __future__ import annotations

import argparse
import json
import math
import subprocess
import sys
from typing import Any

MODEL = "toy/mlp"


def fold_score(params: dict[str, Any], fold_idx: int) -> float:
    """A stand-in for training one fold: best near lr=1e-3, slightly different per fold."""
    distance = abs(math.log10(params["learning_rate"]) + 3.0)
    return round(0.9 - 0.1 * distance - 0.01 * fold_idx, 4)


def worker(params_json: str) -> int:
    """In the subprocess: create the handed-over fold run, train, log, print the score."""
    from trainkit_tracking import Tracker

    params = json.loads(params_json)
    with Tracker.from_env().attach() as fold_run:  # creates the fold under the trial
        assert fold_run.spec is not None and fold_run.spec.fold_idx is not None
        score = fold_score(params, fold_run.spec.fold_idx)
        for step in range(3):
            fold_run.log_metrics({"loss": (1.0 - score) / (step + 1)}, step=step)
        fold_run.log_metric("accuracy", score)
    print(json.dumps({"accuracy": score}))  # what the parent reads back
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="optuna-subprocess-example")
    parser.add_argument(
        "--tracking-uri", help="default: ./mlruns/mlflow.db (or MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--trials", type=int, default=3)
    parser.add_argument("--folds", type=int, default=2)
    parser.add_argument("--worker", metavar="PARAMS_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        return worker(args.worker)

    import optuna
    from optuna.distributions import FloatDistribution

    from trainkit_tracking import Run, Tracker
    from trainkit_tracking.cli import render_tree
    from trainkit_tracking.integrations.optuna import TrackedStudy

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    tracker = Tracker(args.experiment, args.tracking_uri, project="optuna-subprocess")
    space = {"learning_rate": FloatDistribution(1e-5, 1e-1, log=True)}

    def objective(trial: optuna.Trial, trial_run: Run) -> float:
        assert trial_run.spec is not None
        scores = []
        for fold_idx in range(args.folds):
            fold_spec = trial_run.spec.child("hpo_trial_fold", fold_idx=fold_idx)
            done = subprocess.run(
                [sys.executable, __file__, "--worker", json.dumps(trial.params)],
                env=trial_run.subprocess_env(child=fold_spec),  # child mode
                capture_output=True,
                text=True,
                check=True,
            )
            scores.append(json.loads(done.stdout.splitlines()[-1])["accuracy"])
            # The fold run the subprocess created, found by its identity (newest first).
            fold_run_id = tracker.find(fold_spec)[0]
            print(f"trial {trial.number} fold {fold_idx}: run {fold_run_id}")
        return sum(scores) / len(scores)

    study = optuna.create_study(
        study_name="lr search", direction="maximize", sampler=optuna.samplers.TPESampler(seed=0)
    )
    with TrackedStudy(
        tracker,
        study,
        model=MODEL,
        search_space=space,
        metric="accuracy",
        study_settings={"folds": args.folds},
    ) as tracked:
        tracked.optimize(objective, n_trials=args.trials)
        with tracked.start_refit() as refit_run:
            refit_run.log_metric("accuracy", fold_score(study.best_params, 0))
        sweep_id = tracked.sweep_run.id

    print(render_tree(tracker.tracking_uri, run_id=sweep_id))
    print(f"best trial: {study.best_trial.number}, accuracy {study.best_value:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
