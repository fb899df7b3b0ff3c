"""Failure paths through the public API: every call bounded, clear errors, nothing lost.

A refused port, a socket that accepts and never answers, and a server SIGKILLed mid-run;
the elapsed time of each call is asserted against its bound (with slack for a loaded
machine, but a hang fails).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from trainkit_tracking import (
    ParamConflictError,
    RunSpec,
    StoreUnavailableError,
    TagKeyError,
    TagKeys,
    Tracker,
    TrackingError,
    TrackingWarning,
)
from trainkit_tracking.testing import MlflowServer, TrainkitStore, free_port, silent_server

SPEC = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
SLACK = 6.0  # a loaded 2-core machine; a hang is minutes

# The journal's own tests run the sender users get: a process of its own.
pytestmark = pytest.mark.default_sender


def cli(
    *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> tuple[int, str, float]:
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "trainkit_tracking", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, **(env or {})},
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - started


# --- refused, silent ------------------------------------------------------------------


def test_refused_port_raises_store_unavailable_within_five_seconds(tmp_path: Path) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    tracker = Tracker("x", uri, fallback_to_local=False, cwd=tmp_path, spool_dir=tmp_path / "s")
    started = time.monotonic()
    with pytest.raises(StoreUnavailableError) as caught:
        tracker.start_run(SPEC)
    elapsed = time.monotonic() - started
    assert elapsed < 5.0 + 1.0, elapsed
    error = caught.value
    assert isinstance(error, TrackingError)
    assert error.uri == uri and error.operation and error.waited < 6
    assert uri in str(error) and "refused" in str(error) and "timeout" in str(error)
    assert not (tmp_path / "mlruns").exists()  # no silent local run without the fallback


def test_refused_port_falls_back_to_the_local_store_and_marks_runs_for_push(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    uri = f"http://alice:s3cretpw@127.0.0.1:{free_port()}"
    # The local store exists already: what is timed is giving up, not migrating a new one.
    (tmp_path / "mlruns").mkdir()
    shutil.copyfile(trainkit_sqlite_template, tmp_path / "mlruns" / "mlflow.db")
    # exit_timeout: the first end waits for the sender process to start (importing mlflow:
    # seconds, more than the default 10 s on a loaded 2-core machine).
    tracker = Tracker("x", uri, cwd=tmp_path, spool_dir=tmp_path / "s", exit_timeout=120)
    started = time.monotonic()
    with pytest.warns(TrackingWarning, match="trainkit-tracking push") as caught:
        sweep = tracker.start_run(SPEC)
    assert time.monotonic() - started < 5.0 + SLACK
    assert all("s3cretpw" not in str(w.message) for w in caught)
    assert tracker.offline and tracker.tracking_uri.startswith("sqlite:///")
    assert str(tmp_path) in tracker.tracking_uri
    trial = sweep.child("hpo_trial", trial_number=0)
    trial.log_metric("loss", 0.5)
    assert trial.end() and sweep.end()
    tags = tracker.store.get_run(sweep.id).tags
    assert tags["code.push_to"] == "http://***@127.0.0.1:" + uri.rsplit(":", 1)[1]
    child = tracker.store.get_run(trial.id)
    assert child.parent_id == sweep.id and child.tags["code.push_to"] == tags["code.push_to"]
    assert child.metrics == {"loss": 0.5} and child.status == "FINISHED"


def test_offline_child_of_a_remote_parent_records_the_remote_parent_id(
    tmp_path: Path, trainkit_server: MlflowServer
) -> None:
    remote = Tracker("offline-parent", trainkit_server.uri, spool_dir=tmp_path / "s")
    with remote.start_run(SPEC) as sweep:
        env = sweep.subprocess_env(child=RunSpec(kind="hpo_trial", **{**_ids(), "trial_number": 1}))
    env["MLFLOW_TRACKING_URI"] = f"http://127.0.0.1:{free_port()}"  # the store went away
    child_tracker = Tracker.from_env(environ=env, cwd=tmp_path)
    with pytest.warns(TrackingWarning, match="push"):
        trial = child_tracker.attach()
    trial.end()
    record = child_tracker.store.get_run(trial.id)
    assert record.parent_id is None
    assert record.tags["code.remote_parent_id"] == sweep.id
    assert record.tags["code.push_to"].startswith("http://127.0.0.1:")


def _ids() -> dict[str, str]:
    return {"model": "bert", "environment": "local", "study_key_hash": "abcd1234"}


def test_silent_server_gives_up_at_the_deadline(tmp_path: Path) -> None:
    with silent_server() as uri:
        tracker = Tracker("x", uri, timeout=3, fallback_to_local=False, cwd=tmp_path)
        started = time.monotonic()
        with pytest.raises(StoreUnavailableError, match="did not answer"):
            tracker.setup()
        elapsed = time.monotonic() - started
    assert 2.5 <= elapsed < 3 + SLACK, elapsed


def test_environment_timeout_is_read_and_validated(tmp_path: Path) -> None:
    assert Tracker("x", environ={"TRAINKIT_TIMEOUT": "7.5"}).timeout == 7.5
    assert Tracker("x", environ={"TRAINKIT_EXIT_TIMEOUT": "2"}).exit_timeout == 2.0
    with pytest.raises(TrackingError, match=r"TRAINKIT_TIMEOUT='soon'"):
        Tracker("x", environ={"TRAINKIT_TIMEOUT": "soon"})
    with pytest.raises(ValueError, match="timeout"):
        Tracker("x", timeout=0)


@pytest.mark.parametrize("command", ["tree", "reap", "doctor"])
def test_cli_reports_a_refused_store_in_under_five_seconds(command: str) -> None:
    uri = f"http://127.0.0.1:{free_port()}"
    extra = ["--older-than", "2h"] if command == "reap" else []
    code, out, elapsed = cli(command, "--tracking-uri", uri, "-e", "x", *extra)
    assert code == 1, out
    assert elapsed < 5.0 + SLACK, elapsed
    assert "Traceback" not in out and "127.0.0.1" in out


@pytest.mark.parametrize("command", ["tree", "reap", "doctor", "sync"])
def test_cli_timeout_bounds_a_silent_store(command: str, tmp_path: Path) -> None:
    extra = {"reap": ["--older-than", "2h"], "sync": ["--spool-dir", str(tmp_path)]}
    # What starting the CLI and importing mlflow cost right now (seconds on a loaded box):
    # --timeout bounds the wait for the store, not the interpreter's start.
    fixed = time.monotonic()
    subprocess.run([sys.executable, "-c", "import mlflow.tracking"], check=True, timeout=120)
    fixed = time.monotonic() - fixed
    with silent_server() as uri:
        code, out, elapsed = cli(
            command, "--tracking-uri", uri, "-e", "x", "--timeout", "3s", *extra.get(command, [])
        )
    assert elapsed < 3 + fixed + SLACK, (elapsed, fixed, out)
    if command != "sync":  # nothing spooled: sync has nothing to send, so nothing to wait for
        assert code == 1, out
        assert "Traceback" not in out


# --- environment, handover, keys, ids ---------------------------------------------------


def test_malformed_rank_is_an_error_naming_the_variable() -> None:
    with pytest.raises(TrackingError, match=r"RANK='O'"):
        Tracker("x", environ={"RANK": "O"})


def test_seed_trial_number_that_is_not_a_number_is_named(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("seed", trainkit_store.uri)
    with tracker.start_run(SPEC) as sweep:
        env = {
            **tracker.handover_env(),
            "MLFLOW_PARENT_RUN_ID": sweep.id,
            "MLFLOW_TRIAL_NUMBER": "refit",
        }
        with pytest.raises(TrackingError, match=r"MLFLOW_TRIAL_NUMBER='refit'"):
            Tracker.from_env(environ=env).attach()


def test_seed_refit_handover_joins_the_refit_run(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("seed", trainkit_store.uri)
    with tracker.start_run(SPEC) as sweep:
        refit = sweep.child("hpo_refit", trial_number=3)
        env = {
            **tracker.handover_env(),
            "MLFLOW_RUN_ID": refit.id,
            "MLFLOW_PARENT_RUN_ID": sweep.id,
            "MLFLOW_TRIAL_NUMBER": "7",  # stale, from an earlier trial
        }
        joined = Tracker.from_env(environ=env).attach()
        assert joined.id == refit.id
        joined.log_metric("refit_loss", 0.1)
        joined.end()
        refit.end()
    children = tracker.store.search(
        [tracker.experiment_id], f"tags.`mlflow.parentRunId` = '{sweep.id}'"
    )
    assert [c.run_id for c in children] == [refit.id]
    assert tracker.store.get_run(refit.id).metrics == {"refit_loss": 0.1}


def test_tag_keys_refuse_to_remap_mlflows_own_tags() -> None:
    with pytest.raises(TagKeyError, match=r"mlflow\.parentRunId"):
        TagKeys.from_dict({"parent_run_id": "code.parent_run_id"})
    with pytest.raises(TagKeyError, match=r"mlflow\.runName"):
        TagKeys.from_dict({"mlflow_run_name": "code.name"})
    assert TagKeys.from_dict({"parent_run_id": "mlflow.parentRunId"}) == TagKeys.default()


@pytest.mark.parametrize(
    ("training_id", "variant"),
    [
        ("spec-81710c33-exec-30fd8453/v2", 2),
        ("spec_abcdef1234_exec_0123abcd99", 1),
        ("spec_ABCDEF12_exec_0123ABCD/v3", 3),
    ],
)
def test_seed_conversion_id_forms_are_accepted(training_id: str, variant: int) -> None:
    from trainkit_tracking import NamingPolicy

    spec = RunSpec(
        kind="conversion",
        model="bert",
        environment="local",
        conv_fp="feedbeef",
        parent_training_id=training_id,
    )
    name = NamingPolicy.seed().base_name(spec)  # the seed's names, for the seed's id forms
    assert name.endswith(f"_v{variant}_conv-feedbeef")
    default = NamingPolicy.default().base_name(spec)
    assert default.startswith("conv feedbeef ") and f" v{variant} bert " in default
    assert "spec-" in name and "exec-" in name and name == name.lower()


def test_param_conflict_error_carries_key_values_and_run(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("conflict", trainkit_store.uri)
    with tracker.start_run(SPEC) as run:
        run.log_params({"lr": 0.1})
        with pytest.raises(ParamConflictError) as caught:
            run.log_params({"lr": 0.2})
    error = caught.value
    assert (error.key, error.old, error.new, error.run_id) == ("lr", "0.1", "0.2", run.id)


# --- a server that dies -------------------------------------------------------------------

EXIT_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from trainkit_tracking import RunSpec, Tracker
    uri, go, mode = sys.argv[1], sys.argv[2], sys.argv[3]
    tracker = Tracker("exits", uri, exit_timeout=4, fallback_to_local=False)
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
    with tracker.start_run(spec) as sweep:
        with sweep.child("hpo_trial", trial_number=0) as trial:
            with trial.child("hpo_trial_fold", fold_idx=0) as fold:
                for step in range(300):
                    fold.log_metrics({"loss": 1 / (step + 1)}, step=step)
                    trial.log_metrics({"t": float(step)}, step=step)
                    sweep.log_metrics({"s": float(step)}, step=step)
                assert fold.flush(60)
                print("ids", sweep.id, trial.id, fold.id, flush=True)
                while not os.path.exists(go):
                    time.sleep(0.01)
                for step in range(300, 600):  # logged while the store is dead
                    fold.log_metrics({"loss": 1 / (step + 1)}, step=step)
                    trial.log_metrics({"t": float(step)}, step=step)
                    sweep.log_metrics({"s": float(step)}, step=step)
                print("logged", flush=True)
                if mode == "sigterm":
                    time.sleep(600)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["normal", "sigterm"])
def test_exit_with_three_open_runs_and_a_dead_store_is_bounded_and_sync_finishes_them(
    tmp_path: Path, trainkit_sqlite_template: Path, mode: str
) -> None:
    import shutil

    db = tmp_path / "mlflow.db"
    shutil.copyfile(trainkit_sqlite_template, db)
    server = MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts").start()
    spool = tmp_path / "spool"
    go = tmp_path / "go"
    # The process sends its own spool, and `sync` the rest (test_sender.py: the sender
    # process, which needs no sync).
    env = {
        **os.environ,
        "TRAINKIT_SPOOL_DIR": str(spool),
        "PYTHONUNBUFFERED": "1",
        "TRAINKIT_SENDER": "thread",
    }
    proc = subprocess.Popen(
        [sys.executable, "-c", EXIT_SCRIPT, server.uri, str(go), mode],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("ids"), line + (proc.stderr.read() if proc.stderr else "")
        ids = line.split()[1:]
        assert server.pid is not None
        os.killpg(server.pid, signal.SIGKILL)
        time.sleep(0.2)
        go.touch()
        assert proc.stdout.readline().strip() == "logged"
        started = time.monotonic()
        if mode == "sigterm":
            proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=120)
        elapsed = time.monotonic() - started
        assert elapsed < 4 + SLACK, (elapsed, err)
        assert err.count("trainkit-tracking sync") == 1, err  # one warning that says what to do
        server.restart()
        code, out, _ = cli("sync", "--tracking-uri", server.uri, "--spool-dir", str(spool))
        assert code == 0, out
        from trainkit_tracking._store.store import Store

        store = Store(server.uri)
        want = "FINISHED" if mode == "normal" else "KILLED"
        for run_id, key in zip(ids, ("s", "t", "loss"), strict=True):
            record = store.get_run(run_id)
            assert record.status == want, (run_id, record.status)
            if mode == "sigterm":
                assert record.tags.get("code.interrupted") == "true"
            steps = sorted(m.step for m in store.client.get_metric_history(run_id, key))
            assert steps == list(range(600)), (key, len(steps))
    finally:
        proc.kill()
        server.stop()


def test_no_credential_anywhere_across_an_outage(
    tmp_path: Path, trainkit_sqlite_template: Path, caplog: pytest.LogCaptureFixture
) -> None:
    import logging
    import shutil
    import warnings

    secret = "s3cretpw"
    db = tmp_path / "mlflow.db"
    shutil.copyfile(trainkit_sqlite_template, db)
    server = MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts").start()
    uri = server.uri.replace("http://", f"http://alice:{secret}@")
    spool = tmp_path / "spool"
    texts: list[str] = []
    caplog.set_level(logging.DEBUG)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            tracker = Tracker(
                "leaks", uri, timeout=3, exit_timeout=3, fallback_to_local=False, spool_dir=spool
            )
            run = tracker.start_run(SPEC)
            run.log_params({"db": uri, "hf_token": "hf_" + "a" * 34})
            run.log_metric("m", 1.0)
            assert run.flush(30)
            texts += [repr(run), repr(tracker), repr(run._logger), str(run.url)]
            assert server.pid is not None
            os.killpg(server.pid, signal.SIGKILL)
            for step in range(50):
                run.log_metric("m", float(step), step=step)
            assert run.end() is False
            with pytest.raises(StoreUnavailableError) as unavailable:
                tracker.start_run(SPEC.model_copy(update={"study_key_hash": "00000000"}))
            texts += [str(unavailable.value), repr(unavailable.value), str(unavailable.value.uri)]
            code, out, _ = cli("doctor", "--tracking-uri", uri, "--timeout", "3s", "--debug")
            texts.append(out)
            code, out, _ = cli("sync", "--tracking-uri", uri, "--spool-dir", str(spool), "--debug")
            texts.append(out)
        texts += [str(w.message) for w in caught]
        texts += [caplog.text]
        texts += [r.getMessage() for r in caplog.records]
        spooled = [p.read_bytes() for p in spool.rglob("*") if p.is_file()]
        assert spooled, "the outage left data in the spool"
        texts += [b.decode("utf-8", "replace") for b in spooled]
        texts += [p.name for p in spool.rglob("*")]
        leaks = [t for t in texts if secret in t]
        assert not leaks, leaks[:3]
        server.restart()
        assert run.flush(60)  # this process's sender delivers once the store is back
        code, out, _ = cli("sync", "--tracking-uri", uri, "--spool-dir", str(spool))
        assert code == 0 and secret not in out, out
        from trainkit_tracking._store.store import Store

        record = Store(server.uri).get_run(run.id)
        assert record.status == "FINISHED"
        assert record.params["db"] == server.uri.replace("http://", "http://***@")
    finally:
        server.stop()


@pytest.mark.slow
def test_runs_made_while_the_server_is_down_are_pushed_by_push_with_no_arguments(
    tmp_path: Path, trainkit_sqlite_template: Path
) -> None:
    import shutil

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    work = tmp_path / "work"
    work.mkdir()
    script = textwrap.dedent(
        """
        import sys
        from trainkit_tracking import RunSpec, Tracker
        tracker = Tracker("offline-e2e", sys.argv[1])
        spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="abcd1234")
        with tracker.start_run(spec) as sweep:
            for number in range(2):
                with sweep.child("hpo_trial", trial_number=number) as trial:
                    for step in range(20):
                        trial.log_metric("loss", 1.0 / (step + 1), step=step)
        print(sweep.id, tracker.offline, flush=True)
        """
    )
    env = {**os.environ, "TRAINKIT_SPOOL_DIR": str(tmp_path / "spool")}
    done = subprocess.run(
        [sys.executable, "-c", script, uri],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    sweep_id, offline = done.stdout.split()
    assert offline == "True"
    assert "trainkit-tracking push" in done.stderr  # the exit message lists the offline runs
    doctor = subprocess.run(
        [
            sys.executable,
            "-m",
            "trainkit_tracking",
            "doctor",
            "--tracking-uri",
            uri,
            "--timeout",
            "3s",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert "3 runs in the local store" in doctor.stdout, doctor.stdout
    db = tmp_path / "server.db"
    shutil.copyfile(trainkit_sqlite_template, db)
    server = MlflowServer(f"sqlite:///{db}", tmp_path / "artifacts", port=port).start()
    try:
        pushed = subprocess.run(
            [sys.executable, "-m", "trainkit_tracking", "push"],
            cwd=work,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert pushed.returncode == 0, pushed.stdout + pushed.stderr
        from trainkit_tracking._store.store import Store

        store = Store(server.uri)
        (experiment,) = [e for e in store.list_experiments() if e.name == "offline-e2e"]
        runs = store.search([experiment.experiment_id])
        assert len(runs) == 3
        (sweep,) = [r for r in runs if r.parent_id is None]
        assert sweep.tags["code.pushed_from"].endswith(":" + sweep_id)
        trials = [r for r in runs if r.parent_id == sweep.run_id]
        assert len(trials) == 2 and all(r.status == "FINISHED" for r in runs)
        for trial in trials:
            steps = [m.step for m in store.client.get_metric_history(trial.run_id, "loss")]
            assert sorted(steps) == list(range(20))
        again = subprocess.run(
            [sys.executable, "-m", "trainkit_tracking", "push"],
            cwd=work,
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert again.returncode == 0 and len(store.search([experiment.experiment_id])) == 3
    finally:
        server.stop()
