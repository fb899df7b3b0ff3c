"""push: whole pipeline trees copied between real stores, exactly once, incrementally, after kills."""

from __future__ import annotations

import contextlib
import math
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from mlflow import MlflowClient

from trainkit_tracking import Lineage, PushReport, RunSpec, Tracker, TrackingError, push
from trainkit_tracking._store.store import Store
from trainkit_tracking.cli import cli
from trainkit_tracking.testing import TrainkitStore

STUDY = "350a79aa0000ffff"
EXPERIMENTS = ("pipeline", "conversions")


@pytest.fixture
def target(trainkit_sqlite_template: Path, tmp_path: Path) -> str:
    """A second, empty sqlite store (a copy of the migrated template)."""
    db = tmp_path / "target" / "mlflow.db"
    db.parent.mkdir()
    shutil.copyfile(trainkit_sqlite_template, db)
    return f"sqlite:///{db}"


def spec(kind: str, **fields: Any) -> RunSpec:
    base: dict[str, Any] = {"kind": kind, "model": "distilbert", "environment": "local"}
    base.update(fields)
    return RunSpec(**base)


def build_pipeline(uri: str, tmp_path: Path) -> dict[str, str]:
    """sweep -> trials -> folds, refit, final (lineage), benchmark, conversion elsewhere."""
    tracker = Tracker("pipeline", uri, project="ner")
    other = Tracker("conversions", uri, project="ner")
    ids: dict[str, str] = {}
    sweep_spec = spec("hpo_sweep", study_name="ner study", study_key_hash=STUDY)
    with tracker.start_run(sweep_spec) as sweep:
        ids["sweep"] = sweep.id
        sweep.log_params({"search": {"space": "small", "trials": 2}})
        for number in (0, 1):
            with sweep.child(
                "hpo_trial", trial_number=number, trial_key_hash=f"trial{number}xx"
            ) as trial:
                ids[f"trial{number}"] = trial.id
                for fold in (0, 1):
                    with trial.child("hpo_trial_fold", fold_idx=fold) as fold_run:
                        ids[f"fold{number}{fold}"] = fold_run.id
                        for step in range(20):
                            fold_run.log_metrics(
                                {"loss": 1.0 / (step + 1), "acc": step / 20}, step=step
                            )
                trial.log_metric("val_loss", 0.5 - number / 10)
        with sweep.child("hpo_refit", trial_number=1, trial_key_hash="trial1xx") as refit:
            ids["refit"] = refit.id
            refit.log_metric("nan_metric", math.nan, step=0)
    final_spec = spec(
        "final_training", spec_fp="abc123de99", exec_fp="fedcba9876", variant=2,
        lineage=tracker.lineage(ids["refit"]),
    )  # fmt: skip
    notes = tmp_path / "notes.txt"
    notes.write_text("trained on everything\n")
    with tracker.start_run(final_spec) as final:
        ids["final"] = final.id
        final.log_params({"lr": 3e-5, "epochs": 3})
        for step in range(50):
            final.log_metric("loss", 2.0 / (step + 1), step=step)
        final.log_artifact(str(notes), "reports")
        final.log_dict({"labels": ["O", "PER"]}, "config/labels.json")
    bench = spec(
        "benchmarking", study_key_hash=STUDY, trial_key_hash="trial1xx",
        benchmark_config_hash="bench5678",
        lineage=Lineage(hpo_trial_run_id=ids["trial1"], hpo_sweep_run_id=ids["sweep"]),
    )  # fmt: skip
    with tracker.start_run(bench) as bench_run:
        ids["bench"] = bench_run.id
        bench_run.log_metric("latency_ms", 12.5)
    conversion = spec(
        "conversion", conv_fp="conv0000aa", parent_training_id="spec_abc123de99_exec_fedcba9876/v2",
        lineage=Lineage(source="final_training", parent_training_run_id=ids["final"]),
    )  # fmt: skip
    with other.start_run(conversion) as conversion_run:
        ids["conversion"] = conversion_run.id
    tracker.close()
    other.close()
    return ids


