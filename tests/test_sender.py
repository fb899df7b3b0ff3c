"""The sender process (the default): the store's work off the training process.

Real stores and real processes: a training process SIGKILLed while the store is down, a
sender SIGKILLed mid-batch, a sender racing two syncs and a second sender, and the memory
of a 5M-point outage.
"""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainkit_tracking._journal.sender_lock import read_status, sender_running
from trainkit_tracking._journal.spool import spool_paths, uri_id
from trainkit_tracking._store.store import Store
from trainkit_tracking.testing import MlflowServer

pytestmark = pytest.mark.slow


@pytest.fixture(autouse=True)
def _process_sender(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRAINKIT_SENDER", "process")
    monkeypatch.setenv("TRAINKIT_SENDER_LINGER", "120")


def _server(tmp_path: Path, template: Path) -> MlflowServer:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(template, db)
    return MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts").start()


def _child(script: str, *args: str, spool: Path) -> subprocess.Popen[str]:
    env = {**os.environ, "TRAINKIT_SPOOL_DIR": str(spool), "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )


def _line(proc: subprocess.Popen[str], prefix: str) -> list[str]:
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line.startswith(prefix):
        proc.kill()
        raise AssertionError(line + (proc.stderr.read() if proc.stderr else ""))
    return line.split()[1:]


def _wait_for(what: str, condition: object, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if callable(condition) and condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def _stop_sender(spool: Path, uri: str) -> None:
    """A test that leaves data unsent for a store it stops: its sender need not linger."""
    pid = read_status(spool, uri_id(uri)).get("pid")
    if isinstance(pid, int):
        with contextlib.suppress(OSError):
            os.kill(pid, signal.SIGKILL)


def _steps(store: Store, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in store.client.get_metric_history(run_id, key))


def _sender_pid(spool: Path, uri: str) -> int:
    pid = read_status(spool, uri_id(uri)).get("pid")
    assert isinstance(pid, int), read_status(spool, uri_id(uri))
    return pid


KILLED_WHILE_DOWN = """
    import os, sys, time
    from trainkit_tracking import RunSpec, Tracker
    uri, go = sys.argv[1], sys.argv[2]
    tracker = Tracker("sigkill", uri, fallback_to_local=False)
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
    run = tracker.start_run(spec)
    for step in range(3000):
        run.log_metrics({"a": float(step), "b": step * 2.0}, step=step)
    assert run.flush(60)
    print("ids", run.id, flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    for step in range(3000, 6000):  # logged while the store is dead
        run.log_metrics({"a": float(step), "b": step * 2.0}, step=step)
    assert not run.flush(1.0)  # not stored, but on disk
    print("spooled", flush=True)
    time.sleep(600)
"""


def test_points_spooled_before_a_sigkill_reach_the_store_without_sync(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    server = _server(tmp_path, trainkit_sqlite_template)
    spool, go = tmp_path / "spool", tmp_path / "go"
    proc = _child(KILLED_WHILE_DOWN, server.uri, str(go), spool=spool)
    try:
        (run_id,) = _line(proc, "ids")
        sender = _sender_pid(spool, server.uri)
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
        go.touch()
        _line(proc, "spooled")
        proc.kill()  # SIGKILL: no exit path, no flush
        proc.wait(30)
        server.restart()
        killed_at = time.monotonic()
        store = Store(server.uri)
        # Nobody runs `sync`: the sender process that outlived the training sends the rest.
        _wait_for("all 6000 steps", lambda: len(_steps(store, run_id, "b")) >= 6000, 90)
        stored_after = time.monotonic() - killed_at
        for key in ("a", "b"):
            assert _steps(store, run_id, key) == list(range(6000)), key  # once each
        assert _sender_pid(spool, server.uri) == sender
        # With its work done and no writer left, the sender ends by itself.
        _wait_for("the sender to end", lambda: not sender_running(spool, uri_id(server.uri)), 30)
        assert spool_paths(spool) == []
        assert stored_after < 60, stored_after
    finally:
        proc.kill()
        _stop_sender(spool, server.uri)
        server.stop()


SLOW_END = """
    import sys
    from trainkit_tracking import RunSpec, Tracker
    uri, n = sys.argv[1], int(sys.argv[2])
    tracker = Tracker("midbatch", uri, fallback_to_local=False)
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
    run = tracker.start_run(spec)
    print("ids", run.id, flush=True)
    for step in range(n):
        run.log_metrics({"a": float(step), "b": -float(step)}, step=step)
    print("ended", run.end(timeout=300), flush=True)
"""


def test_a_sender_killed_mid_batch_is_replaced_and_nothing_is_lost_or_doubled(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    db = tmp_path / "mlflow.db"
    shutil.copyfile(trainkit_sqlite_template, db)
    uri = f"sqlite:///{db}"
    spool = tmp_path / "spool"
    n = 60_000
    proc = _child(SLOW_END, uri, str(n), spool=spool)
    try:
        (run_id,) = _line(proc, "ids")
        store = Store(uri)
        _wait_for("the first points", lambda: len(_steps(store, run_id, "a")) > 0, 60)
        first = _sender_pid(spool, uri)
        os.kill(first, signal.SIGKILL)  # mid-way through the backlog
        assert _line(proc, "ended") == ["True"]  # a new sender finished the job
        assert proc.wait(60) == 0
        assert _sender_pid(spool, uri) != first
        for key in ("a", "b"):
            assert _steps(store, run_id, key) == list(range(n)), key
        assert store.get_run(run_id).status == "FINISHED"
    finally:
        proc.kill()
        _stop_sender(spool, uri)


def _race(
    barrier: multiprocessing.synchronize.Barrier, what: str, spool: str, uri: str
) -> None:  # pragma: no cover - runs in a child process
    barrier.wait()
    if what == "sync":
        from trainkit_tracking import sync

        sync(Path(spool), tracking_uri=uri)
    else:  # a second sender process: it finds the lock held and leaves
        command = [sys.executable, "-m", "trainkit_tracking._journal.sender", spool, "30", "30"]
        done = subprocess.run(command, input=uri + "\n", text=True, timeout=120, check=False)
        assert done.returncode == 0


def test_a_sender_racing_two_syncs_and_a_second_sender_stores_each_point_once(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    server = _server(tmp_path, trainkit_sqlite_template)
    spool, go = tmp_path / "spool", tmp_path / "go"
    proc = _child(KILLED_WHILE_DOWN, server.uri, str(go), spool=spool)
    try:
        (run_id,) = _line(proc, "ids")
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
        go.touch()
        _line(proc, "spooled")
        proc.kill()
        proc.wait(30)
        server.restart()
        ctx = multiprocessing.get_context("spawn")
        barrier = ctx.Barrier(3)
        racers = [
            ctx.Process(target=_race, args=(barrier, what, str(spool), server.uri))
            for what in ("sync", "sync", "sender")
        ]
        for racer in racers:
            racer.start()
        for racer in racers:
            racer.join(180)
            assert racer.exitcode == 0
        store = Store(server.uri)
        _wait_for("all 6000 steps", lambda: len(_steps(store, run_id, "a")) >= 6000, 90)
        for key in ("a", "b"):
            assert _steps(store, run_id, key) == list(range(6000)), key
    finally:
        proc.kill()
        _stop_sender(spool, server.uri)
        server.stop()


OUTAGE = """
    import os, resource, sys, time
    from trainkit_tracking import RunSpec, Tracker
    uri, go, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def rss_mb():
        with open("/proc/self/status") as fh:
            return {k: int(v.split()[0]) / 1024 for k, v in (ln.split(":", 1) for ln in fh)
                    if k in ("VmRSS", "VmHWM")}
    tracker = Tracker("outage", uri, fallback_to_local=False, timeout=5)
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
    run = tracker.start_run(spec)
    run.log_metrics({"warm": 1.0})
    assert run.flush(60)
    print("ready", flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    before = rss_mb()["VmRSS"]
    for step in range(n // 5):
        run.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": 5.0}, step=step)
    run.flush(2.0)
    print("rss", before, rss_mb()["VmHWM"], flush=True)
    os._exit(0)
"""


def _vm(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024
    raise AssertionError(key)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_memory_of_a_five_million_point_outage_stays_under_the_cap(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    server = _server(tmp_path, trainkit_sqlite_template)
    spool, go = tmp_path / "spool", tmp_path / "go"
    proc = _child(OUTAGE, server.uri, str(go), "5000000", spool=spool)
    try:
        _line(proc, "ready")
        sender = _sender_pid(spool, server.uri)
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
        sender_before = _vm(sender, "VmRSS")
        go.touch()
        before, peak = (float(v) for v in _line(proc, "rss"))
        assert peak - before < 64, (before, peak)  # the training process
        assert _vm(sender, "VmHWM") - sender_before < 64  # and the sender, that waits
        assert proc.wait(30) == 0
        spooled = sum(
            sum(1 for point in json.loads(line).get("m", ()) if point[0] != "warm")
            for path in spool_paths(spool)
            for line in path.read_text().splitlines()
        )
        assert spooled == 5_000_000  # every point on disk
    finally:
        proc.kill()
        _stop_sender(spool, server.uri)
        server.stop()


LOGS_AND_WAITS = """
    import sys, time
    from trainkit_tracking import RunSpec, Tracker
    tracker = Tracker("nice", sys.argv[1], fallback_to_local=False)
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
    run = tracker.start_run(spec)
    run.log_metric("a", 1.0)
    assert run.flush(60)
    print("stored", flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not Path("/proc/self/autogroup").exists(), reason="no autogroup scheduling")
def test_the_sender_yields_the_cpu_to_training_in_its_own_session_too(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    """Linux's autogroup weighs a session as a whole, whatever its processes' nice: the
    sender, in a session of its own, sets its group's nice as well as its own."""
    db = tmp_path / "mlflow.db"
    shutil.copyfile(trainkit_sqlite_template, db)
    uri, spool = f"sqlite:///{db}", tmp_path / "spool"
    proc = _child(LOGS_AND_WAITS, uri, spool=spool)
    try:
        _line(proc, "stored")
        sender = _sender_pid(spool, uri)
        assert os.getpriority(os.PRIO_PROCESS, sender) >= 10
        group = Path(f"/proc/{sender}/autogroup").read_text().split()
        assert group[-2:] == ["nice", "10"], group
    finally:
        proc.kill()
        _stop_sender(spool, uri)
