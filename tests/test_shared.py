"""Many workers, one sweep: race-free get-or-create with resume=True, holders that end a
shared run last, and an Optuna study run by several workers on a shared storage.

Real processes, released together by a file barrier (never a wall-clock start).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainkit_tracking import RunSpec, Tracker
from trainkit_tracking._store.store import Store
from trainkit_tracking.testing import MlflowServer, TrainkitStore

pytestmark = pytest.mark.slow

SPEC = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")

GET_OR_CREATE = """
import os, sys, time
from trainkit_tracking import RunSpec, Tracker
uri, barrier, ends = sys.argv[1], sys.argv[2], sys.argv[3]
tracker = Tracker("shared", uri, heartbeat_interval=0.5, holder_timeout=3)
tracker.setup()
spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
open(os.path.join(barrier, str(os.getpid())), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):
    time.sleep(0.001)
run = tracker.start_run(spec, resume=True)
print(run.id, flush=True)
mine = os.path.join(ends, str(os.getpid()))
while not os.path.exists(mine):
    time.sleep(0.01)
run.log_metric("worker", float(os.getpid()))
run.end()
print("ended", flush=True)
"""


def start_racers(uri: str, count: int, root: Path) -> tuple[list[subprocess.Popen[str]], Path]:
    barrier, ends = root / "barrier", root / "ends"
    barrier.mkdir()
    ends.mkdir()
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", textwrap.dedent(GET_OR_CREATE), uri, str(barrier), str(ends)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(count)
    ]
    deadline = time.monotonic() + 240
    while len(list(barrier.iterdir())) < count:
        assert time.monotonic() < deadline, "racers did not get ready"
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.02)
    (barrier / "go").touch()
    return procs, ends


def run_ids(procs: list[subprocess.Popen[str]]) -> list[str]:
    ids = []
    for proc in procs:
        assert proc.stdout is not None
        line = proc.stdout.readline().strip()
        assert line, proc.stderr.read() if proc.stderr else ""
        ids.append(line)
    return ids


def finish(proc: subprocess.Popen[str], ends: Path) -> None:
    (ends / str(proc.pid)).touch()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0 and "ended" in out, err


def get_or_create_race(uri: str, root: Path) -> None:
    procs, ends = start_racers(uri, 8, root)
    try:
        ids = run_ids(procs)
        assert len(set(ids)) == 1, ids  # eight callers, one run, every caller got its id
        store = Store(uri)
        experiment = store.find_experiment("shared")
        assert experiment is not None
        assert len(store.search([experiment.experiment_id])) == 1
        for proc in procs[:-1]:  # holders end one by one: the run stays open
            finish(proc, ends)
            assert store.get_run(ids[0]).status == "RUNNING"
        finish(procs[-1], ends)  # the last holder ends it
        record = store.get_run(ids[0])
        assert record.status == "FINISHED"
        assert not [k for k in record.tags if k.startswith("code.holder.")]
    finally:
        for proc in procs:
            proc.kill()


def test_eight_racers_get_one_run_on_sqlite_and_the_last_holder_ends_it(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    get_or_create_race(trainkit_store.uri, tmp_path)


@pytest.mark.postgres
def test_eight_racers_get_one_run_on_a_postgres_backed_server(
    trainkit_postgres_server: MlflowServer, tmp_path: Path
) -> None:
    get_or_create_race(trainkit_postgres_server.uri, tmp_path)


def test_a_killed_holder_does_not_keep_the_shared_run_open(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    procs, ends = start_racers(trainkit_store.uri, 2, tmp_path)
    try:
        ids = run_ids(procs)
        assert ids[0] == ids[1]
        procs[0].send_signal(signal.SIGKILL)
        procs[0].wait(30)
        time.sleep(3.5)  # the dead holder's heartbeat goes stale (holder_timeout=3)
        finish(procs[1], ends)
        assert Store(trainkit_store.uri).get_run(ids[0]).status == "FINISHED"
    finally:
        for proc in procs:
            proc.kill()


def test_resume_after_the_shared_run_finished_creates_one_new_run(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("shared-again")
    first = tracker.start_run(SPEC, resume=True)
    first.end()
    second = tracker.start_run(SPEC, resume=True)
    third = Tracker("shared-again").start_run(SPEC, resume=True)
    assert second.id == third.id != first.id
    third.end()
    assert tracker.store.get_run(second.id).status == "RUNNING"  # second still holds it
    second.end()
    assert tracker.store.get_run(second.id).status == "FINISHED"


OPTUNA_WORKER = """
import os, sys, time
import optuna
from optuna.distributions import FloatDistribution
from trainkit_tracking import Tracker
from trainkit_tracking.integrations.optuna import TrackedStudy
uri, storage_arg, barrier, trials = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
optuna.logging.set_verbosity(optuna.logging.WARNING)
if storage_arg.startswith("journal:"):
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend
    storage = JournalStorage(JournalFileBackend(storage_arg[len("journal:"):]))
