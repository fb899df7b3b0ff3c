"""DDP under torchrun (2 ranks, gloo, CPU): one run tree, one id on every rank, rank 0 logs."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking.testing import TrainkitStore

pytest.importorskip("torch")

from trainkit_tracking.integrations import torch as tk_torch

WORKER = Path(__file__).with_name("ddp_worker.py")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_rank_helpers_without_a_process_group() -> None:
    assert tk_torch.rank({"RANK": "3"}) == 3
    assert tk_torch.rank({"SLURM_PROCID": "2"}) == 2
    assert tk_torch.rank({}) == 0
    assert tk_torch.is_rank_zero({})
    assert not tk_torch.is_rank_zero({"LOCAL_RANK": "1"})
    assert tk_torch.world_size({"WORLD_SIZE": "4"}) == 4
    assert tk_torch.world_size({}) == 1
    assert tk_torch.broadcast_object({"a": 1}) == {"a": 1}


def test_non_zero_rank_without_group_gets_a_noop_run(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    from trainkit_tracking import RunSpec, Tracker

    monkeypatch.setenv("RANK", "1")
    tracker = Tracker("ddp-noop")
    run = tracker.start_run(RunSpec(kind="final_training", model="tiny", environment="local"))
    assert run.id is None
    child = run.child("benchmarking")
    child.log_metrics({"x": 1.0})
    run.end()
    assert MlflowClient(trainkit_store.uri).search_runs([tracker.experiment_id]) == []


@pytest.mark.slow
@pytest.mark.parametrize("store_state", ["migrated", "fresh"])
def test_torchrun_two_ranks_create_one_tree(
    trainkit_store: TrainkitStore, tmp_path: Path, store_state: str
) -> None:
    # "fresh": no database yet, so the ranks must not all migrate it at once.
    uri = trainkit_store.uri if store_state == "migrated" else f"sqlite:///{tmp_path}/fresh.db"
    env = {
        **os.environ,
        "MLFLOW_TRACKING_URI": uri,
        # gloo must bind loopback: the suite's network guard allows nothing else.
        "GLOO_SOCKET_IFNAME": "lo",
        "OMP_NUM_THREADS": "1",
    }
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
    reports = [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
    assert sorted(r["rank"] for r in reports) == [0, 1], done.stdout
    by_rank = {r["rank"]: r for r in reports}
    assert by_rank[0]["run_type"] == "Run"
    assert by_rank[1]["run_type"] == "NoopRun"
    assert by_rank[0]["is_rank_zero"] and not by_rank[1]["is_rank_zero"]
    # Both ranks see rank 0's ids, for the run and for every fold child.
    assert by_rank[0]["run_id"] == by_rank[1]["run_id"]
    assert by_rank[0]["fold_ids"] == by_rank[1]["fold_ids"]
    assert len(set(by_rank[0]["fold_ids"])) == 2

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("ddp-test")
    runs = client.search_runs([experiment.experiment_id])
    assert len(runs) == 3  # one trial, two folds: no duplicate per rank
    trial_id = by_rank[0]["run_id"]
    by_id = {r.info.run_id: r for r in runs}
    assert set(by_id) == {trial_id, *by_rank[0]["fold_ids"]}
    assert by_id[trial_id].data.tags["written_by_rank"] == "0"
    assert by_id[trial_id].data.metrics["rank_marker"] == 100
    for fold, fold_id in enumerate(by_rank[0]["fold_ids"]):
        fold_run = by_id[fold_id]
        assert fold_run.data.tags["mlflow.parentRunId"] == trial_id
        assert fold_run.data.tags["code.hpo.fold_idx"] == str(fold)
        assert fold_run.info.status == "FINISHED"
        assert fold_run.data.params["logged_by_rank"] == "0"
        history = client.get_metric_history(fold_id, "rank_marker")
        assert sorted(m.step for m in history) == [0, 1, 2]
        assert {m.value for m in history} == {100.0}
