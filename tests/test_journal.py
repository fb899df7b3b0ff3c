"""The journal (SPEC section 16): one owner for everything logged, from the call to the store.

Each finding of issue 23 as a test through the public API, against real stores, with the
sender users get (a process of its own): one bad item costs only itself whatever its origin,
files are captured at the call and kept private, a deleted spool dir loses nothing, `sync`
finishes the job, senders end, and one store never has two senders.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import stat
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from children import python, steps
from proxies import Proxy

from trainkit_tracking import RunSpec, Tracker, TrackingWarning, sync
from trainkit_tracking._journal.ledger import read_set_aside
from trainkit_tracking._journal.sender_launch import senders
from trainkit_tracking._journal.spool import spool_paths
from trainkit_tracking._store.store import Store
from trainkit_tracking.testing import MlflowServer, TrainkitStore

pytestmark = [pytest.mark.default_sender, pytest.mark.slow]

SPEC = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
OTHER = SPEC.model_copy(update={"study_key_hash": "ef567890"})


def wait_for(what: str, condition: Any, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.2)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


def server_on_copy(tmp_path: Path, template: Path) -> MlflowServer:
    db = tmp_path / "server.db"
    shutil.copyfile(template, db)
    return MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts").start()


def stop_senders(spool: Path) -> None:
    """A test that is done with a spool dir: its sender processes need not linger."""
    for sender in senders(spool):
        pid = sender.get("pid")
        if isinstance(pid, int) and pid != os.getpid():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)


# --- one bad item costs only itself ------------------------------------------------------


def test_a_local_file_error_on_one_artifact_costs_only_that_artifact(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    tracker = Tracker("local-error", trainkit_store.uri, spool_dir=tmp_path / "spool")
    run, other = tracker.start_run(SPEC), tracker.start_run(OTHER)
    (tmp_path / "x").write_text("a file named x")
    (tmp_path / "y.txt").write_text("y")
    run.log_artifact(tmp_path / "x")  # artifacts/x is a file...
    run.log_artifact(tmp_path / "y.txt", "x")  # ...so artifacts/x/y.txt fails on this machine
    for step in range(100):
        run.log_metric("loss", float(step), step=step)
        other.log_metric("loss", float(step), step=step)
    with pytest.warns(TrackingWarning, match=rf"set aside artifact 'y.txt'.* of run {run.id}"):
        assert run.flush(60) is False  # the flush that covered it says so...
    run.log_metric("after", 1.0)
    assert run.flush(60) is True  # ...and only that one
    assert run.end() and other.end()
    store = Store(trainkit_store.uri)
    for run_id in (run.id, other.id):
        assert steps(store, run_id, "loss") == list(range(100))
        assert store.get_run(run_id).status == "FINISHED"
    (entry,) = read_set_aside(tmp_path / "spool")
    assert (entry["run"], entry["origin"]) == (run.id, "local")
    started = time.monotonic()
    report = sync(tmp_path / "spool", retry_set_aside=True)  # tried again: refused at once
    assert time.monotonic() - started < 30 and report.retried == 0
    assert len(read_set_aside(tmp_path / "spool")) == 1


OTHER_PROCESS = """
    import sys
    from trainkit_tracking import RunSpec, Tracker
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="12345678")
    run = Tracker("nul", sys.argv[1], fallback_to_local=False).start_run(spec)
    for step in range(50):
        run.log_metric("loss", float(step), step=step)
    print("ids", run.id, run.end(timeout=120), flush=True)