def runs_of(uri: str, name: str) -> list[Any]:
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name(name)
    assert experiment is not None, name
    return list(client.search_runs([experiment.experiment_id], max_results=1000))


def history(uri: str, run_id: str, key: str) -> list[tuple[int, int, float | str]]:
    points = MlflowClient(uri).get_metric_history(run_id, key)
    return sorted((m.step, m.timestamp, "nan" if math.isnan(m.value) else m.value) for m in points)


def target_map(uri: str, store_id: str) -> dict[str, Any]:
    """source run id -> target run, through code.pushed_from."""
    found: dict[str, Any] = {}
    for name in EXPERIMENTS:
        for run in runs_of(uri, name):
            origin = run.data.tags["code.pushed_from"]
            sid, source_run_id = origin.split(":")
            assert sid == store_id
            assert source_run_id not in found
            found[source_run_id] = run
    return found


def check_copy(source: str, target: str, ids: dict[str, str], report: PushReport) -> None:
    assert report.store_id
    copies = target_map(target, report.store_id)
    assert set(copies) == set(ids.values())
    to_target = {sid: run.info.run_id for sid, run in copies.items()}
    assert not set(to_target.values()) & set(ids.values())  # new ids in the target
    src_client = MlflowClient(source)
    for key, source_id in ids.items():
        original = src_client.get_run(source_id)
        copy = copies[source_id]
        assert copy.info.run_name == original.info.run_name, key
        assert copy.info.status == original.info.status == "FINISHED", key
        assert copy.info.start_time == original.info.start_time, key
        assert copy.info.end_time == original.info.end_time, key
        assert copy.data.params == original.data.params, key
        for metric in original.data.metrics:
            assert history(target, copy.info.run_id, metric) == history(source, source_id, metric)
        src_tags = dict(original.data.tags)
        tgt_tags = dict(copy.data.tags)
        parent = src_tags.pop("mlflow.parentRunId", None)
        assert tgt_tags.pop("mlflow.parentRunId", None) == (parent and to_target[parent]), key
        for tag, value in src_tags.items():
            expected = (
                to_target[value]
                if tag.startswith("code.lineage.") and value in to_target
                else value
            )
            if tag == "mlflow.note.content":  # the lineage description names target runs
                for source_run, target_run in to_target.items():
                    expected = expected.replace(source_run, target_run)
            assert tgt_tags[tag] == expected, (key, tag)
    final = copies[ids["final"]]
    assert final.data.tags["code.lineage.hpo_refit_run_id"] == to_target[ids["refit"]]
    assert final.data.tags["code.lineage.hpo_sweep_run_id"] == to_target[ids["sweep"]]
    bench = copies[ids["bench"]].data.tags
    assert bench["code.lineage.parent_training_run_id"] == to_target[ids["trial1"]]
    conversion = copies[ids["conversion"]]
    assert conversion.data.tags["code.lineage.parent_training_run_id"] == to_target[ids["final"]]
    assert copies[ids["fold11"]].data.tags["mlflow.parentRunId"] == to_target[ids["trial1"]]
    files = {f.path for f in MlflowClient(target).list_artifacts(final.info.run_id, "reports")}
    assert files == {"reports/notes.txt"}
    labels = MlflowClient(target).download_artifacts(final.info.run_id, "config/labels.json")
    assert "PER" in Path(labels).read_text()
    assert history(target, copies[ids["refit"]].info.run_id, "nan_metric") == history(
        source, ids["refit"], "nan_metric"
    )


def counts(uri: str) -> dict[str, int]:
    client = MlflowClient(uri)
    runs = [run for name in EXPERIMENTS for run in runs_of(uri, name)]
    return {
        "runs": len(runs),
        "points": sum(
            len(client.get_metric_history(r.info.run_id, k)) for r in runs for k in r.data.metrics
        ),
        "params": sum(len(r.data.params) for r in runs),
        "tags": sum(len(r.data.tags) for r in runs),
    }


