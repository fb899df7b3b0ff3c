"""RunLogger against real sqlite stores: call-site validation, batching, flush/end, heartbeat."""

from __future__ import annotations

import json
import math
import os
import shutil
import statistics
import tempfile
import threading
import time
import warnings
from collections.abc import Callable
from decimal import Decimal
from fractions import Fraction
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from trainkit_tracking import ParamConflictError, TrackingWarning
from trainkit_tracking._journal.ledger import read_set_aside
from trainkit_tracking._journal.run_logger import RunLogger, default_spool_dir, pending
from trainkit_tracking._journal.spool import MAX_BATCH_BYTES, read_spool, spool_paths
from trainkit_tracking._store.store import Store
from trainkit_tracking.testing import MlflowServer, TrainkitStore

# The journal's own tests run the sender users get: a process of its own.
pytestmark = pytest.mark.default_sender


@pytest.fixture
def store(trainkit_store: TrainkitStore) -> Store:
    return Store(trainkit_store.uri)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def new_run(store: Store, name: str = "run") -> str:
    experiment_id = store.get_or_create_experiment("logging")
    return store.create_run(experiment_id, name, {}).run_id


def new_logger(store: Store, spool: Path, **kwargs: object) -> RunLogger:
    return RunLogger(store.tracking_uri, new_run(store), spool_dir=spool, **kwargs)  # type: ignore[arg-type]


def history(store: Store, run_id: str, key: str) -> list[tuple[int, float]]:
    return sorted((m.step, m.value) for m in store.client.get_metric_history(run_id, key))


# --- spool location -----------------------------------------------------------------


def test_default_spool_dir_order(tmp_path: Path) -> None:
    assert default_spool_dir({"TRAINKIT_SPOOL_DIR": "/x/spool", "XDG_CACHE_HOME": "/c"}) == Path(
        "/x/spool"
    )
    assert default_spool_dir({"XDG_CACHE_HOME": "/c"}) == Path("/c/trainkit-tracking/spool")
    assert default_spool_dir({}) == Path.home() / ".cache" / "trainkit-tracking" / "spool"
    assert default_spool_dir({"TRAINKIT_SPOOL_DIR": ""}) == default_spool_dir({})


# --- metrics ------------------------------------------------------------------------


def test_metrics_of_every_numeric_kind_are_stored(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    values = {
        "int": 3,
        "float": 0.25,
        "np_float32": np.float32(1.5),
        "np_int64": np.int64(7),
        "np_0d": np.array(2.5),
        "torch": torch.tensor(4.5),
        "decimal": Decimal("1.25"),
        "fraction": Fraction(1, 4),
    }
    logger.log_metrics(values, step=np.int64(2))
    logger.log_metric("nan", float("nan"))
    logger.log_metric("pinf", math.inf, step=1)
    logger.log_metric("ninf", -math.inf, step=2)
    assert logger.end()
    run = store.get_run(logger.run_id)
    assert run.status == "FINISHED"
    expected = {"int": 3, "float": 0.25, "np_float32": 1.5, "np_int64": 7, "np_0d": 2.5,
                "torch": 4.5, "decimal": 1.25, "fraction": 0.25}  # fmt: skip
    for key, value in expected.items():
        assert history(store, logger.run_id, key) == [(2, value)]
    assert math.isnan(run.metrics["nan"])
    # MLflow stores infinities as +-max double.
    assert run.metrics["pinf"] == pytest.approx(1.7976931348623157e308)
    assert run.metrics["ninf"] == pytest.approx(-1.7976931348623157e308)


@pytest.mark.parametrize(
    "value",
    ["1.0", b"1", True, False, np.bool_(True), torch.tensor(True), None, [1.0], {"a": 1},
     object(), 1j, np.array([1.0, 2.0]), 10**400],
)  # fmt: skip
def test_non_numeric_metric_values_raise_type_error(
    store: Store, spool: Path, value: object
) -> None:
    logger = new_logger(store, spool)
    with pytest.raises(TypeError, match="metric 'm'"):
        logger.log_metric("m", value)
    with pytest.raises(TypeError, match="metric 'm'"):
        logger.log_metrics({"ok": 1.0, "m": value})
    assert logger.end()
    # All-or-nothing: the valid value of the failed call was not logged either.
    assert "ok" not in store.get_run(logger.run_id).metrics


@pytest.mark.parametrize("step", [-1, 1.0, "1", True, 2**63, np.float64(1)])
def test_bad_steps_raise_value_error(store: Store, spool: Path, step: object) -> None:
    logger = new_logger(store, spool)
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        logger.log_metric("m", 1.0, step=step)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="step must be an int >= 0"):
        logger.log_metrics({"m": 1.0}, step=step)  # type: ignore[arg-type]
    logger.end()