else:
    storage = storage_arg
study = optuna.load_study(study_name="shared-study", storage=storage)
tracker = Tracker("optuna-shared", uri, heartbeat_interval=1, holder_timeout=60)
open(os.path.join(barrier, str(os.getpid())), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):
    time.sleep(0.001)

def objective(trial, run):
    x = trial.suggest_float("x", -1.0, 1.0)
    return (x - 0.25) ** 2

space = {"x": FloatDistribution(-1.0, 1.0)}
with TrackedStudy(tracker, study, model="bert", search_space=space, metric="loss",
                  environment="local", resume=True) as tracked:
    tracked.optimize(objective, n_trials=trials)
print(tracked.sweep_run.id, flush=True)
"""


def optuna_workers(
    uri: str, storage: str, root: Path, workers: int = 4, trials: int = 5
) -> tuple[Store, str]:
    import optuna

    if storage.startswith("journal:"):
        from optuna.storages import JournalStorage
        from optuna.storages.journal import JournalFileBackend

        created: object = JournalStorage(JournalFileBackend(storage[len("journal:") :]))
    else:
        created = storage
    optuna.create_study(study_name="shared-study", storage=created, direction="minimize")  # type: ignore[arg-type]
    barrier = root / "barrier"
    barrier.mkdir()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-c",
                textwrap.dedent(OPTUNA_WORKER),
                uri,
                storage,
                str(barrier),
                str(trials),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    deadline = time.monotonic() + 300
    while len(list(barrier.iterdir())) < workers:
        assert time.monotonic() < deadline
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.02)
    (barrier / "go").touch()
    outs = [p.communicate(timeout=600) for p in procs]
    assert [p.returncode for p in procs] == [0] * workers, [err[-2000:] for _, err in outs]
    sweep_ids = {out.strip().splitlines()[-1] for out, _ in outs}
    assert len(sweep_ids) == 1, sweep_ids
    (sweep_id,) = sweep_ids
    store = Store(uri)
    experiment = store.find_experiment("optuna-shared")
    assert experiment is not None
    runs = store.search([experiment.experiment_id])
    sweeps = [r for r in runs if r.tags.get("code.run_kind") == "hpo_sweep"]
    assert [s.run_id for s in sweeps] == [sweep_id]
    assert sweeps[0].status == "FINISHED"
    runs_of_trials = [r for r in runs if r.tags.get("code.run_kind") == "hpo_trial"]
    assert len(runs_of_trials) == trials * workers
    assert all(t.parent_id == sweep_id for t in runs_of_trials)
    numbers = sorted(int(t.tags["code.hpo.trial_number"]) for t in runs_of_trials)
    assert numbers == list(range(trials * workers))
    assert len({t.name for t in runs_of_trials}) == len(runs_of_trials)
    study = optuna.load_study(study_name="shared-study", storage=created)  # type: ignore[arg-type]
    best_number = study.best_trial.number
    assert sweeps[0].tags["best_trial_number"] == str(best_number)
    return store, sweep_id


def test_optuna_workers_on_a_journal_storage_share_one_sweep(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    optuna_workers(trainkit_store.uri, f"journal:{tmp_path / 'journal.log'}", tmp_path)


@pytest.mark.postgres
def test_optuna_workers_on_postgres_storage_share_one_sweep_on_a_postgres_server(
    trainkit_postgres_server: MlflowServer, tmp_path: Path
) -> None:
    import uuid

    import psycopg2

    backend = trainkit_postgres_server.backend_store_uri  # postgresql://user@host:port/db
    base, _, _ = backend.rpartition("/")
    database = f"optuna_{uuid.uuid4().hex[:8]}"  # the same cluster, a database of its own
    conn = psycopg2.connect(backend.replace("postgresql+psycopg2://", "postgresql://"))
    conn.autocommit = True
    with conn.cursor() as cursor:
        cursor.execute(f"CREATE DATABASE {database}")
    conn.close()
    optuna_workers(trainkit_postgres_server.uri, f"{base}/{database}", tmp_path)


def test_every_run_records_where_it_ran(trainkit_store: TrainkitStore) -> None:
    environ = {**os.environ, "SLURM_JOB_ID": "77", "SLURM_ARRAY_TASK_ID": "3", "WORLD_SIZE": "1"}
    tracker = Tracker("where", environ=environ)
    with tracker.start_run(SPEC) as run:
        pass
    tags = tracker.store.get_run(run.id).tags
    assert tags["code.pid"] == str(os.getpid())
    assert tags["code.host"]
    assert tags["code.slurm.job_id"] == "77" and tags["code.slurm.array_task_id"] == "3"
    assert tags["code.world_size"] == "1"


RETRY_WORKER = """
import os, sys, time
import optuna
from optuna.distributions import FloatDistribution
from optuna.storages import RDBStorage, RetryFailedTrialCallback
from trainkit_tracking import Tracker
from trainkit_tracking.integrations.optuna import TrackedStudy
uri, db, block = sys.argv[1], sys.argv[2], sys.argv[3]
optuna.logging.set_verbosity(optuna.logging.ERROR)
storage = RDBStorage(db, heartbeat_interval=1, grace_period=2,
                     failed_trial_callback=RetryFailedTrialCallback(max_retry=1))
