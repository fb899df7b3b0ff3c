"""System metrics against a real store: the sampler's keys, steps, lifetime, failures and DDP nodes."""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
import threading
import time
import warnings
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking import RunSpec, Tracker, TrackingError, TrackingWarning
from trainkit_tracking._insight.system import Sampler, visible_gpus
from trainkit_tracking.testing import TrainkitStore

pytest.importorskip("psutil")

SPEC = RunSpec(kind="final_training", model="tiny", environment="local")
KEYS = ("cpu_percent", "memory_used_mb", "process_rss_mb", "disk_used_percent")
GPU_FIELDS = ("utilization_percent", "memory_used_mb", "power_w", "temperature_c")
DEADLINE = 30.0
WORKER = Path(__file__).with_name("ddp_system_worker.py")


def wait_for_samples(sampler: Sampler, count: int) -> None:
    deadline = time.monotonic() + DEADLINE
    while sampler.samples < count:
        assert time.monotonic() < deadline, f"only {sampler.samples} samples in {DEADLINE}s"
        time.sleep(0.05)


def nvml_available() -> bool:
    try:
        import pynvml

        pynvml.nvmlInit()
    except Exception:
        return False
    pynvml.nvmlShutdown()
    return True


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "trainkit-system" and t.is_alive()]


def test_sampler_logs_every_key_into_the_open_run(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("sys", system_metrics=True, system_metrics_interval=0.5)
    sampler = tracker._system
    assert sampler is not None
    with tracker.start_run(SPEC) as run:
        wait_for_samples(sampler, 3)
    client = MlflowClient(trainkit_store.uri)
    for key in KEYS:
        history = client.get_metric_history(run.id, f"system/{key}")
        assert len(history) >= 3, key
        assert sorted(m.step for m in history) == list(range(len(history)))
        assert all(m.value >= 0 for m in history)
    rss = client.get_metric_history(run.id, "system/process_rss_mb")
    assert all(10 < m.value < 100_000 for m in rss)  # megabytes, not bytes
    cpu = client.get_metric_history(run.id, "system/cpu_percent")
    assert all(0 <= m.value <= 100 for m in cpu)
    metrics = client.get_run(run.id).data.metrics
    if not nvml_available():  # no GPU here: GPU metrics are simply absent
        assert not [k for k in metrics if k.startswith("system/gpu")]
    assert not [k for k in metrics if k.startswith("system/node")]  # not distributed


def test_one_sample_feeds_every_open_run_and_stops_with_them(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("sys", system_metrics=True, system_metrics_interval=0.2)
    sampler = tracker._system
    assert sampler is not None
    with tracker.start_run(SPEC) as parent:
        with parent.child("benchmarking") as child:
            wait_for_samples(sampler, 2)
        child_points = len(
            MlflowClient(trainkit_store.uri).get_metric_history(child.id, "system/cpu_percent")
        )
        wait_for_samples(sampler, sampler.samples + 2)
    # Nothing is logged into an ended run: the child's history stopped with it.
    client = MlflowClient(trainkit_store.uri)
    assert len(client.get_metric_history(child.id, "system/cpu_percent")) == child_points
    assert len(client.get_metric_history(parent.id, "system/cpu_percent")) >= child_points + 2
    deadline = time.monotonic() + DEADLINE
    while sampler_threads():  # the thread ends with the last run
        assert time.monotonic() < deadline
        time.sleep(0.05)
    ended_at = sampler.samples
    with tracker.start_run(SPEC.model_copy(update={"variant": 2})) as again:
        wait_for_samples(sampler, ended_at + 1)  # and starts again with the next one
    assert client.get_metric_history(again.id, "system/memory_used_mb")


def test_off_by_default_and_on_from_the_environment(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert Tracker("sys")._system is None
    monkeypatch.setenv("TRAINKIT_SYSTEM_METRICS", "1")
    monkeypatch.setenv("TRAINKIT_SYSTEM_METRICS_INTERVAL", "2.5")
    sampler = Tracker("sys")._system
    assert sampler is not None
    assert sampler.interval == 2.5
    assert Tracker("sys", system_metrics=False)._system is None  # the argument wins
    monkeypatch.delenv("TRAINKIT_SYSTEM_METRICS_INTERVAL")
    sampler = Tracker("sys")._system
    assert sampler is not None
    assert sampler.interval == 10.0


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("TRAINKIT_SYSTEM_METRICS", "sometimes"),
        ("TRAINKIT_SYSTEM_METRICS_INTERVAL", "10s"),
        ("TRAINKIT_SYSTEM_METRICS_INTERVAL", "0"),
        ("LOCAL_RANK", "first"),
    ],
)
def test_malformed_settings_are_errors_naming_the_variable(name: str, value: str) -> None:
    environ = {"TRAINKIT_SYSTEM_METRICS": "1", name: value}
    with pytest.raises(TrackingError) as caught:
        Tracker("sys", environ=environ)
    assert f"{name}={value!r}" in str(caught.value)


@pytest.mark.parametrize("interval", [0, -1.0, float("nan"), True, "10"])
def test_bad_interval_argument(interval: object) -> None:
    with pytest.raises(ValueError, match="system_metrics_interval"):
        Tracker("sys", system_metrics=True, system_metrics_interval=interval)  # type: ignore[arg-type]


def test_without_psutil_the_option_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psutil", None)  # import psutil now raises ImportError
    with pytest.raises(ImportError, match=re.escape('pip install "trainkit-tracking[system]"')):
        Tracker("sys", system_metrics=True)
    assert Tracker("sys")._system is None  # off: psutil is not needed


def test_a_failing_probe_is_dropped_with_one_warning() -> None:
    sampler = Sampler(1.0, {}, None)
    calls = []

    def broken() -> float:
        calls.append(1)
        raise OSError("sensor gone")

    probes = [("fine", lambda: 1.5), ("broken", broken), ("also_fine", lambda: 2)]
    with pytest.warns(TrackingWarning, match=r"'broken' could not be read \(sensor gone\)"):
        first = sampler._sample(probes)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        second = sampler._sample(probes)
    assert first == second == {"fine": 1.5, "also_fine": 2.0}
    assert len(calls) == 1


def test_a_failing_logger_does_not_stop_the_sampler(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("sys", system_metrics=True, system_metrics_interval=0.2)
    sampler = tracker._system
    assert sampler is not None

    class Refusing:
        id = "0" * 32

        def log_metrics(self, metrics: object, step: int | None = None) -> None:
            raise RuntimeError("refused")

    refusing = Refusing()
    sampler.add(refusing)  # type: ignore[arg-type]
    with tracker.start_run(SPEC) as run:
        # Counted from now: samples taken while the run was being created went nowhere.
        wait_for_samples(sampler, sampler.samples + 3)
    sampler.remove(refusing)  # type: ignore[arg-type]
    history = MlflowClient(trainkit_store.uri).get_metric_history(run.id, "system/cpu_percent")
    assert len(history) >= 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")
def test_a_forked_child_does_not_inherit_the_parents_sampling(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("sys", system_metrics=True, system_metrics_interval=0.2)
    sampler = tracker._system
    assert sampler is not None
    with tracker.start_run(SPEC):
        assert sampler._targets
        read, write = os.pipe()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # fork with threads (3.12+)
            pid = os.fork()
        if pid == 0:  # the child: report and leave without running any exit handler
            state = f"{len(sampler._targets)} {sampler._stop is None} {sampler._lock.acquire(timeout=1)}"
            os.write(write, state.encode())
            os._exit(0)
        os.close(write)
        with os.fdopen(read) as pipe:
            reported = pipe.read()
        os.waitpid(pid, 0)
    assert reported == "0 True True"


def test_visible_gpus() -> None:
    assert visible_gpus(None, 3) == [0, 1, 2]
    assert visible_gpus("", 3) == []
    assert visible_gpus("-1", 3) == []
    assert visible_gpus("2,0", 3) == [2, 0]
    assert visible_gpus("1,7,0", 3) == [1]  # CUDA stops at the first invalid entry
    assert visible_gpus("GPU-8f2a, 1", 2) == ["GPU-8f2a", 1]


def test_non_zero_rank_without_a_group_samples_nothing(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "0")
    tracker = Tracker("sys", system_metrics=True, system_metrics_interval=0.2)
    with tracker.start_run(SPEC) as run:
        assert run.id is None  # no broadcast id: nothing to log into
        assert not sampler_threads()
    assert run.end() is True


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@pytest.mark.slow
def test_torchrun_two_nodes_log_into_the_one_run(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    pytest.importorskip("torch")
    env = {**os.environ, "GLOO_SOCKET_IFNAME": "lo", "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nnodes=1",
        "--nproc-per-node=2",
        "--master-addr=127.0.0.1",
        f"--master-port={_free_port()}",
        str(WORKER),
    ]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    reports = {r["rank"]: r for r in map(json.loads, re.findall(r"^\{.*\}$", done.stdout, re.M))}
    assert sorted(reports) == [0, 1], done.stdout
    assert reports[0]["type"] == "Run"
    assert reports[1]["type"] == "NoopRun"
    run_id = reports[0]["run_id"]
    assert reports[1]["run_id"] == run_id
    client = MlflowClient(trainkit_store.uri)
    experiment = client.get_experiment_by_name("ddp-system")
    assert len(client.search_runs([experiment.experiment_id])) == 1
    metrics = client.get_run(run_id).data.metrics
    for node in (0, 1):
        for key in KEYS:
            history = client.get_metric_history(run_id, f"system/node{node}/{key}")
            assert len(history) >= 2, (node, key, sorted(metrics))
    assert not [k for k in metrics if re.match(r"system/(?!node\d)", k)]
