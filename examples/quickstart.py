"""Quickstart: a k-fold random search, refit and final training, tracked on the local store.

The pipeline shape of a real fine-tuning repo, with scikit-learn instead of a
transformer so that it runs anywhere in seconds:

    hpo_sweep ── hpo_trial ── hpo_trial_fold (x3)     one trial per configuration
             └── hpo_refit                             the best trial, refit on all data
    final_training                                     lineage back to the refit/trial

Run it from any directory: the runs go to ./mlruns/mlflow.db (the embedded store).
"""

from __future__ import annotations

import argparse
import random

from sklearn.datasets import make_classification
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import StratifiedKFold

from trainkit_tracking import RunSpec, Tracker, fingerprint
from trainkit_tracking.cli import render_tree

MODEL = "sklearn/logistic-regression"


def fold_accuracy(c: float, train_x, train_y, test_x, test_y) -> float:  # type: ignore[no-untyped-def]
    model = LogisticRegression(C=c, max_iter=500).fit(train_x, train_y)
    return float(model.score(test_x, test_y))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--experiment", default="quickstart")
    parser.add_argument(
        "--tracking-uri", help="default: ./mlruns/mlflow.db (or MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--folds", type=int, default=3)
    args = parser.parse_args(argv)

    x, y = make_classification(n_samples=300, n_features=12, n_informative=6, random_state=0)
    search_space = {"C": [0.001, 100.0], "scale": "log"}
    rng = random.Random(0)
    configs = [{"C": round(10 ** rng.uniform(-3, 2), 5)} for _ in range(args.trials)]

    tracker = Tracker(args.experiment, args.tracking_uri, project="quickstart")
    study_key_hash = fingerprint(
        {"model": MODEL, "search_space": search_space, "folds": args.folds}
    )
    sweep_spec = RunSpec(
        kind="hpo_sweep", model=MODEL, study_name="C search", study_key_hash=study_key_hash
    )

    results: dict[int, tuple[float, str, dict[str, float]]] = {}
    with tracker.start_run(sweep_spec) as sweep:
        sweep.log_params(
            {"search_space": search_space, "n_trials": args.trials, "folds": args.folds}
        )
        for number, params in enumerate(configs):
            trial_key_hash = fingerprint({"study": study_key_hash, "params": params})
            with sweep.child(
                "hpo_trial", trial_number=number, trial_key_hash=trial_key_hash
            ) as trial:
                trial.log_params(params)
                scores = []
                folds = StratifiedKFold(n_splits=args.folds, shuffle=True, random_state=0)
                for fold_idx, (train, test) in enumerate(folds.split(x, y)):
                    with trial.child("hpo_trial_fold", fold_idx=fold_idx) as fold:
                        score = fold_accuracy(params["C"], x[train], y[train], x[test], y[test])
                        fold.log_metrics({"accuracy": score})
                        scores.append(score)
                mean = sum(scores) / len(scores)
                trial.log_metrics({"accuracy": mean})
                results[number] = (mean, trial.id, params)

        best_number = max(results, key=lambda n: results[n][0])
        best_score, best_trial_id, best_params = results[best_number]
        sweep.set_tags({"best_trial_run_id": best_trial_id, "best_trial_number": str(best_number)})
        sweep.log_metrics({"best_accuracy": best_score})

        with sweep.child(
            "hpo_refit",
            trial_number=best_number,
            trial_key_hash=fingerprint({"study": study_key_hash, "params": best_params}),
        ) as refit:
            model = LogisticRegression(C=best_params["C"], max_iter=500).fit(x, y)
            refit.log_params(best_params)
            refit.log_metrics({"train_accuracy": float(model.score(x, y))})

    final_spec = RunSpec(
        kind="final_training",
        model=MODEL,
        spec_fp=fingerprint({"data": "make_classification", "n_samples": 300}),
        exec_fp=fingerprint(best_params),
        lineage=tracker.lineage(refit.id),
    )
    with tracker.start_run(final_spec) as final:
        model = LogisticRegression(C=best_params["C"], max_iter=500).fit(x, y)
        final.log_params(best_params)
        final.log_metrics({"accuracy": float(model.score(x, y))})
        final.log_dict({"coef": model.coef_.round(4).tolist()}, "model/coefficients.json")

    print(render_tree(tracker.tracking_uri, experiment_id=tracker.experiment_id, metric="accuracy"))
    print(
        f"\nBest trial: t{best_number:02d} (C={best_params['C']}), mean accuracy {best_score:.3f}"
    )
    print(f"Browse the runs:  mlflow ui --backend-store-uri {tracker.tracking_uri}")
    print("(MLflow 3 opens an experiment on its GenAI page: the runs are under 'Model training')")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