@pytest.mark.parametrize(
    "key", ["", "/abs", "a/../b", "a//b", "a/", "./a", "..", "a$b", "tab\tkey", "x" * 251]
)
def test_bad_keys_raise_value_error_naming_the_key(store: Store, spool: Path, key: str) -> None:
    logger = new_logger(store, spool)
    calls: list[Callable[[], None]] = [
        lambda: logger.log_metric(key, 1.0),
        lambda: logger.log_params({key: 1}),
        lambda: logger.set_tags({key: "v"}),
    ]
    for call in calls:
        with pytest.raises(ValueError, match=r"invalid (metric|param|tag) key") as info:
            call()
        assert repr(key)[:40] in str(info.value)
    logger.end()


def test_keys_mlflow_accepts_are_accepted(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    keys = ["eval/f1", "a b", "t:1", "x.y-z_w", "x" * 250]
    logger.log_metrics(dict.fromkeys(keys, 1.0))
    assert logger.end()
    assert set(store.get_run(logger.run_id).metrics) == set(keys)


def test_non_string_key_is_type_error(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    with pytest.raises(TypeError, match="metric key must be a str"):
        logger.log_metrics({1: 1.0})  # type: ignore[dict-item]
    logger.end()


# --- params and tags ----------------------------------------------------------------


def test_params_flattened_relogged_and_conflicting(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    logger.log_params({"lr": 0.001, "optim": {"name": "adamw", "betas": {"b1": 0.9}}, "e": {}})
    logger.log_params({"lr": 0.001})  # the same value again is fine
    with pytest.raises(ParamConflictError) as info:
        logger.log_params({"new": 1, "lr": 0.01})
    assert "'0.001'" in str(info.value) and "'0.01'" in str(info.value)
    assert isinstance(info.value, ValueError)
    assert logger.end()
    params = store.get_run(logger.run_id).params
    assert params == {"lr": "0.001", "optim.name": "adamw", "optim.betas.b1": "0.9", "e": "{}"}


def test_known_params_conflict_at_the_call_site(store: Store, spool: Path) -> None:
    run_id = new_run(store)
    logger = RunLogger(store.tracking_uri, run_id, spool_dir=spool, known_params={"seed": "1"})
    logger.log_params({"seed": 1})
    with pytest.raises(ParamConflictError, match=r"'1'.*'2'"):
        logger.log_params({"seed": 2})
    logger.end()


def test_long_values_are_cut_with_a_warning(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    with pytest.warns(TrackingWarning, match="param 'long' is 7000 characters") as caught:
        logger.log_params({"long": "p" * 7000})
    # Attributed to the caller, not to the package.
    assert caught[0].filename == __file__
    with pytest.warns(TrackingWarning, match="tag 'long' is 9000 characters"):
        logger.set_tags({"long": "t" * 9000})
    assert logger.end()
    run = store.get_run(logger.run_id)
    assert run.params["long"] == "p" * 5997 + "..."
    assert run.tags["long"] == "t" * 7997 + "..."


def test_secrets_are_redacted_in_params_and_tags(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    logger.log_params({"hf_token": "hf_abc", "db": {"password": "pw"}, "pad_token_id": 0})
    logger.set_tags({"url": "https://user:pass@example.invalid/x", "api_key": "k"})
    assert logger.end()
    run = store.get_run(logger.run_id)
    assert run.params == {"hf_token": "***", "db.password": "***", "pad_token_id": "0"}
    assert run.tags["url"] == "https://***@example.invalid/x"
    assert run.tags["api_key"] == "***"
    # Nor are secrets written to the spool on the way.
    assert not any("pass@" in p.read_text() for p in spool.rglob("*.jsonl"))


def test_tag_values_rendered(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    logger.set_tags({"flag": True, "off": False, "n": 5, "x": "a"})
    logger.set_tags({"x": "b"})  # a later value wins
    assert logger.end()
    tags = store.get_run(logger.run_id).tags
    assert (tags["flag"], tags["off"], tags["n"], tags["x"]) == ("true", "false", "5", "b")


# --- batching, flush, end -----------------------------------------------------------


def test_large_volumes_respect_mlflow_batch_limits(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    logger.log_metrics({f"m{i}": float(i) for i in range(2500)}, step=1)
    logger.log_params({f"p{i}": "v" * 5000 for i in range(250)})
    logger.set_tags({f"t{i}": str(i) for i in range(250)})
    assert logger.flush(60)
    (path,) = spool_paths(spool)
    batches = [r for r in read_spool(path).records.values() if r["t"] == "b"]
    for batch in batches:
        m, p, g = (len(batch.get(k, ())) for k in "mpg")
        assert m <= 1000 and p <= 100 and g <= 100 and m + p + g <= 1000
        assert len(json.dumps(batch)) < MAX_BATCH_BYTES + 100_000
    assert sum(len(b.get("p", ())) for b in batches) == 250
    assert logger.end()
    run = store.get_run(logger.run_id)
    assert (len(run.metrics), len(run.params)) == (2500, 250)
    assert sum(k.startswith("t") for k in run.tags) >= 250


def test_flush_then_end_stores_everything_once_and_cleans_the_spool(
    store: Store, spool: Path
) -> None:
    logger = new_logger(store, spool)
    for step in range(3000):
        logger.log_metrics({"loss": 1.0 / (step + 1), "acc": step / 3000}, step=step)
    assert logger.flush(60) is True
    assert len(history(store, logger.run_id, "loss")) == 3000
    assert store.get_run(logger.run_id).status == "RUNNING"
    assert logger.end("FAILED", timeout=60) is True
    assert logger.end("FINISHED") is True  # idempotent: still FAILED
    run = store.get_run(logger.run_id)
    assert run.status == "FAILED" and run.end_time is not None
    assert history(store, logger.run_id, "acc") == [(s, s / 3000) for s in range(3000)]
    assert spool_paths(spool) == [] and pending(spool) == 0


def test_end_none_only_flushes(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    logger.log_metric("m", 1.0)
    assert logger.end(None, timeout=60)
    run = store.get_run(logger.run_id)
    assert run.status == "RUNNING" and run.metrics == {"m": 1.0}


def test_end_rejects_unknown_status(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    with pytest.raises(ValueError, match="RUNNING"):
        logger.end("RUNNING")
    assert logger.end()


def test_logging_after_end_warns_once_and_is_still_sent(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    assert logger.end()
    with pytest.warns(TrackingWarning, match="was ended"):
        logger.log_metric("late", 2.0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        logger.log_metric("late2", 3.0)
    assert logger.flush(60)
    assert store.get_run(logger.run_id).metrics == {"late": 2.0, "late2": 3.0}


def test_timestamps_are_taken_at_log_time(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool, flush_interval=30.0)
    before = time.time() * 1000
    logger.log_metric("m", 1.0)
    after = time.time() * 1000
    time.sleep(0.3)
    assert logger.end()
    (point,) = store.client.get_metric_history(logger.run_id, "m")
    assert before - 1 <= point.timestamp <= after + 1


def test_many_threads_log_to_one_run(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)

    def work(t: int) -> None:
        for step in range(500):
            logger.log_metric(f"thread{t}", float(step), step=step)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert logger.end()
    for t in range(4):
        assert [s for s, _ in history(store, logger.run_id, f"thread{t}")] == list(range(500))


def test_log_metrics_call_is_cheap(store: Store, spool: Path) -> None:
    """The target is a median of 5 us (bench/ measures it); this only catches regressions."""
    logger = new_logger(store, spool)
    durations = []
    for step in range(5000):
        start = time.perf_counter()
        logger.log_metrics({"loss": 0.5, "lr": 1e-4}, step=step)
        durations.append(time.perf_counter() - start)
    assert statistics.median(durations) < 50e-6
    assert logger.end()


def test_heartbeat_tag_is_set_and_refreshed(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool, heartbeat_interval=0.3, heartbeat_tag="code.heartbeat")
    deadline = time.monotonic() + 20
    beats: set[str] = set()
    while len(beats) < 2 and time.monotonic() < deadline:
        beat = store.get_run(logger.run_id).tags.get("code.heartbeat")
        if beat is not None:
            beats.add(beat)
        time.sleep(0.2)
    assert len(beats) >= 2, beats
    assert all(abs(int(b) - time.time()) < 60 for b in beats)
    assert logger.end()
    stopped = store.get_run(logger.run_id).tags["code.heartbeat"]
    time.sleep(1.0)
    assert store.get_run(logger.run_id).tags["code.heartbeat"] == stopped


# --- artifacts ----------------------------------------------------------------------


def test_artifacts_and_dicts_are_uploaded(store: Store, spool: Path, tmp_path: Path) -> None:
    logger = new_logger(store, spool)
    file = tmp_path / "notes.txt"
    file.write_text("hello")
    tree = tmp_path / "tree"
    (tree / "sub").mkdir(parents=True)
    (tree / "a.txt").write_text("a")
    (tree / "sub" / "b.txt").write_text("b")
    logger.log_artifact(file)
    logger.log_artifact(str(file), "docs")
    logger.log_artifacts(tree, "out")
    logger.log_dict({"lr": 0.1, "layers": [1, 2]}, "config.json")
    logger.log_dict({"lr": 0.1}, "cfg/config.yaml")
    assert logger.end()
    root = Path(store.client.download_artifacts(logger.run_id, "", str(tmp_path / "dl")))
    assert (root / "notes.txt").read_text() == "hello"
    assert (root / "docs" / "notes.txt").read_text() == "hello"
    assert (root / "out" / "sub" / "b.txt").read_text() == "b"
    assert json.loads((root / "config.json").read_text()) == {"lr": 0.1, "layers": [1, 2]}
    assert yaml.safe_load((root / "cfg" / "config.yaml").read_text()) == {"lr": 0.1}
    # log_dict's files live in the spool only until uploaded.
    assert not [p for p in (spool / "blobs").rglob("*") if p.is_file()]


def test_artifact_call_site_errors(store: Store, spool: Path, tmp_path: Path) -> None:
    logger = new_logger(store, spool)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        logger.log_artifact(tmp_path / "missing.txt")
    with pytest.raises(FileNotFoundError, match="is a directory"):
        logger.log_artifact(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        logger.log_artifacts(tmp_path / "missing")
    (tmp_path / "f.txt").write_text("x")
    for bad in ("/abs", "../up", "a/../../b"):
        with pytest.raises(ValueError, match="relative path"):
            logger.log_artifact(tmp_path / "f.txt", bad)
    with pytest.raises(ValueError, match=r"\.json, \.yaml or \.yml"):
        logger.log_dict({}, "config.txt")
    with pytest.raises(TypeError, match="cannot serialise"):
        logger.log_dict({"x": object()}, "c.json")
    with pytest.raises(TypeError, match="cannot serialise"):
        logger.log_dict({"x": object()}, "c.yaml")
    assert logger.end()


def test_artifact_deleted_right_after_the_call_is_still_uploaded(
    store: Store, spool: Path, tmp_path: Path
) -> None:
    logger = new_logger(store, spool, flush_interval=30.0)
    with tempfile.TemporaryDirectory() as scratch:  # gone as soon as the block ends
        file = Path(scratch) / "report.txt"
        file.write_text("as logged")
        logger.log_artifact(file)
    rewritten = tmp_path / "plot.txt"
    rewritten.write_text("epoch 1")
    logger.log_artifact(rewritten, "epoch1")
    rewritten.write_text("epoch 2")  # rewritten in place before the upload
    assert logger.end(timeout=30)
    assert store.get_run(logger.run_id).status == "FINISHED"
    local = store.client.download_artifacts(logger.run_id, "", str(tmp_path / "down"))
    assert (Path(local) / "report.txt").read_text() == "as logged"
    assert (Path(local) / "epoch1" / "plot.txt").read_text() == "epoch 1"
    assert pending(spool) == 0 and not list((spool / "blobs").rglob("*.txt"))


# --- store failures -----------------------------------------------------------------


def test_deleted_run_is_set_aside_once_and_holds_back_nothing(store: Store, spool: Path) -> None:
    logger = new_logger(store, spool)
    other = new_logger(store, spool)
    logger.log_metric("m", 1.0)
    assert logger.flush(30)
    store.client.delete_run(logger.run_id)
    logger.log_metric("m", 2.0, step=1)
    logger.log_params({"p": 1})
    other.log_metric("m", 1.0)
    with pytest.warns(TrackingWarning, match=f"set aside .* of run {logger.run_id}"):
        start = time.monotonic()
        assert logger.end(timeout=30) is False
    assert time.monotonic() - start < 10
    assert other.end(timeout=30)  # the other run is stored
    assert history(store, other.run_id, "m") == [(0, 1.0)]
    assert pending(spool) == 0  # settled: the batch and the end are in the set-aside log
    assert {e["run"] for e in read_set_aside(spool)} == {logger.run_id}
    assert len(read_set_aside(spool)) == 2


def test_unwritable_spool_warns_once_and_logging_goes_on(store: Store, tmp_path: Path) -> None:
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    with pytest.warns(TrackingWarning, match="cannot write the tracking spool") as caught:
        logger = new_logger(store, blocker / "spool")
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    assert caught[0].filename == __file__
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for step in range(100):
            logger.log_metric("m", float(step), step=step)
        logger.log_dict({"a": 1}, "d.json")  # falls back to a temp dir
        assert logger.end(timeout=60)
    assert len(history(store, logger.run_id, "m")) == 100
    assert store.client.list_artifacts(logger.run_id)[0].path == "d.json"


def test_unknown_run_is_set_aside_quickly(spool: Path, tmp_path: Path) -> None:
    uri = f"sqlite:///{tmp_path}/no/such/dir/mlflow.db"
    logger = RunLogger(uri, "0" * 32, spool_dir=spool, heartbeat_interval=0)
    logger.log_metric("m", 1.0)
    with pytest.warns(TrackingWarning, match="set aside"):
        assert logger.end(timeout=60) is False
    assert pending(spool) == 0 and len(read_set_aside(spool)) == 2


@pytest.mark.server
@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_forked_child_logs_through_its_own_worker(
    trainkit_server: MlflowServer, tmp_path: Path
) -> None:
    store = Store(trainkit_server.uri)
    spool = tmp_path / "spool"
    logger = new_logger(store, spool)
    logger.log_metric("parent", 1.0)
    assert logger.flush(60)
    pid = os.fork()
    if pid == 0:  # the child: no pytest machinery from here on
        code = 1
        try:
            logger.log_metric("child", 2.0)
            code = 0 if logger.flush(60) else 1
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    logger.log_metric("parent", 3.0, step=1)
    assert logger.end(timeout=60)
    metrics = store.get_run(logger.run_id).metrics
    assert metrics == {"parent": 3.0, "child": 2.0}
    # The child left by os._exit (no exit hook): its file stays, with nothing unsent in it.
    assert pending(spool) == 0


def test_warnings_as_errors_do_not_lose_data_in_the_worker(
    store: Store, spool: Path, tmp_path: Path
) -> None:
    """A spool that fails mid-run warns from the worker: with -W error that is a log line."""
    logger = new_logger(store, spool, flush_interval=0.05)
    logger.log_metric("m", 0.0)
    assert logger.flush(30)
    shutil.rmtree(spool)  # the segment, its marks and all
    spool.write_text("now a file: the next segment cannot be created")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert logger.flush(30)  # nothing new: no write needed
        for step in range(1, 50):
            logger.log_metric("m", float(step), step=step)
        logger._channel.writer.close(delete=True)  # type: ignore[union-attr]
        assert logger.end(timeout=60)
    assert [s for s, _ in history(store, logger.run_id, "m")] == list(range(50))


def test_unwritable_spool_warns_once_per_directory_not_per_run(
    store: Store, tmp_path: Path
) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loggers = [new_logger(store, blocker / "spool") for _ in range(5)]
    assert len([w for w in caught if issubclass(w.category, TrackingWarning)]) == 1
    for logger in loggers:
        logger.log_metric("m", 1.0)
        assert logger.end(timeout=60)
        assert store.get_run(logger.run_id).metrics == {"m": 1.0}
