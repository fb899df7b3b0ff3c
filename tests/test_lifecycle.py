"""Process lifecycle and failure bounds (SPEC sections 10 and 16): forks get their own state,
a store call answered too late leaves no orphan, a refused port gives up fast, a value the
store cannot take at creation is a clear error, and no credential is in any error chain."""

from __future__ import annotations

import contextlib
import os
import signal
import time
import traceback
from pathlib import Path

import pytest
from children import python, steps
from proxies import Proxy, wait_until

from trainkit_tracking import (
    RunSpec,
    StoreUnavailableError,
    Tracker,
    TrackingError,
    TrackingWarning,
)
from trainkit_tracking._store.store import Store
from trainkit_tracking.testing import MlflowServer, TrainkitStore

pytestmark = pytest.mark.default_sender

SPEC = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")


# --- forks ------------------------------------------------------------------------------

FORKED_EXITS = """
    import os, sys
    from trainkit_tracking import RunSpec, Tracker
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
    run = Tracker("forks", sys.argv[1]).start_run(spec)
    run.log_metric("parent", 1.0)
    codes = []
    for how in ("exit3", "error"):
        pid = os.fork()
        if pid == 0:
            run.log_metric("child-" + how, 1.0)
            if how == "exit3":
                sys.exit(3)
            raise RuntimeError("boom in the child")
        codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
    print("codes", *codes, run.id, flush=True)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_exits_with_its_own_code_and_hooks_do_not_recurse(
    trainkit_store: TrainkitStore,
) -> None:
    proc = python(FORKED_EXITS, trainkit_store.uri)
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == 0, err
    _, exit3, error, run_id = out.split()
    assert (exit3, error) == ("3", "1")  # sys.exit(3) exits 3; an uncaught error 1
    assert "RecursionError" not in err and err.count("boom in the child") == 1
    store = Store(trainkit_store.uri)
    record = store.get_run(run_id)
    assert record.status == "FINISHED"  # the children's exits are theirs, not the parent's
    assert steps(store, run_id, "child-exit3") == [0] and steps(store, run_id, "child-error") == [0]


PARENT_KILLED = """
    import os, sys, time
    from trainkit_tracking import RunSpec, Tracker
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
    run = Tracker("orphan", sys.argv[1]).start_run(spec)
    if os.fork() == 0:  # a DataLoader-like child that outlives its parent
        print("child", os.getpid(), flush=True)
        time.sleep(120)
        os._exit(0)
    for step in range(2000):
        run.log_metric("loss", float(step), step=step)
    run.flush(0.0)  # on its way; not waited for
    print("ids", run.id, flush=True)
    time.sleep(600)