study = optuna.load_study(study_name="retry-study", storage=storage)
tracker = Tracker("optuna-retry", uri, heartbeat_interval=0.5, holder_timeout=2)

def objective(trial, run):
    x = trial.suggest_float("x", -1.0, 1.0)
    if os.path.exists(block):
        print("in trial", flush=True)
        time.sleep(600)  # killed here
    return x * x

space = {"x": FloatDistribution(-1.0, 1.0)}
with TrackedStudy(tracker, study, model="bert", search_space=space, metric="loss",
                  environment="local", resume=True) as tracked:
    tracked.optimize(objective, n_trials=1)
print("done", flush=True)
"""


def test_a_killed_worker_s_trial_is_reaped_and_its_retry_links_to_it(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    import optuna

    db = f"sqlite:///{tmp_path / 'optuna.db'}"
    optuna.create_study(study_name="retry-study", storage=db)
    block = tmp_path / "block"
    block.touch()
    code = textwrap.dedent(RETRY_WORKER)
    first = subprocess.Popen(
        [sys.executable, "-c", code, trainkit_store.uri, db, str(block)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert first.stdout is not None
        line = first.stdout.readline()
        assert line.strip() == "in trial", first.stderr.read() if first.stderr else ""
        first.send_signal(signal.SIGKILL)
        first.wait(30)
        block.unlink()
        time.sleep(3)  # past Optuna's grace period and our holder_timeout: the worker is dead
        second = subprocess.run(
            [sys.executable, "-c", code, trainkit_store.uri, db, str(block)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert second.returncode == 0 and "done" in second.stdout, second.stderr
    finally:
        first.kill()
    reaped = subprocess.run(
        [sys.executable, "-m", "trainkit_tracking", "reap", "--older-than", "2s",
         "-e", "optuna-retry", "--tracking-uri", trainkit_store.uri],
        capture_output=True,
        text=True,
        timeout=120,
    )  # fmt: skip
    assert reaped.returncode == 0, reaped.stdout + reaped.stderr
    store = Store(trainkit_store.uri)
    experiment = store.find_experiment("optuna-retry")
    assert experiment is not None
    runs = store.search([experiment.experiment_id])
    trials = {
        int(r.tags["code.hpo.trial_number"]): r
        for r in runs
        if r.tags.get("code.run_kind") == "hpo_trial"
    }
    assert sorted(trials) == [0, 1], sorted(trials)
    killed, retry = trials[0], trials[1]
    assert killed.status == "KILLED" and killed.tags.get("code.interrupted") == "true"
    assert retry.status == "FINISHED"
    assert retry.tags["code.hpo.retry_of"] == "0"
    assert retry.tags["code.hpo.retry_of_run_id"] == killed.run_id
    (sweep,) = [r for r in runs if r.tags.get("code.run_kind") == "hpo_sweep"]
    assert sweep.status == "FINISHED"  # the dead worker's hold did not keep it open
