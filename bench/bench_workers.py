"""Sweep + trial creation from 1, 4 and 8 workers on one PostgreSQL-backed mlflow server.

Each worker joins the same sweep with ``start_run(spec, resume=True)`` and creates its
trials under it; raw MLflow does the same with ``MlflowClient.create_run`` (one sweep per
worker, trials with the parent tag), from the same number of processes. Workers are
released together by a file barrier; the time is from release to the last one done.

    python bench/bench_workers.py            # the table of docs/performance.md
    python bench/bench_workers.py --quick    # a smoke run (fewer trials)
    python bench/bench_workers.py --warm     # each worker's sender started before the release

Without ``--warm`` the first trial's end waits for the worker's sender process to start
(a Python process importing mlflow: seconds on a loaded machine), a cost per process,
not per trial.

Needs PostgreSQL binaries (Debian's postgresql package); reports timings, asserts none.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The PostgreSQL cluster manager is the test suite's (tests/pg.py), not the package's.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from pg import PostgresCluster

from trainkit_tracking.testing import MlflowServer

OURS = """
import os, sys, time
from trainkit_tracking import RunSpec, Tracker
uri, barrier, trials, worker = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
tracker = Tracker("workers-bench", uri)
tracker.setup()
spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash=sys.argv[5])
if os.environ.get("BENCH_WARM") == "1":  # the sender process started before the release
    Tracker("workers-bench-warmup", uri).start_run(
        RunSpec(kind="final_training", model="warmup", environment="local")
    ).end()
open(os.path.join(barrier, str(os.getpid())), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):
    time.sleep(0.001)
sweep = tracker.start_run(spec, resume=True)
for number in range(trials):
    sweep.child("hpo_trial", trial_number=worker * 1000 + number).end()
sweep.end()
"""

RAW = """
import os, sys, time
from mlflow.tracking import MlflowClient
uri, barrier, trials = sys.argv[1], sys.argv[2], int(sys.argv[3])
client = MlflowClient(uri)
experiment = client.get_experiment_by_name("workers-bench-raw")
experiment_id = experiment.experiment_id if experiment else client.create_experiment(
    "workers-bench-raw-" + str(os.getpid()))
open(os.path.join(barrier, str(os.getpid())), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):
    time.sleep(0.001)
sweep = client.create_run(experiment_id, run_name="sweep")
for number in range(trials):
    trial = client.create_run(experiment_id, tags={"mlflow.parentRunId": sweep.info.run_id})
    client.set_terminated(trial.info.run_id)
client.set_terminated(sweep.info.run_id)
"""


def release(code: str, args: list[str], workers: int, root: Path) -> float:
    barrier = root / f"barrier-{time.monotonic_ns()}"
    barrier.mkdir()
    study = f"{time.monotonic_ns() % 16**8:08x}"  # one sweep identity for all the workers
    procs = []
    for worker in range(workers):
        extra = [str(worker), study] if code is OURS else []
        command = [sys.executable, "-c", textwrap.dedent(code), args[0], str(barrier)]
        procs.append(
            subprocess.Popen(
                [*command, *args[1:], *extra],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    while len(list(barrier.iterdir())) < workers:
        if any(p.poll() is not None for p in procs):
            raise RuntimeError([p.communicate()[1][-500:] for p in procs])
        time.sleep(0.01)
    started = time.monotonic()
    (barrier / "go").touch()
    for proc in procs:
        _, err = proc.communicate(timeout=900)
        if proc.returncode != 0:
            raise RuntimeError(err[-1000:])
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--warm", action="store_true", help="start each sender before the release")
    args = parser.parse_args()
    if args.warm:
        os.environ["BENCH_WARM"] = "1"
    trials = 5 if args.quick else 20
    root = Path(tempfile.mkdtemp(prefix="trainkit-bench-workers-"))
    with PostgresCluster() as cluster:
        server = MlflowServer(cluster.uri, root / "artifacts").start()
        try:
            print(
                "| workers | trials | trainkit-tracking | trials/s | raw create_run | trials/s | overhead per trial |"
            )
            print("|---|---|---|---|---|---|---|")
            for workers in (1, 4, 8):
                ours = release(OURS, [server.uri, str(trials)], workers, root)
                raw = release(RAW, [server.uri, str(trials)], workers, root)
                total = workers * trials
                per = (ours - raw) / total * 1000
                print(
                    f"| {workers} | {total} | {ours:.2f} s | {total / ours:.1f} | {raw:.2f} s | "
                    f"{total / raw:.1f} | {per:+.1f} ms |"
                )
        finally:
            server.stop()


if __name__ == "__main__":
    main()