"""


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_killed_parent_s_journal_is_sent_while_its_forked_child_lives(
    trainkit_store: TrainkitStore,
) -> None:
    proc = python(PARENT_KILLED, trainkit_store.uri)
    child = 0
    try:
        assert proc.stdout is not None
        lines = dict(proc.stdout.readline().split()[:2] for _ in range(2))
        run_id, child = lines["ids"], int(lines["child"])
        time.sleep(0.5)  # the spooler's tick: on disk
        os.kill(proc.pid, signal.SIGKILL)  # the parent dies; its child keeps running
        proc.wait(30)
        store = Store(trainkit_store.uri)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and len(steps(store, run_id, "loss")) < 2000:
            time.sleep(0.5)
        # The child's inherited descriptor did not keep the dead parent's file "live".
        assert steps(store, run_id, "loss") == list(range(2000))
    finally:
        proc.kill()
        if child:
            with contextlib.suppress(OSError):
                os.kill(child, signal.SIGKILL)


# --- store calls: late answers, refused ports, values refused at creation -----------------


@pytest.mark.server
def test_a_create_run_answered_after_the_deadline_leaves_no_orphan(
    trainkit_server: MlflowServer, tmp_path: Path
) -> None:
    store = Store(trainkit_server.uri)
    with Proxy(trainkit_server.uri) as proxy:
        tracker = Tracker(
            f"late-{tmp_path.name}",
            proxy.uri,
            timeout=3,
            spool_dir=tmp_path / "spool",
            cwd=tmp_path,  # the local store it falls back to
        )
        experiment_id = tracker.setup()[1]
        tracker.start_run(SPEC).end()  # the experiment's claims run exists: a claim is a param
        proxy.delay["/runs/create"] = 6.0  # the server creates it; we hear of it too late
        with pytest.warns(TrackingWarning, match="local store"):
            run = tracker.start_run(SPEC)  # gives up, and goes on in the local store
        assert tracker.offline and run.end()
        # The late answer's run, made in the server, is deleted, not left RUNNING beside it.
        assert wait_until(
            lambda: (
                len(store.search([experiment_id], include_deleted=True)) == 2
                and len(store.search([experiment_id])) == 1  # the warm-up run alone
            ),
            30,
        ), [(r.run_id, r.status) for r in store.search([experiment_id], include_deleted=True)]


@pytest.mark.server
def test_a_retried_create_run_finds_the_run_its_first_try_made(
    trainkit_server: MlflowServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # MLflow's own HTTP retries off: the SDK's retry is the one that runs.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    store = Store(trainkit_server.uri)
    with Proxy(trainkit_server.uri) as proxy:
        tracker = Tracker(f"retried-{tmp_path.name}", proxy.uri, spool_dir=tmp_path / "spool")
        experiment_id = tracker.setup()[1]
        tracker.start_run(SPEC).end()  # the experiment's claims run exists
        proxy.lose["/runs/create"] = 1  # the server makes the run; the client hears a 503
        run = tracker.start_run(SPEC.model_copy(update={"study_key_hash": "bbbbbbbb"}))
        assert run.end() and not tracker.offline
    made = store.search([experiment_id], include_deleted=True)
    assert len(made) == 2, [(r.run_id, r.name) for r in made]  # the warm-up run and this one
    assert run.id in {r.run_id for r in made}
    creation_id = store.get_run(run.id).tags["code.creation_id"]
    assert len(creation_id) == 32 and creation_id != "***"  # searchable, never masked


@pytest.mark.server
def test_a_server_that_died_is_given_up_on_within_five_seconds_on_the_first_call(
    trainkit_sqlite_template: Path, tmp_path: Path
) -> None:
    db = tmp_path / "server.db"
    db.write_bytes(trainkit_sqlite_template.read_bytes())
    server = MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts").start()
    try:
        tracker = Tracker(
            "died", server.uri, timeout=30, fallback_to_local=False, spool_dir=tmp_path / "s"
        )
        tracker.start_run(SPEC).end()  # the store is known, and answered
        server.stop()  # its port now refuses
        for _ in range(2):  # the first call after it died, and the next
            started = time.monotonic()
            with pytest.raises(StoreUnavailableError, match="connection refused") as caught:
                tracker.start_run(SPEC)
            waited = time.monotonic() - started
            assert waited < 5.0, waited
            # The message states the time really waited.
            said = float(str(caught.value).split(" within ")[1].split(" s")[0])
            assert abs(said - waited) < 1.0, (said, waited)
    finally:
        server.stop()


@pytest.mark.postgres
def test_a_nul_in_a_spec_tag_is_a_clear_error_at_start_run_not_a_fallback(
    trainkit_postgres_server: MlflowServer, tmp_path: Path
) -> None:
    tracker = Tracker(f"nul-spec-{tmp_path.name}", trainkit_postgres_server.uri, cwd=tmp_path)
    spec = SPEC.model_copy(update={"tags": {"note": "bad\x00value"}})
    started = time.monotonic()
    with pytest.raises(TrackingError, match="NUL"):
        tracker.start_run(spec)
    assert time.monotonic() - started < 5
    assert not tracker.offline  # no fallback to the local store


# --- no credential in any exception chain ----------------------------------------------------


def test_no_password_in_any_exception_chain(closed_port: int, tmp_path: Path) -> None:
    uri = f"http://alice:s3cr3t-pw@127.0.0.1:{closed_port}"
    tracker = Tracker("secret", uri, fallback_to_local=False, timeout=5, spool_dir=tmp_path)
    with pytest.raises(TrackingError) as caught:
        tracker.start_run(SPEC)
    text = "".join(traceback.format_exception(caught.value))
    assert "s3cr3t-pw" not in text, text
    link: BaseException | None = caught.value
    while link is not None:  # every link of the chain, printed or not
        assert "s3cr3t-pw" not in str(link)
        assert "s3cr3t-pw" not in repr(link.args)
        link = link.__cause__ or link.__context__


@pytest.mark.parametrize("policy", ["default", "seed"])
def test_a_secret_in_a_study_name_is_masked_before_the_name_is_cleaned(
    policy: str, trainkit_store: TrainkitStore
) -> None:
    from trainkit_tracking import NamingPolicy

    naming = NamingPolicy.seed() if policy == "seed" else NamingPolicy.default()
    tracker = Tracker("secret-name", trainkit_store.uri, policy=naming)
    spec = SPEC.model_copy(update={"study_name": "lr sweep password=hunter2X"})
    with tracker.start_run(spec) as run:
        pass
    record = Store(trainkit_store.uri).get_run(run.id)
    written = [record.name, *record.tags.values(), *record.params.values()]
    assert not any("hunter2" in text for text in written), written
    assert "password" in record.name  # the word stays; its value does not
