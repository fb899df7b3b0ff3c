"""How long tracking calls take to give up when the store fails, next to plain MLflow.

Prints a table: `start_run` against a refused port and against a server that accepts
connections and never answers (timeout=5), and the exit of a process with a sweep, a
trial and a fold open while the store is dead (exit_timeout=10). Plain MLflow's time for
the same call is measured in a subprocess, capped (it retries for minutes).

    python bench/bench_failures.py            # the table of docs/performance.md (~10 min)
    python bench/bench_failures.py --quick    # a smoke run: caps MLflow at 20 s
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

from trainkit_tracking.testing import free_port, silent_server


def timed_subprocess(code: str, *args: str, cap: float, cwd: Path) -> str:
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        cwd=cwd,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        proc.wait(timeout=cap)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return f"> {cap:.0f} s (still retrying; stopped)"
    return f"{time.monotonic() - started:.1f} s"


TRAINKIT_START = """
import sys, time
from trainkit_tracking import RunSpec, StoreUnavailableError, Tracker
tracker = Tracker("bench", sys.argv[1], timeout=float(sys.argv[2]), fallback_to_local=False)
try:
    tracker.start_run(RunSpec(kind="final_training", model="bert"))
except StoreUnavailableError:
    pass
"""

MLFLOW_START = """
import sys
from mlflow.tracking import MlflowClient
client = MlflowClient(sys.argv[1])
try:
    experiment = client.get_experiment_by_name("bench")
    client.create_run(experiment.experiment_id if experiment else "0")
except Exception:
    pass
"""

EXIT = """
import os, sys, time
from trainkit_tracking import RunSpec, Tracker
uri, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
tracker = Tracker("bench-exit", uri, exit_timeout=10, fallback_to_local=False)
spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
with tracker.start_run(spec) as sweep:
    with sweep.child("hpo_trial", trial_number=0) as trial:
        with trial.child("hpo_trial_fold", fold_idx=0) as fold:
            fold.log_metric("loss", 1.0)
            assert fold.flush(60)
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
            for step in range(100):
                fold.log_metric("loss", 1.0, step=step)
"""

MLFLOW_EXIT = """
import os, sys, time
import mlflow
uri, ready, go = sys.argv[1], sys.argv[2], sys.argv[3]
mlflow.set_tracking_uri(uri)
mlflow.set_experiment("bench-exit-mlflow")
with mlflow.start_run():
    with mlflow.start_run(nested=True):
        with mlflow.start_run(nested=True):
            mlflow.log_metric("loss", 1.0)
            open(ready, "w").close()
            while not os.path.exists(go):
                time.sleep(0.01)
            for step in range(100):
                mlflow.log_metric("loss", 1.0, step=step)
"""


def exit_time(code: str, backend: str, work: Path, cap: float) -> str:
    from trainkit_tracking.testing import MlflowServer

    server = MlflowServer(backend, work / "artifacts").start()
    ready, go = work / "ready", work / "go"
    for path in (ready, go):
        path.unlink(missing_ok=True)
    env = {**os.environ, "TRAINKIT_SPOOL_DIR": str(work / "spool")}
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code), server.uri, str(ready), str(go)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        deadline = time.monotonic() + 120
        while not ready.exists() and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.02)
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
        started = time.monotonic()
        go.touch()
        try:
            proc.wait(timeout=cap)
        except subprocess.TimeoutExpired:
            proc.kill()
            return f"> {cap:.0f} s (still retrying; stopped)"
        return f"{time.monotonic() - started:.1f} s"
    finally:
        proc.kill()
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="cap plain MLflow at 20 s")
    args = parser.parse_args()
    cap = 20.0 if args.quick else 300.0
    work = Path(tempfile.mkdtemp(prefix="trainkit-bench-failures-"))
    try:
        from trainkit_tracking.testing import migrated_sqlite_template

        template = migrated_sqlite_template(work)
        rows: list[tuple[str, str, str]] = []
        refused = f"http://127.0.0.1:{free_port()}"
        rows.append(
            (
                "start_run, refused port",
                timed_subprocess(TRAINKIT_START, refused, "30", cap=cap, cwd=work),
                timed_subprocess(MLFLOW_START, refused, cap=cap, cwd=work),
            )
        )
        with silent_server() as silent:
            rows.append(
                (
                    "start_run, server that never answers (timeout=5)",
                    timed_subprocess(TRAINKIT_START, silent, "5", cap=cap, cwd=work),
                    timed_subprocess(MLFLOW_START, silent, cap=cap, cwd=work),
                )
            )
        backend = work / "server.db"
        shutil.copyfile(template, backend)
        ours = exit_time(EXIT, f"sqlite:///{backend}", work, cap)
        shutil.copyfile(template, backend)
        theirs = exit_time(MLFLOW_EXIT, f"sqlite:///{backend}", work, cap)
        rows.append(("exit, 3 open runs, store SIGKILLed (exit_timeout=10)", ours, theirs))
        import mlflow

        print(f"trainkit-tracking vs plain MLflow {mlflow.__version__} (times include start-up)")
        print(f"| case | trainkit-tracking | plain MLflow (cap {cap:.0f} s) |")
        print("|---|---|---|")
        for case, a, b in rows:
            print(f"| {case} | {a} | {b} |")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
