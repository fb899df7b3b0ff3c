"""Faults with real stores and real processes: a server killed mid-run, SIGKILL, a bad spool."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path

import pytest
from children import python

from trainkit_tracking import TrackingWarning
from trainkit_tracking._journal.run_logger import RunLogger, pending, sync
from trainkit_tracking._store.store import Store
from trainkit_tracking.testing import MlflowServer

pytestmark = [pytest.mark.slow, pytest.mark.default_sender]  # the sender users get


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def new_run(store: Store) -> str:
    return store.create_run(store.get_or_create_experiment("faults"), "run", {}).run_id


def step_counts(store: Store, run_id: str, key: str) -> Counter[int]:
    return Counter(m.step for m in store.client.get_metric_history(run_id, key))


def sqlite_copy(template: Path, path: Path) -> str:
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


def wait_for_line(proc: subprocess.Popen[str], expected: str, timeout: float = 120) -> None:
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if line.strip() == expected:
            return
        if not line and proc.poll() is not None:
            raise AssertionError(f"child exited early: {proc.stderr.read() if proc.stderr else ''}")
    raise AssertionError(f"child did not print {expected!r} in {timeout}s")


@pytest.mark.server
def test_server_killed_and_restarted_mid_run_loses_nothing_and_never_blocks(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    backend = sqlite_copy(trainkit_sqlite_template, tmp_path / "mlflow.db")
    server = MlflowServer(backend, tmp_path / "artifacts").start()
    try:
        store = Store(server.uri)
        run_id = new_run(store)
        logger = RunLogger(server.uri, run_id, spool_dir=tmp_path / "spool", flush_interval=0.2)
        durations: list[float] = []
        n = 3000
        for step in range(n):
            start = time.perf_counter()
            logger.log_metrics({"loss": 1.0 / (step + 1), "step_sq": float(step * step)}, step)
            durations.append(time.perf_counter() - start)
            if step == 1000:
                assert server.pid is not None
                os.killpg(server.pid, signal.SIGKILL)  # mid-run, no goodbye
                down_since = time.monotonic()
            if step == 2000:
                assert time.monotonic() - down_since > 1.0
                assert pending(tmp_path / "spool") > 0  # the outage is in the spool
                server.restart()  # same backend, same port
            time.sleep(0.001)
        # Logging never waited for the store, down or not.
        assert max(durations) < 0.05, max(durations)
        assert logger.flush(timeout=300), server.log_tail()
        for key in ("loss", "step_sq"):
            counts = step_counts(store, run_id, key)
            assert sorted(counts) == list(range(n))
            assert set(counts.values()) == {1}  # exactly once, despite resends
        assert logger.end(timeout=60)
        assert store.get_run(run_id).status == "FINISHED"
        assert pending(tmp_path / "spool") == 0
    finally:
        server.stop()


def test_sigkill_with_the_store_down_then_sync_recovers_exactly_once(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    backend = sqlite_copy(trainkit_sqlite_template, tmp_path / "mlflow.db")
    run_id = new_run(Store(backend))
    port = free_port()
    uri = f"http://127.0.0.1:{port}"  # nobody listens yet: the store is down
    spool = tmp_path / "spool"
    proc = python(
        """
        import sys, time
        from pathlib import Path
        from trainkit_tracking._journal.run_logger import RunLogger
        uri, run_id, spool = sys.argv[1], sys.argv[2], Path(sys.argv[3])
        logger = RunLogger(uri, run_id, spool_dir=spool, flush_interval=0.5)
        for step in range(2000):
            logger.log_metrics({"loss": step / 7, "acc": step / 2000}, step=step)
        logger.log_params({"lr": 0.01, "model": {"layers": 4}})
        logger.set_tags({"phase": "train"})
        time.sleep(1.5)  # more than a flush interval: all of the above is on disk
        for step in range(2000, 2100):
            logger.log_metric("loss", step / 7, step=step)  # may be lost: the last interval
        print("logged", flush=True)
        time.sleep(600)
        """,
        uri,
        run_id,
        str(spool),
    )
    try:
        wait_for_line(proc, "logged")
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert pending(spool) > 0
    server = MlflowServer(backend, tmp_path / "artifacts", port=port).start()
    try:
        report = sync(spool)
        assert report.ok, report.errors
        assert sync(spool).sent == 0  # nothing twice
        store = Store(uri)
        loss, acc = step_counts(store, run_id, "loss"), step_counts(store, run_id, "acc")
        assert sorted(acc) == list(range(2000)) and set(acc.values()) == {1}
        assert set(range(2000)) <= set(loss) and set(loss.values()) == {1}
        run = store.get_run(run_id)
        assert run.params == {"lr": "0.01", "model.layers": "4"}
        assert run.tags["phase"] == "train"
        assert run.status == "RUNNING"  # never ended: `reap` decides, not sync
        assert pending(spool) == 0
    finally:
        server.stop()


def test_sigkill_after_a_flush_then_sync_exactly_once(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    uri = sqlite_copy(trainkit_sqlite_template, tmp_path / "mlflow.db")
    store = Store(uri)
    run_id = new_run(store)
    spool = tmp_path / "spool"
    proc = python(
        """
        import sys, time
        from pathlib import Path
        from trainkit_tracking._journal.run_logger import RunLogger
        uri, run_id, spool = sys.argv[1], sys.argv[2], Path(sys.argv[3])
        logger = RunLogger(uri, run_id, spool_dir=spool)
        for step in range(1000):
            logger.log_metric("m", float(step), step=step)
        assert logger.flush(120)
        print("flushed", flush=True)
        for step in range(1000, 3000):
            logger.log_metric("m", float(step), step=step)
            if step % 100 == 0:
                time.sleep(0.01)
        print("logged", flush=True)
        time.sleep(600)
        """,
        uri,
        run_id,
        str(spool),
    )
    try:
        wait_for_line(proc, "flushed")
        assert sorted(step_counts(store, run_id, "m")) == list(range(1000))
        wait_for_line(proc, "logged")
        time.sleep(1.5)  # a flush interval and then some
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    report = sync(spool)
    assert report.ok, report.errors
    counts = step_counts(store, run_id, "m")
    assert sorted(counts) == list(range(3000))
    assert set(counts.values()) == {1}
    assert pending(spool) == 0


def test_unwritable_spool_dir_warns_and_training_goes_on(tmp_path: Path) -> None:
    """In-process: the spool dir cannot be created (root ignores chmod, so use a file)."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    store = Store(uri)
    run_id = new_run(store)
    blocker = tmp_path / "blocker"
    blocker.write_text("a file where the spool dir should be")
    if os.geteuid() != 0:
        blocker.unlink()
        blocker.mkdir(mode=0o500)
    with pytest.warns(TrackingWarning, match="cannot write the tracking spool"):
        logger = RunLogger(uri, run_id, spool_dir=blocker / "spool")
    for step in range(500):
        logger.log_metric("m", float(step), step=step)
    assert logger.end(timeout=60)
    assert sorted(step_counts(store, run_id, "m")) == list(range(500))


