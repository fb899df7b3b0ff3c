"""Nothing users log is lost or corrupted: fresh-store races, poison values, refused
batches, spool failures, exit statuses, forked children, names and redaction.

Each case runs through the public API against a real store, with exact counts.
"""

from __future__ import annotations

import multiprocessing
import os
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
from children import python, steps

from trainkit_tracking import RunSpec, Tracker, TrackingWarning
from trainkit_tracking._store.store import Store
from trainkit_tracking.testing import MlflowServer, TrainkitStore

# The journal's own tests run the sender users get: a process of its own.
pytestmark = pytest.mark.default_sender

SPEC = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")


# --- 1. a fresh sqlite store used by several processes at once ---------------------------

RACER = """
import os, sys, time
from trainkit_tracking import RunSpec, Tracker
uri, barrier = sys.argv[1], sys.argv[2]
spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
open(os.path.join(barrier, str(os.getpid())), "w").close()
while not os.path.exists(os.path.join(barrier, "go")):
    time.sleep(0.001)
tracker = Tracker("fresh", uri)  # the first use of the store happens here, in every racer
run = tracker.start_run(spec)
run.log_metric("m", 1.0)
run.end()
print(run.name)
"""


@pytest.mark.slow
def test_first_use_of_a_fresh_sqlite_store_by_many_processes(tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path / 'new' / 'mlflow.db'}"  # not created, not migrated
    (tmp_path / "new").mkdir()
    barrier = tmp_path / "barrier"
    barrier.mkdir()
    count = 6
    procs = [python(RACER, uri, str(barrier)) for _ in range(count)]
    deadline = time.monotonic() + 240
    while len(list(barrier.iterdir())) < count and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.02)
    (barrier / "go").touch()
    outs = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0] * count, [err[-1500:] for _, err in outs]
    names = sorted(out.strip().splitlines()[-1] for out, _ in outs)
    assert names == sorted(f"sweep_{n} abcd1234 bert" for n in range(1, count + 1))
    # The store stays usable for everyone after the race.
    later = Tracker("fresh", uri)
    assert len(later.find(SPEC)) == count


# --- 2, 3. values the store refuses for good ---------------------------------------------


@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_an_undecodable_value_is_stored_escaped_and_blocks_nothing(
    where: str, trainkit_store: TrainkitStore, trainkit_server: MlflowServer
) -> None:
    uri = trainkit_store.uri if where == "sqlite" else trainkit_server.uri
    tracker = Tracker(f"poison-{where}", uri)
    run = tracker.start_run(SPEC)
    other = tracker.start_run(SPEC)
    with pytest.warns(TrackingWarning, match="not valid text"):
        run.log_params({"data_file": os.fsdecode(b"data_\xff.txt")})
    for step in range(100):
        run.log_metric("loss", 1.0 / (step + 1), step=step)
        other.log_metric("loss", 2.0, step=step)
    assert other.flush(60)
    assert run.end(timeout=60)
    other.end()
    record = tracker.store.get_run(run.id)
    assert record.params["data_file"] == "data_\\xff.txt"
    assert steps(tracker.store, run.id, "loss") == list(range(100))
    assert steps(tracker.store, other.id, "loss") == list(range(100))


