"""Benchmark: creating an HPO run tree (1 sweep, 20 trials x 5 folds) via the Tracker vs raw MLflow.

The raw side calls ``MlflowClient.create_run`` with the same tags (as built by
``TagSet.for_spec``) and the parent id; the Tracker side also names every run by the
policy and claims a version for the 21 versioned runs (sweep and trials).

    python bench/bench_tree.py [--quick]
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")


def _tree_ours(uri: str, spool: Path, trials: int, folds: int) -> float:
    from trainkit_tracking import RunSpec, Tracker

    tracker = Tracker(f"tree-ours-{uuid.uuid4().hex[:8]}", uri, spool_dir=spool)
    tracker.setup()
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
    runs = []
    start = time.perf_counter()
    sweep = tracker.start_run(spec)
    runs.append(sweep)
    for number in range(trials):
        trial = sweep.child("hpo_trial", trial_number=number)
        runs.append(trial)
        for fold in range(folds):
            runs.append(trial.child("hpo_trial_fold", fold_idx=fold))
    elapsed = time.perf_counter() - start
    for run in reversed(runs):
        run.end(timeout=60)
    return elapsed


def _tree_raw(uri: str, trials: int, folds: int) -> float:
    from mlflow.tracking import MlflowClient

    from trainkit_tracking import RunSpec, TagSet

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"tree-raw-{uuid.uuid4().hex[:8]}")
    sweep_spec = RunSpec(
        kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234"
    )
    start = time.perf_counter()
    sweep = client.create_run(experiment, tags=dict(TagSet.for_spec(sweep_spec)), run_name="s")
    for number in range(trials):
        trial_spec = sweep_spec.child("hpo_trial", trial_number=number)
        trial_tags = dict(TagSet.for_spec(trial_spec), **{"mlflow.parentRunId": sweep.info.run_id})
        trial = client.create_run(experiment, tags=trial_tags, run_name=f"t{number}")
        for fold in range(folds):
            fold_spec = trial_spec.child("hpo_trial_fold", fold_idx=fold)
            fold_tags = dict(
                TagSet.for_spec(fold_spec), **{"mlflow.parentRunId": trial.info.run_id}
            )
            client.create_run(experiment, tags=fold_tags, run_name=f"t{number}f{fold}")
    return time.perf_counter() - start


def bench_tree(
    uri: str, spool: Path, *, trials: int = 20, folds: int = 5, rounds: int = 3
) -> tuple[float, float]:
    """Median seconds to create the tree: (trainkit-tracking, raw MLflow), alternating turns."""
    ours, raw = [], []
    for _ in range(rounds):
        raw.append(_tree_raw(uri, trials, folds))
        ours.append(_tree_ours(uri, spool, trials, folds))
    return statistics.median(ours), statistics.median(raw)


def main(argv: list[str] | None = None) -> int:
    import argparse
    import tempfile

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small round (CI smoke)")
    parser.add_argument("--tracking-uri", help="an existing store (default: a fresh sqlite file)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="trainkit-bench-tree-") as tmp:
        uri = args.tracking_uri or f"sqlite:///{tmp}/mlflow.db"
        trials, folds, rounds = (3, 2, 1) if args.quick else (20, 5, 3)
        ours, raw = bench_tree(uri, Path(tmp) / "spool", trials=trials, folds=folds, rounds=rounds)
    runs = 1 + trials + trials * folds
    print("| benchmark | trainkit-tracking | raw MLflow | ratio |")
    print("|---|---|---|---|")
    print(f"| create HPO tree ({runs} runs) | {ours:.2f} s | {raw:.2f} s | {ours / raw:.2f}x raw |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