"""


@pytest.mark.postgres
def test_a_value_postgresql_refuses_is_set_aside_and_holds_back_nothing(
    trainkit_postgres_server: MlflowServer, tmp_path: Path
) -> None:
    uri, spool = trainkit_postgres_server.uri, tmp_path / "spool"
    tracker = Tracker(f"nul-{tmp_path.name}", uri, spool_dir=spool, fallback_to_local=False)
    bad, good = tracker.start_run(SPEC), tracker.start_run(OTHER)
    proc = python(OTHER_PROCESS, uri, env={"TRAINKIT_SPOOL_DIR": str(spool)})
    bad.log_params({"note": "a\x00b", "lr": 0.1})  # PostgreSQL: "cannot contain NUL"
    bad.set_tags({"phase": "train\x00"})
    for step in range(60):
        bad.log_metric("loss", float(step), step=step)
    for step in range(40):
        good.log_metric("loss", float(step), step=step)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert bad.flush(120) is False
    said = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    assert any("param 'note'" in m and bad.id in m for m in said), said
    assert good.flush(120) is True
    bad.log_metric("after", 1.0)
    assert bad.flush(120) is True
    assert bad.end(timeout=120) and good.end(timeout=120)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    other_id, ended = out.split()[1:3]
    assert ended == "True"
    store = Store(uri)
    assert steps(store, bad.id, "loss") == list(range(60))
    assert steps(store, good.id, "loss") == list(range(40))
    assert steps(store, other_id, "loss") == list(range(50))
    record = store.get_run(bad.id)
    assert record.params == {"lr": "0.1"} and "phase" not in record.tags
    assert {store.get_run(r).status for r in (bad.id, good.id, other_id)} == {"FINISHED"}
    aside = read_set_aside(spool)
    assert {e["what"] for e in aside} == {"param 'note'", "tag 'phase'"}
    assert {e["origin"] for e in aside} == {"store"}


# --- captured at the call, private --------------------------------------------------------


def test_files_are_captured_at_the_call_and_the_journal_is_private(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    run = Tracker("private", trainkit_store.uri, spool_dir=spool).start_run(SPEC)
    folder = tmp_path / "checkpoint"
    folder.mkdir()
    (folder / "weights.bin").write_bytes(b"w" * 100)
    run.log_artifacts(folder, "ckpt")
    shutil.rmtree(folder)  # gone right after the call
    run.log_dict(
        {"hf_token": "hf_SECRETVALUE", "db": {"password": "hunter2"}, "lr": 0.1}, "config.json"
    )
    run.log_text("see https://user:pa55word@example.invalid/x", "notes.txt")
    journal_bytes = b"".join(p.read_bytes() for p in spool.rglob("*") if p.is_file())
    for secret in (b"hf_SECRETVALUE", b"hunter2", b"pa55word"):
        assert secret not in journal_bytes  # masked before anything is written
    assert stat.S_IMODE(spool.stat().st_mode) == 0o700
    for path in spool.rglob("*"):
        if path.is_file() and not path.name.startswith("sender-"):
            assert stat.S_IMODE(path.stat().st_mode) == 0o600, path
    assert run.end()
    store = Store(trainkit_store.uri)
    down = Path(store.client.download_artifacts(run.id, "", str(tmp_path / "down")))
    assert (down / "ckpt" / "weights.bin").read_bytes() == b"w" * 100
    config = json.loads((down / "config.json").read_text())
    assert config == {"hf_token": "***", "db": {"password": "***"}, "lr": 0.1}
    assert "pa55word" not in (down / "notes.txt").read_text()


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="needs chown")
def test_a_spool_dir_of_another_user_is_refused_for_a_private_one(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    foreign = tmp_path / "shared-spool"
    foreign.mkdir(mode=0o777)
    os.chown(foreign, 65534, 65534)  # nobody's
    with pytest.warns(TrackingWarning, match="belongs to another user"):
        run = Tracker("foreign", trainkit_store.uri, spool_dir=foreign).start_run(SPEC)
        run.log_metric("loss", 1.0)
    assert run.end()
    assert list(foreign.iterdir()) == []  # nothing of ours in it
    assert steps(Store(trainkit_store.uri), run.id, "loss") == [0]


# --- the spool dir deleted, a forked child's set-aside entries ----------------------------


def test_a_spool_dir_deleted_mid_run_loses_nothing(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    run = Tracker("deleted-spool", trainkit_store.uri, spool_dir=spool).start_run(SPEC)
    for step in range(3000):
        run.log_metric("loss", float(step), step=step)
    shutil.rmtree(spool)  # a cleanup script, while the run logs
    with pytest.warns(TrackingWarning, match="was deleted"):
        for step in range(3000, 6000):
            run.log_metric("loss", float(step), step=step)
        assert run.flush(120)
    assert run.end(timeout=120)
    store = Store(trainkit_store.uri)
    assert steps(store, run.id, "loss") == list(range(6000))
    assert store.get_run(run.id).status == "FINISHED"


def test_a_temporary_spool_dir_is_removed_cleanly_and_its_sender_ends(
    trainkit_store: TrainkitStore,
) -> None:
    # A user's test suite: the spool in a TemporaryDirectory, removed once the runs ended.
    # The sender outlives the runs; it must neither break the removal nor make the
    # directory again.
    for _ in range(3):
        with tempfile.TemporaryDirectory(prefix="trainkit-spool-") as tmp:
            spool = Path(tmp) / "spool"
            tracker = Tracker("temporary-spool", trainkit_store.uri, spool_dir=spool)
            with tracker.start_run(SPEC) as run:
                run.log_metric("loss", 1.0)
            assert run.end()
            pids = [s["pid"] for s in senders(spool) if isinstance(s.get("pid"), int)]
            assert pids, "the sender process still runs: the case under test"
        wait_for("the senders to end", lambda pids=pids: not any(map(_alive, pids)), 30)
        assert not spool.exists() and not Path(tmp).exists()


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError:
        return False
    return True


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_s_refused_entries_survive_its_exit(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    spool = tmp_path / "spool"
    store = Store(trainkit_store.uri)
    run = Tracker("fork", trainkit_store.uri, spool_dir=spool).start_run(SPEC)
    run.log_metric("parent", 1.0)
    assert run.flush(60)
    store.client.delete_run(run.id)  # what the child logs is refused as a whole
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 1
        try:
            for step in range(10):
                run.log_metric("child", float(step), step=step)
            run.flush(60)
            code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    wait_for("the child's entries", lambda: read_set_aside(spool), 60)
    assert {e["run"] for e in read_set_aside(spool)} == {run.id}
    store.client.restore_run(run.id)
    report = sync(spool, retry_set_aside=True)
    assert report.retried >= 1 and read_set_aside(spool) == []
    assert steps(store, run.id, "child") == list(range(10))


# --- sync finishes the job; senders end ----------------------------------------------------

LOG_THEN_EXIT = """
    import sys
    from trainkit_tracking import RunSpec, Tracker
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
    run = Tracker("outage", sys.argv[1], fallback_to_local=False, timeout=5).start_run(spec)
    print("ids", run.id, flush=True)
    sys.stdin.readline()  # the store is killed now
    for step in range(3000):
        run.log_metric("loss", float(step), step=step)
    print("ended", run.end(timeout=2), flush=True)