@pytest.mark.server
@pytest.mark.skipif(not hasattr(signal, "SIGXFSZ"), reason="needs RLIMIT_FSIZE")
def test_spool_full_mid_run_warns_once_and_training_goes_on(
    tmp_path: Path, trainkit_server: MlflowServer
) -> None:
    """A real process whose spool file cannot grow past 64 KiB (EFBIG, as on a full disk)."""
    run_id = new_run(Store(trainkit_server.uri))

    def limit_file_size() -> None:
        import resource

        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a failed write, not a dead process
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))

    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    code = """
        import sys, time
        from pathlib import Path
        from trainkit_tracking._journal.run_logger import RunLogger
        logger = RunLogger(sys.argv[1], sys.argv[2], spool_dir=Path(sys.argv[3]),
                           flush_interval=0.1)
        for step in range(6000):
            logger.log_metrics({"a": step * 1.5, "b": step / 3}, step=step)
            if step % 500 == 0:
                time.sleep(0.2)  # several flush intervals: the file grows past the limit
        assert logger.end(timeout=120)
        print("done")
    """
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), trainkit_server.uri, run_id,
         str(tmp_path / "spool")],
        capture_output=True, text=True, env=env, timeout=300, preexec_fn=limit_file_size,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "done"
    assert result.stderr.count("cannot write the tracking spool") == 1, result.stderr
    store = Store(trainkit_server.uri)
    for key in ("a", "b"):
        counts = step_counts(store, run_id, key)
        assert sorted(counts) == list(range(6000)) and set(counts.values()) == {1}
    assert store.get_run(run_id).status == "FINISHED"


def test_interpreter_exit_sends_what_is_pending(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    uri = sqlite_copy(trainkit_sqlite_template, tmp_path / "mlflow.db")
    store = Store(uri)
    run_id = new_run(store)
    spool = tmp_path / "spool"
    code = """
        import sys
        from pathlib import Path
        from trainkit_tracking._journal.run_logger import RunLogger
        logger = RunLogger(sys.argv[1], sys.argv[2], spool_dir=Path(sys.argv[3]),
                           flush_interval=30.0)
        for step in range(1000):
            logger.log_metric("m", float(step), step=step)
        # no flush, no end: the exit hook sends it
    """
    proc = python(code, uri, run_id, str(spool))
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert sorted(step_counts(store, run_id, "m")) == list(range(1000))
    assert pending(spool) == 0 and list(spool.glob("*.jsonl")) == []


def test_interpreter_exit_with_the_store_down_is_bounded(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"  # nobody listens
    spool = tmp_path / "spool"
    code = """
        import sys
        from pathlib import Path
        from trainkit_tracking._journal.run_logger import RunLogger
        logger = RunLogger(sys.argv[1], "0" * 32, spool_dir=Path(sys.argv[2]))
        for step in range(100):
            logger.log_metric("m", float(step), step=step)
        print("logged", flush=True)
    """
    start = time.monotonic()
    proc = python(code, uri, str(spool))
    out, err = proc.communicate(timeout=120)
    took = time.monotonic() - start
    assert proc.returncode == 0, err
    assert out.strip() == "logged"
    assert took < 40, took  # the exit hook waits 10 s at most, on top of start-up
    assert "trainkit-tracking sync" in err  # it says what is left and what to do
    assert pending(spool) == 1