# The whole tree ------------------------------------------------------------------


def test_pipeline_tree_sqlite_to_sqlite_exactly_once(
    trainkit_store: TrainkitStore, target: str, tmp_path: Path
) -> None:
    ids = build_pipeline(trainkit_store.uri, tmp_path)
    seen: list[tuple[int, int, int]] = []
    report = push(trainkit_store.uri, target, progress=lambda *a: seen.append(a))
    assert report.created == len(ids) and report.updated == 0
    assert report.points == counts(trainkit_store.uri)["points"] > 0
    assert sorted(report.experiments_created) == sorted(EXPERIMENTS)
    assert seen[-1] == (len(ids), len(ids), report.points)
    check_copy(trainkit_store.uri, target, ids, report)
    before = counts(target)

    again = push(trainkit_store.uri, target)
    assert (again.created, again.updated, again.unchanged) == (0, 0, len(ids))
    assert again.points == 0 and again.store_id == report.store_id
    assert counts(target) == before
    verified = push(trainkit_store.uri, target, verify=True)  # full comparison: still nothing
    assert (verified.created, verified.updated, verified.points) == (0, 0, 0)
    assert counts(target) == before


def test_tree_order_parents_before_children(
    trainkit_store: TrainkitStore, target: str, tmp_path: Path
) -> None:
    ids = build_pipeline(trainkit_store.uri, tmp_path)
    report = push(trainkit_store.uri, target)
    order = [run.source_run_id for run in report.runs]
    position = {run_id: i for i, run_id in enumerate(order)}
    client = MlflowClient(trainkit_store.uri)
    for run_id in ids.values():
        parent = client.get_run(run_id).data.tags.get("mlflow.parentRunId")
        if parent:
            assert position[parent] < position[run_id]
    assert position[ids["final"]] < position[ids["conversion"]]
    assert position[ids["refit"]] < position[ids["final"]]