"""


def _end_on_a_dead_store(proc: subprocess.Popen[str], server: MlflowServer) -> str:
    """LOG_THEN_EXIT's run id, once its store was killed and the child told to end the run."""
    assert proc.stdin is not None and proc.stdout is not None
    run_id = proc.stdout.readline().split()[1]
    assert server.pid is not None
    os.killpg(server.pid, signal.SIGKILL)
    proc.stdin.write("go\n")
    proc.stdin.flush()
    return run_id


def test_sync_wakes_a_backing_off_sender_and_returns_with_everything_stored(
    trainkit_sqlite_template: Path, tmp_path: Path
) -> None:
    server = server_on_copy(tmp_path, trainkit_sqlite_template)
    spool = tmp_path / "spool"
    proc = python(LOG_THEN_EXIT, server.uri, env={"TRAINKIT_SPOOL_DIR": str(spool)}, stdin=True)
    try:
        run_id = _end_on_a_dead_store(proc, server)
        assert proc.stdout is not None
        assert proc.stdout.readline().split()[1] == "False"  # not stored: the store is dead
        assert proc.wait(60) == 0
        wait_for("the sender to back off", lambda: senders(spool) and senders(spool)[0]["down"], 60)
        server.restart()
        report = sync(spool, tracking_uri=server.uri, timeout=60)  # wakes the live sender
        assert report.ok, report.errors
        assert report.pending == 0
        store = Store(server.uri)
        # Stored before sync returned: nothing left to wait for.
        assert steps(store, run_id, "loss") == list(range(3000))
        assert store.get_run(run_id).status == "FINISHED"
    finally:
        proc.kill()
        stop_senders(spool)
        server.stop()


