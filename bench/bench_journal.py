"""Benchmark: what the journal costs where a user waits for it, side by side with raw MLflow.

- flush latency: log one point and ``run.flush()`` (the sender process users get, warm),
  next to a synchronous ``MlflowClient.log_metric``;
- a 41-run HPO tree (1 sweep, 8 trials x 4 folds): start, log one point, end each run,
  next to raw ``create_run`` + ``log_metric`` + ``set_terminated``;

on a sqlite file and on an ``mlflow server``. Ratios are medians of alternating rounds.

    python bench/bench_journal.py [--quick] [--no-server]
"""

from __future__ import annotations

import contextlib
import os
import shutil
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ["TRAINKIT_SENDER"] = "process"  # the default users get

SPEC_ARGS = {"kind": "hpo_sweep", "model": "bert", "environment": "local"}


def _flush_ours(uri: str, spool: Path, points: int) -> list[float]:
    from trainkit_tracking import RunSpec, Tracker

    tracker = Tracker(f"flush-{uuid.uuid4().hex[:8]}", uri, spool_dir=spool)
    run = tracker.start_run(RunSpec(study_key_hash=uuid.uuid4().hex[:8], **SPEC_ARGS))
    run.log_metric("warm", 1.0)
    assert run.flush(120)  # the sender is up and the run's file known
    out = []
    for step in range(points):
        start = time.perf_counter()
        run.log_metric("loss", float(step), step=step)
        assert run.flush(60)
        out.append(time.perf_counter() - start)
    run.end()
    return out


def _flush_raw(uri: str, points: int) -> list[float]:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"flush-raw-{uuid.uuid4().hex[:8]}")
    run_id = client.create_run(experiment).info.run_id
    client.log_metric(run_id, "warm", 1.0)
    out = []
    for step in range(points):
        start = time.perf_counter()
        client.log_metric(run_id, "loss", float(step), step=step)
        out.append(time.perf_counter() - start)
    client.set_terminated(run_id)
    return out


def _tree_ours(uri: str, spool: Path, trials: int, folds: int) -> float:
    from trainkit_tracking import RunSpec, Tracker

    tracker = Tracker(f"tree-{uuid.uuid4().hex[:8]}", uri, spool_dir=spool)
    tracker.setup()
    warm = tracker.start_run(RunSpec(study_key_hash="00000000", **SPEC_ARGS))
    warm.log_metric("warm", 1.0)
    warm.end()  # the sender is up
    start = time.perf_counter()
    with tracker.start_run(RunSpec(study_key_hash="abcd1234", **SPEC_ARGS)) as sweep:
        sweep.log_metric("best", 1.0)
        for number in range(trials):
            with sweep.child("hpo_trial", trial_number=number) as trial:
                trial.log_metric("score", 1.0)
                for fold in range(folds):
                    with trial.child("hpo_trial_fold", fold_idx=fold) as run:
                        run.log_metric("score", float(fold))
    return time.perf_counter() - start


def _tree_raw(uri: str, trials: int, folds: int) -> float:
    from mlflow.tracking import MlflowClient

    from trainkit_tracking import RunSpec, TagSet

    client = MlflowClient(uri)
    experiment = client.create_experiment(f"tree-raw-{uuid.uuid4().hex[:8]}")
    spec = RunSpec(study_key_hash="abcd1234", **SPEC_ARGS)

    def run(tags: dict[str, str], name: str, parent: str | None) -> str:
        if parent is not None:
            tags = {**tags, "mlflow.parentRunId": parent}
        return str(client.create_run(experiment, tags=tags, run_name=name).info.run_id)

    start = time.perf_counter()
    sweep = run(dict(TagSet.for_spec(spec)), "sweep", None)
    client.log_metric(sweep, "best", 1.0)
    for number in range(trials):
        trial_spec = spec.child("hpo_trial", trial_number=number)
        trial = run(dict(TagSet.for_spec(trial_spec)), f"t{number}", sweep)
        client.log_metric(trial, "score", 1.0)
        for fold in range(folds):
            fold_spec = trial_spec.child("hpo_trial_fold", fold_idx=fold)
            fold_id = run(dict(TagSet.for_spec(fold_spec)), f"t{number}f{fold}", trial)
            client.log_metric(fold_id, "score", float(fold))
            client.set_terminated(fold_id)
        client.set_terminated(trial)
    client.set_terminated(sweep)
    return time.perf_counter() - start


def bench(uri: str, spool: Path, *, rounds: int, points: int, trials: int, folds: int) -> dict:
    flush_ours: list[float] = []
    flush_raw: list[float] = []
    tree_ours: list[float] = []
    tree_raw: list[float] = []
    for _ in range(rounds):
        flush_raw += _flush_raw(uri, points)
        flush_ours += _flush_ours(uri, spool, points)
        tree_raw.append(_tree_raw(uri, trials, folds))
        tree_ours.append(_tree_ours(uri, spool, trials, folds))
    return {
        "flush": (statistics.median(flush_ours), statistics.median(flush_raw)),
        "tree": (statistics.median(tree_ours), statistics.median(tree_raw)),
    }


def _stop_senders(spool: Path) -> None:
    import signal

    from trainkit_tracking._journal.sender_launch import senders

    for sender in senders(spool):
        pid = sender.get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGTERM)


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one small round (CI smoke)")
    parser.add_argument("--no-server", action="store_true", help="sqlite only")
    args = parser.parse_args(argv)
    rounds, points, trials, folds = (1, 10, 2, 2) if args.quick else (3, 50, 8, 4)
    runs = 1 + trials + trials * folds
    tmp = Path(tempfile.mkdtemp(prefix="trainkit-bench-journal-"))
    results = {}
    try:
        results["sqlite"] = bench(
            f"sqlite:///{tmp}/mlflow.db",
            tmp / "spool",
            rounds=rounds,
            points=points,
            trials=trials,
            folds=folds,
        )
        if not args.no_server:
            from trainkit_tracking.testing import MlflowServer, migrated_sqlite_template

            template = migrated_sqlite_template(tmp / "template")
            shutil.copyfile(template, tmp / "server.db")
            with MlflowServer(f"sqlite:///{tmp}/server.db", tmp / "artifacts") as server:
                results["server"] = bench(
                    server.uri,
                    tmp / "spool-server",
                    rounds=rounds,
                    points=points,
                    trials=trials,
                    folds=folds,
                )
    finally:
        _stop_senders(tmp / "spool")
        _stop_senders(tmp / "spool-server")
        shutil.rmtree(tmp, ignore_errors=True)
    print("| store | what | trainkit-tracking | raw MLflow | ratio |")
    print("|---|---|---|---|---|")
    for store, result in results.items():
        ours, raw = result["flush"]
        print(
            f"| {store} | flush of one point (median) | {ours * 1000:.1f} ms "
            f"| {raw * 1000:.1f} ms (sync log_metric) | {(ours - raw) * 1000:+.1f} ms |"
        )
        ours, raw = result["tree"]
        print(
            f"| {store} | HPO tree, {runs} runs (start, log, end) | {ours:.2f} s "
            f"| {raw:.2f} s | {ours / raw:.2f}x raw |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