@pytest.mark.parametrize("where", ["sqlite", "server"])
def test_a_refused_param_costs_only_itself(
    where: str, trainkit_store: TrainkitStore, trainkit_server: MlflowServer, tmp_path: Path
) -> None:
    uri = trainkit_store.uri if where == "sqlite" else trainkit_server.uri
    spool = tmp_path / "spool"
    tracker = Tracker(f"refused-{where}", uri, spool_dir=spool)
    run = tracker.start_run(SPEC)
    Store(uri).log_batch(run.id, params={"lr": "0.1"})  # another process logged it first
    run.log_params({"lr": 0.2, "epochs": 3})
    run.set_tags({"phase": "train"})
    for step in range(100):
        run.log_metric("loss", float(step), step=step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert run.end(timeout=60) is False  # not everything was stored: lr was refused
    refusals = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert len(refusals) == 1 and "'lr'" in refusals[0] and run.id in refusals[0], refusals
    record = tracker.store.get_run(run.id)
    assert record.params == {"lr": "0.1", "epochs": "3"}
    assert record.tags["phase"] == "train" and record.status == "FINISHED"
    assert steps(tracker.store, run.id, "loss") == list(range(100))
    from trainkit_tracking import pending

    assert pending(spool) == 0  # nothing for `sync` to retry forever


# --- 4. sync after the spool could not be written --------------------------------------

FULL_DISK = """
import resource, signal, sys, time
from trainkit_tracking import RunSpec, Tracker
uri, spool = sys.argv[1], sys.argv[2]
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a full disk: writes fail with EFBIG
tracker = Tracker("fulldisk", uri, spool_dir=spool, flush_interval=0.05)
spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
run = tracker.start_run(spec)
run.set_tags({"phase": "start"})
for step in range(200):
    run.log_metric("loss", float(step), step=step)
assert run.flush(60)
resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096))  # no file grows past 4 KiB now
for step in range(200, 2000):
    run.log_metric("loss", float(step), step=step)
run.set_tags({"phase": "end"})
ok = run.end(timeout=60)
print(run.id, ok, flush=True)
"""


@pytest.mark.skipif(sys.platform == "win32", reason="RLIMIT_FSIZE is POSIX")
def test_sync_after_a_spool_write_failure_resends_nothing_and_reverts_nothing(
    trainkit_server: MlflowServer, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    proc = python(FULL_DISK, trainkit_server.uri, str(spool))
    out, err = proc.communicate(timeout=180)
    assert proc.returncode == 0, err
    run_id, ok = out.split()
    assert ok == "True", err
    code = subprocess.run(
        [sys.executable, "-m", "trainkit_tracking", "sync", "--spool-dir", str(spool)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert code.returncode == 0, code.stdout + code.stderr
    store = Store(trainkit_server.uri)
    record = store.get_run(run_id)
    assert record.tags["phase"] == "end"
    stored = steps(store, run_id, "loss")
    assert stored == list(range(2000)), len(stored)  # every point once


# --- 5. exit statuses, with or without `with`, kept or dropped ---------------------------

STATUS = """
import argparse, os, signal, sys, threading, time
from trainkit_tracking import RunSpec, Tracker
uri, case = sys.argv[1], sys.argv[2]
tracker = Tracker("statuses", uri)
spec = RunSpec(kind="final_training", model="bert", environment="local", run_name=case)

def log(run):
    for step in range(50):
        run.log_metric("m", float(step), step=step)

if case.startswith("with"):
    with tracker.start_run(spec) as run:
        log(run)
        print(run.id, flush=True)
        if case == "with-exit0":
            sys.exit(0)
        if case == "with-exit2":
            sys.exit(2)
        if case == "with-raise-exit0":
            raise SystemExit(0)
        if case == "with-sigterm":
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(30)
        if case == "with-interrupt":
            raise KeyboardInterrupt
        if case == "with-caught-exit":
            try:
                sys.exit(4)  # caught: the block goes on and ends normally
            except SystemExit:
                pass
else:
    run = tracker.start_run(spec)
    log(run)
    print(run.id, flush=True)
    del run  # the user did not keep it
    if case == "plain-exit0":
        sys.exit(0)
    if case == "plain-exit3":
        sys.exit(3)
    if case == "plain-error":
        raise RuntimeError("boom")
    if case == "plain-sigterm":
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(30)
    if case == "plain-argparse-help":
        try:  # argparse exits 0 on --help: caught, the script goes on
            argparse.ArgumentParser().parse_args(["--help"])
        except SystemExit:
            pass
    if case == "plain-caught-exit":
        try:
            sys.exit(2)
        except SystemExit:
            pass
    if case == "plain-thread-exit":
        thread = threading.Thread(target=sys.exit, args=(5,))
        thread.start()
        thread.join()
"""

CASES = {
    "with-normal": ("FINISHED", 0),
    "with-exit0": ("FINISHED", 0),
    "with-raise-exit0": ("FINISHED", 0),
    "with-exit2": ("FAILED", 2),
    "with-sigterm": ("KILLED", 128 + signal.SIGTERM),
    "with-interrupt": ("KILLED", -signal.SIGINT),  # Python dies of SIGINT after Ctrl-C
    "plain-normal": ("FINISHED", 0),
    "plain-exit0": ("FINISHED", 0),
    # The code of a SystemExit leaving the main module: sys.monitoring (3.12+); before 3.12
    # no exit hook can see it, and sys.exit is never wrapped (docs/failures.md).
    "plain-exit3": ("FAILED" if sys.version_info >= (3, 12) else "FINISHED", 3),
    "plain-argparse-help": ("FINISHED", 0),
    "plain-caught-exit": ("FINISHED", 0),
    "plain-thread-exit": ("FINISHED", 0),
    "with-caught-exit": ("FINISHED", 0),
    "plain-error": ("FAILED", 1),
    "plain-sigterm": ("KILLED", 128 + signal.SIGTERM),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_exit_statuses(case: str, trainkit_server: MlflowServer, tmp_path: Path) -> None:
    status, code = CASES[case]
    proc = python(STATUS, trainkit_server.uri, case, env={"TRAINKIT_SPOOL_DIR": str(tmp_path)})
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == code, err
    store = Store(trainkit_server.uri)
    run_id = out.split()[0]
    # Exit waits at most exit_timeout (10 s); on a loaded machine the sender it started may
    # still be finishing: it goes on after the process ended, and sets the status.
    deadline = time.monotonic() + 60
    while store.get_run(run_id).status == "RUNNING" and time.monotonic() < deadline:
        time.sleep(0.5)
    record = store.get_run(run_id)
    assert record.status == status, err
    assert (record.tags.get("code.interrupted") == "true") == (status == "KILLED")
    assert steps(store, record.run_id, "m") == list(range(50))


# --- 6. forked children ------------------------------------------------------------------


_POOL_RUN: Any = None  # inherited by the forked workers (a Run is not picklable)


def _child_logs(worker: int) -> int:
    for step in range(500):
        _POOL_RUN.log_metric(f"w{worker}", float(step), step=step)
    return worker


def _child_logs_and_flushes(worker: int) -> int:
    _child_logs(worker)
    assert _POOL_RUN.flush(60)  # the documented rule for `with Pool()`: it terminates
    return worker


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs fork")
@pytest.mark.parametrize("ending", ["with", "close-join"])
def test_forked_pool_workers_lose_nothing(
    ending: str, trainkit_server: MlflowServer, tmp_path: Path
) -> None:
    global _POOL_RUN
    tracker = Tracker("forks", trainkit_server.uri, spool_dir=tmp_path / "spool")
    run = _POOL_RUN = tracker.start_run(SPEC)
    context = multiprocessing.get_context("fork")
    if ending == "with":  # Pool.__exit__ terminates the workers (SIGTERM)
        with context.Pool(2) as pool:
            assert sorted(pool.map(_child_logs_and_flushes, range(4))) == [0, 1, 2, 3]
    else:
        pool = context.Pool(2)
        assert sorted(pool.map(_child_logs, range(4))) == [0, 1, 2, 3]
        pool.close()
        pool.join()
    assert run.end(timeout=60)
    from trainkit_tracking import sync

    sync(tmp_path / "spool")  # what a terminated worker could not send, it left spooled
    for worker in range(4):
        assert steps(tracker.store, run.id, f"w{worker}") == list(range(500))


# --- 7, 8. names, decoding, recursion, redaction ------------------------------------------


def test_explicit_name_with_a_secret_looking_word_is_masked_consistently(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("names", trainkit_store.uri)
    spec = RunSpec(kind="final_training", model="bert", run_name="ablation-max_token=512")
    with tracker.start_run(spec) as run:
        pass
    record = tracker.store.get_run(run.id)
    assert run.name == record.name == record.tags["mlflow.runName"] == "ablation-max_token=***"


def test_secret_shaped_model_name_never_reaches_the_run_name(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("names", trainkit_store.uri)
    token = "hf_" + "Ab3" * 12
    with tracker.start_run(SPEC.model_copy(update={"model": token})) as run:
        pass
    record = tracker.store.get_run(run.id)
    assert token not in record.name and token not in str(record.tags)


def test_params_nested_too_deep_are_a_clear_error(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("deep", trainkit_store.uri)
    deep: dict[str, object] = {"leaf": 1}
    for _ in range(3000):
        deep = {"level": deep}
    with tracker.start_run(SPEC) as run:
        with pytest.raises(ValueError, match="nested more than"):
            run.log_params(deep)
        cyclic: dict[str, object] = {}
        cyclic["self"] = cyclic
        with pytest.raises(ValueError, match="nested more than"):
            run.log_params(cyclic)
        run.log_params({"a": {"b": {"c": 1}}})
    assert tracker.store.get_run(run.id).params == {"a.b.c": "1"}


@pytest.mark.parametrize(
    ("text", "hidden"),
    [
        ('authorization: "Basic dXNlcjpodW50ZXIy"', "dXNlcjpodW50ZXIy"),
        ("Basic dXNlcjpodW50ZXIy", "dXNlcjpodW50ZXIy"),
        ("python train.py --password hunter2 --lr 3", "hunter2"),
        ("train --db-password=hunter2", "hunter2"),
        ("train --hf-token 'hf_xyz' --epochs 3", "hf_xyz"),
    ],
)
def test_redaction_of_command_lines_and_basic_auth(
    text: str, hidden: str, trainkit_store: TrainkitStore
) -> None:
    tracker = Tracker("redact", trainkit_store.uri)
    with tracker.start_run(SPEC) as run:
        run.log_params({"cmd": text})
    stored = tracker.store.get_run(run.id).params["cmd"]
    assert hidden not in stored and "***" in stored
    assert "--lr 3" in stored or "--lr" not in text  # what is not secret stays


def test_basic_word_that_is_not_a_credential_stays(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("redact", trainkit_store.uri)
    with tracker.start_run(SPEC) as run:
        run.log_params({"note": "basic tokenizer", "opt": "--max-tokens 512"})
    assert tracker.store.get_run(run.id).params == {
        "note": "basic tokenizer",
        "opt": "--max-tokens 512",
    }