@pytest.mark.server
def test_pipeline_tree_sqlite_to_server_by_cli(
    trainkit_store: TrainkitStore, trainkit_server: Any, tmp_path: Path
) -> None:
    ids = build_pipeline(trainkit_store.uri, tmp_path)
    names = {"pipeline": "pipeline-srv", "conversions": "conversions-srv"}
    db = sqlite3.connect(trainkit_store.db_path)  # distinct experiment names on the shared server
    with contextlib.closing(db), db:
        for old, new in names.items():
            db.execute("UPDATE experiments SET name = ? WHERE name = ?", (new, old))
    command = [sys.executable, "-m", "trainkit_tracking", "push"]
    args = ["--from", trainkit_store.uri, "--to", trainkit_server.uri]
    first = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert f"pushed {len(ids)} runs" in first.stdout and f"{len(ids)} created" in first.stdout
    second = subprocess.run([*command, *args], capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert f"0 created, 0 updated, {len(ids)} unchanged; 0 points" in second.stdout
    client = MlflowClient(trainkit_server.uri)
    copies: dict[str, Any] = {}
    for name in names.values():
        exp = client.get_experiment_by_name(name)
        assert exp is not None
        for run in client.search_runs([exp.experiment_id]):
            copies[run.data.tags["code.pushed_from"].split(":")[1]] = run
    assert set(copies) == set(ids.values())
    to_target = {sid: run.info.run_id for sid, run in copies.items()}
    final = copies[ids["final"]].data.tags
    assert final["code.lineage.hpo_refit_run_id"] == to_target[ids["refit"]]
    assert copies[ids["fold01"]].data.tags["mlflow.parentRunId"] == to_target[ids["trial0"]]
    assert (
        copies[ids["conversion"]].data.tags["code.lineage.parent_training_run_id"]
        == (to_target[ids["final"]])
    )
    fold = copies[ids["fold10"]].info.run_id
    assert history(trainkit_server.uri, fold, "loss") == history(
        trainkit_store.uri, ids["fold10"], "loss"
    )
    files = client.list_artifacts(copies[ids["final"]].info.run_id, "config")
    assert [f.path for f in files] == ["config/labels.json"]


@pytest.mark.postgres
def test_push_into_postgres_server_twice(
    trainkit_store: TrainkitStore, trainkit_postgres_server: Any
) -> None:
    tracker = Tracker("push-pg")
    sweep = tracker.start_run(spec("hpo_sweep", study_key_hash=STUDY))
    with sweep, sweep.child("hpo_trial", trial_number=0) as trial:
        for step in range(30):
            trial.log_metrics({"loss": 1 / (step + 1), "nan": math.nan}, step=step)
    tracker.close()
    first = push(trainkit_store.uri, trainkit_postgres_server.uri)
    assert first.created == 2 and first.points == 60
    again = push(trainkit_store.uri, trainkit_postgres_server.uri, verify=True)
    assert (again.created, again.points) == (0, 0)
    client = MlflowClient(trainkit_postgres_server.uri)
    exp = client.get_experiment_by_name("push-pg")
    assert exp is not None
    copies = client.search_runs([exp.experiment_id])
    child = next(r for r in copies if r.data.tags["code.pushed_from"].endswith(trial.id))
    assert len(client.get_metric_history(child.info.run_id, "nan")) == 30


# Incremental ---------------------------------------------------------------------


def test_resumed_run_sends_only_new_points(trainkit_store: TrainkitStore, target: str) -> None:
    tracker = Tracker("pipeline")
    trial_spec = spec("hpo_trial", study_key_hash=STUDY, trial_number=3)
    run = tracker.start_run(trial_spec)
    for step in range(10):
        run.log_metric("loss", 1.0 / (step + 1), step=step)
    run.log_params({"lr": 0.1})
    run.end("KILLED")
    first = push(trainkit_store.uri, target)
    assert (first.created, first.points) == (1, 10)

    resumed = tracker.start_run(trial_spec, resume=True)
    assert resumed.id == run.id
    for step in range(10, 15):
        resumed.log_metrics({"loss": 1.0 / (step + 1), "acc": 0.9}, step=step)
    resumed.set_tags({"note": "resumed"})
    resumed.end()
    tracker.close()
    second = push(trainkit_store.uri, target)
    assert (second.created, second.updated, second.points) == (0, 1, 10)
    (copy,) = runs_of(target, "pipeline")
    assert copy.info.status == "FINISHED" and copy.data.tags["note"] == "resumed"
    assert len(history(target, copy.info.run_id, "loss")) == 15
    assert len(history(target, copy.info.run_id, "acc")) == 5
    assert push(trainkit_store.uri, target).points == 0


def test_point_logged_behind_the_latest_is_found_by_verify(
    trainkit_store: TrainkitStore, target: str
) -> None:
    store = Store(trainkit_store.uri)
    experiment_id = store.get_or_create_experiment("pipeline")
    run = store.create_run(experiment_id, "late", {})
    store.log_batch(run.run_id, metrics=[("loss", 0.5, 2000, 10)])
    store.terminate(run.run_id, "FINISHED", 3000)
    assert push(trainkit_store.uri, target).points == 1
    # A point with a lower step and timestamp leaves the run's latest point alone:
    store.log_batch(run.run_id, metrics=[("loss", 0.9, 1000, 1)])
    assert push(trainkit_store.uri, target, dry_run=True).points == 0
    verified = push(trainkit_store.uri, target, verify=True)
    assert verified.points == 1
    (copy,) = runs_of(target, "pipeline")
    assert history(target, copy.info.run_id, "loss") == [(1, 1000, 0.9), (10, 2000, 0.5)]


def test_dry_run_writes_nothing(trainkit_store: TrainkitStore, target: str, tmp_path: Path) -> None:
    ids = build_pipeline(trainkit_store.uri, tmp_path)
    expected = counts(trainkit_store.uri)["points"]
    result = CliRunner().invoke(
        cli, ["push", "--from", trainkit_store.uri, "--to", target, "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.count("would create ") == len(ids)
    assert "warning" not in result.stderr  # children map to parents that would be created
    assert f"{expected} points" in result.stdout.splitlines()[-1]
    assert MlflowClient(target).get_experiment_by_name("pipeline") is None
    # The source got no store id either: a dry run writes nowhere.
    assert MlflowClient(trainkit_store.uri).get_experiment_by_name(".trainkit-store") is None


# Killed mid-way ------------------------------------------------------------------

_PUSH_SCRIPT = textwrap.dedent(
    """
    import sys
    from trainkit_tracking import push
    push(sys.argv[1], sys.argv[2])
    """
)


def _target_points(db: Path) -> int:
    with contextlib.closing(sqlite3.connect(db, timeout=30)) as conn:
        try:
            return int(conn.execute("SELECT COUNT(*) FROM metrics").fetchone()[0])
        except sqlite3.OperationalError:  # locked by the writer for a moment
            return 0


def test_push_killed_mid_way_completes_on_rerun(
    trainkit_store: TrainkitStore, target: str, tmp_path: Path
) -> None:
    store = Store(trainkit_store.uri)
    experiment_id = store.get_or_create_experiment("big")
    run = store.create_run(experiment_id, "big-run", {})
    keys = ("loss", "acc", "lr")
    points = [(key, step / 7, 1_000_000 + step, step) for key in keys for step in range(10_000)]
    for start in range(0, len(points), 1000):
        store.log_batch(run.run_id, metrics=points[start : start + 1000])
    store.terminate(run.run_id, "FINISHED", 2_000_000)
    db = Path(target[len("sqlite:///") :])
    proc = subprocess.Popen([sys.executable, "-c", _PUSH_SCRIPT, trainkit_store.uri, target])
    try:
        deadline = time.monotonic() + 120
        while _target_points(db) == 0:
            assert proc.poll() is None, "push ended before it was seen writing"
            assert time.monotonic() < deadline, "push wrote nothing within 120 s"
        os.kill(proc.pid, signal.SIGKILL)
    finally:
        proc.wait(timeout=30)
    sent = _target_points(db)
    assert 0 < sent < len(points)  # killed mid-way
    report = push(trainkit_store.uri, target)
    assert report.created == 0 and report.points == len(points) - sent
    (copy,) = runs_of(target, "big")
    assert copy.info.status == "FINISHED" and copy.info.end_time == 2_000_000
    client = MlflowClient(target)
    for key in keys:
        steps = Counter(m.step for m in client.get_metric_history(copy.info.run_id, key))
        assert steps == Counter(range(10_000)), key
    assert push(trainkit_store.uri, target).points == 0


# Marked runs, targets, errors ---------------------------------------------------


def test_marked_runs_go_to_their_recorded_target(
    trainkit_store: TrainkitStore, target: str
) -> None:
    remote = Store(target)
    remote_exp = remote.get_or_create_experiment("pipeline")
    remote_sweep = remote.create_run(remote_exp, "online-sweep", {}).run_id
    tracker = Tracker("pipeline")  # the local store of this machine (cwd/mlruns/mlflow.db)
    offline = {"code.push_to": target, "code.remote_parent_id": remote_sweep}
    with tracker.start_run(spec("hpo_trial", study_key_hash=STUDY, trial_number=0)) as trial:
        trial.set_tags(offline)
        trial.log_metric("loss", 0.25, step=1)
        with trial.child("hpo_trial_fold", fold_idx=0) as fold:
            fold.set_tags({"code.push_to": target})
            fold.log_metric("loss", 0.5)
    with tracker.start_run(spec("hpo_trial", study_key_hash=STUDY, trial_number=9)) as unmarked:
        unmarked.log_metric("loss", 1.0)
    local_sweep = tracker.start_run(spec("hpo_sweep", study_key_hash="bbbb0000"))
    with local_sweep, local_sweep.child("hpo_trial", trial_number=1) as marked_child:
        marked_child.set_tags({"code.push_to": target})  # its unmarked parent must go too
    tracker.close()

    report = push()  # no --from, no --to
    assert report.source == trainkit_store.uri
    pushed = {trial.id, fold.id, local_sweep.id, marked_child.id}
    assert {r.source_run_id for r in report.runs} == pushed
    copies = {
        r.data.tags["code.pushed_from"].split(":")[1]: r
        for r in runs_of(target, "pipeline")
        if "code.pushed_from" in r.data.tags
    }
    assert set(copies) == pushed
    assert copies[marked_child.id].data.tags["mlflow.parentRunId"] == (
        copies[local_sweep.id].info.run_id
    )
    assert copies[trial.id].data.tags["mlflow.parentRunId"] == remote_sweep
    assert copies[fold.id].data.tags["mlflow.parentRunId"] == copies[trial.id].info.run_id
    assert "code.push_to" not in copies[trial.id].data.tags
    assert unmarked.id not in copies
    assert push().unchanged == 4


def test_redacted_target_needs_to(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("pipeline")
    with tracker.start_run(spec("hpo_trial", study_key_hash=STUDY, trial_number=0)) as run:
        run.set_tags({"code.push_to": "https://***@mlflow.example.org"})
    tracker.close()
    with pytest.raises(TrackingError, match=r"https://\*\*\*@mlflow\.example\.org.*--to"):
        push()
    result = CliRunner().invoke(cli, ["push"])
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and "--to" in line and "***@mlflow.example.org" in line


def test_nothing_marked_pushes_nothing(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("pipeline")
    with tracker.start_run(spec("hpo_trial", study_key_hash=STUDY, trial_number=0)):
        pass
    tracker.close()
    result = CliRunner().invoke(cli, ["push"])
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("nothing to push from sqlite:///")


def _one_run(uri: str) -> None:
    tracker = Tracker("pipeline", uri)
    with tracker.start_run(spec("hpo_trial", study_key_hash=STUDY, trial_number=0)) as run:
        run.log_metric("loss", 1.0)
    tracker.close()


def test_unreachable_target_fails_fast(trainkit_store: TrainkitStore, closed_port: int) -> None:
    _one_run(trainkit_store.uri)
    started = time.monotonic()
    result = CliRunner().invoke(
        cli, ["push", "--from", trainkit_store.uri, "--to", f"http://127.0.0.1:{closed_port}"]
    )
    assert time.monotonic() - started < 5
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert f"127.0.0.1:{closed_port} cannot be reached" in line


def test_silent_target_fails_within_the_timeout(
    trainkit_store: TrainkitStore, silent_port: int
) -> None:
    _one_run(trainkit_store.uri)
    started = time.monotonic()
    result = CliRunner().invoke(
        cli,
        ["push", "--from", trainkit_store.uri, "--to", f"http://127.0.0.1:{silent_port}",
         "--timeout", "2s"],
    )  # fmt: skip
    elapsed = time.monotonic() - started
    assert 1.5 < elapsed < 10
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert "did not answer within 2 s" in line and "push again" in line


def test_missing_source_is_a_clear_error(tmp_path: Path, target: str) -> None:
    missing = f"sqlite:///{tmp_path / 'nope' / 'mlflow.db'}"
    with pytest.raises(TrackingError, match="no tracking store at"):
        push(missing, target)


def test_source_store_id_is_stable_and_travels_with_a_copy(
    trainkit_store: TrainkitStore, target: str, tmp_path: Path
) -> None:
    _one_run(trainkit_store.uri)
    first = push(trainkit_store.uri, target)
    copied = tmp_path / "elsewhere" / "copy.db"  # e.g. Kaggle output downloaded to a laptop
    copied.parent.mkdir()
    shutil.copyfile(trainkit_store.db_path, copied)
    again = push(f"sqlite:///{copied}", target)
    assert again.store_id == first.store_id
    assert (again.created, again.unchanged) == (0, 1)


def test_artifact_added_later_is_sent_once(
    trainkit_store: TrainkitStore, target: str, tmp_path: Path
) -> None:
    store = Store(trainkit_store.uri)
    run = store.create_run(store.get_or_create_experiment("pipeline"), "with-files", {})
    first_file, later_file = tmp_path / "a.txt", tmp_path / "b.txt"
    first_file.write_text("first\n")
    later_file.write_text("later\n")
    store.log_artifact(run.run_id, str(first_file), "out")
    store.terminate(run.run_id, "FINISHED", 5000)
    assert push(trainkit_store.uri, target).artifacts == 1
    store.log_artifact(run.run_id, str(later_file), "out/more")  # nothing else changes
    report = push(trainkit_store.uri, target)
    assert (report.updated, report.artifacts, report.points) == (1, 1, 0)
    assert push(trainkit_store.uri, target).artifacts == 0
    (copy,) = runs_of(target, "pipeline")
    client = MlflowClient(target)
    assert {f.path for f in client.list_artifacts(copy.info.run_id, "out")} == {
        "out/a.txt",
        "out/more",
    }
    more = client.download_artifacts(copy.info.run_id, "out/more/b.txt", str(tmp_path / "dl"))
    assert Path(more).read_text() == "later\n"


def test_a_second_push_of_the_same_store_is_refused(
    trainkit_store: TrainkitStore, target: str
) -> None:
    from trainkit_tracking._journal.spool import try_lock

    _one_run(trainkit_store.uri)
    lock = trainkit_store.db_path.with_name("mlflow.db.push.lock")
    fd = os.open(lock, os.O_RDWR | os.O_CREAT)
    try:
        assert try_lock(fd)  # held as a running push holds it
        with pytest.raises(TrackingError, match=r"another push of .* is running"):
            push(trainkit_store.uri, target)
    finally:
        os.close(fd)
    assert push(trainkit_store.uri, target).created == 1


def test_runs_keep_their_first_origin_through_a_chain_of_pushes(
    trainkit_store: TrainkitStore, target: str, trainkit_sqlite_template: Path, tmp_path: Path
) -> None:
    third = tmp_path / "third" / "mlflow.db"
    third.parent.mkdir()
    shutil.copyfile(trainkit_sqlite_template, third)
    third_uri = f"sqlite:///{third}"
    tracker = Tracker("pipeline")
    sweep = tracker.start_run(spec("hpo_sweep", study_key_hash=STUDY))
    with sweep, sweep.child("hpo_trial", trial_number=0) as trial:
        trial.log_metric("loss", 0.5)
    tracker.close()
    first = push(trainkit_store.uri, target)  # A -> B
    via = push(target, third_uri)  # B -> C
    assert via.created == 2
    direct = push(trainkit_store.uri, third_uri)  # A -> C: the same runs, found again
    assert (direct.created, direct.unchanged) == (0, 2)
    origins = {r.data.tags["code.pushed_from"] for r in runs_of(third_uri, "pipeline")}
    assert origins == {f"{first.store_id}:{sweep.id}", f"{first.store_id}:{trial.id}"}
    (child,) = [r for r in runs_of(third_uri, "pipeline") if r.info.run_name == trial.name]
    (parent,) = [r for r in runs_of(third_uri, "pipeline") if r.info.run_name == sweep.name]
    assert child.data.tags["mlflow.parentRunId"] == parent.info.run_id