def test_a_sender_ends_within_its_linger_once_no_writer_lives_store_down(
    trainkit_sqlite_template: Path, tmp_path: Path
) -> None:
    server = server_on_copy(tmp_path, trainkit_sqlite_template)
    spool = tmp_path / "spool"
    env = {"TRAINKIT_SPOOL_DIR": str(spool), "TRAINKIT_SENDER_LINGER": "5"}
    proc = python(LOG_THEN_EXIT, server.uri, env=env, stdin=True)
    try:
        run_id = _end_on_a_dead_store(proc, server)
        assert proc.wait(60) == 0
        wait_for("a sender", lambda: senders(spool), 30)
        # No writer lives and the store stays down: it gives up after 5 s (+ a backoff).
        wait_for("the sender to end", lambda: not senders(spool), 60)
        assert spool_paths(spool)  # the rest is left for sync
        server.restart()
        report = sync(spool, tracking_uri=server.uri, timeout=60)
        assert report.ok and report.pending == 0
        assert steps(Store(server.uri), run_id, "loss") == list(range(3000))
    finally:
        proc.kill()
        stop_senders(spool)
        server.stop()


# --- one store, one sender ---------------------------------------------------------------


@pytest.fixture
def counting_proxy(trainkit_server: MlflowServer) -> Iterator[tuple[str, dict[str, int]]]:
    with Proxy(trainkit_server.uri) as proxy:
        yield proxy.uri, proxy.points


TWO_MODES = """
    import sys
    from trainkit_tracking import RunSpec, Tracker
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local",
                   study_key_hash=sys.argv[2])
    run = Tracker("one-sender", sys.argv[1], fallback_to_local=False).start_run(spec)
    for step in range(2000):
        run.log_metric("loss", float(step), step=step)
        if step % 500 == 0:
            run.flush(60)
    print("ids", run.id, run.end(timeout=120), flush=True)
"""


@pytest.mark.server
def test_a_thread_sender_and_a_sender_process_never_both_send_one_store(
    counting_proxy: tuple[str, dict[str, int]], tmp_path: Path
) -> None:
    uri, points = counting_proxy
    spool = tmp_path / "spool"
    procs = [
        python(
            TWO_MODES, uri, digest, env={"TRAINKIT_SPOOL_DIR": str(spool), "TRAINKIT_SENDER": mode}
        )
        for digest, mode in (
            ("aaaa1111", "thread"),
            ("bbbb2222", "process"),
            ("cccc3333", "thread"),
        )
    ]
    ids = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        run_id, ended = out.split()[1:3]
        assert ended == "True"
        ids.append(run_id)
    # Whichever sender held the store's lock sent each point, exactly once.
    assert {run_id: points.get(run_id) for run_id in ids} == {run_id: 2000 for run_id in ids}
    stop_senders(spool)


def test_thread_mode_sends_from_the_training_process(
    trainkit_store: TrainkitStore, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TRAINKIT_SENDER", "thread")
    spool = tmp_path / "spool"
    run = Tracker("thread-mode", trainkit_store.uri, spool_dir=spool).start_run(SPEC)
    for step in range(500):
        run.log_metric("loss", float(step), step=step)
    assert run.flush(60)
    (sender,) = senders(spool)
    assert (sender["pid"], sender["mode"]) == (os.getpid(), "thread")
    assert run.end()
    assert steps(Store(trainkit_store.uri), run.id, "loss") == list(range(500))
