"""Lineage as links (SPEC section 18): a final, benchmark or conversion run's description
names the runs it came from; tracker.lineage() serves benchmarks and conversions too."""

from __future__ import annotations

from typing import Any

import pytest
from mlflow import MlflowClient

from trainkit_tracking import Lineage, RunSpec, Tracker, TrackingError, training_id
from trainkit_tracking.testing import TrainkitStore

STUDY = "350a79aa0000ffff"
TRIAL = "7c1d02ab55e0f3a1"


def spec(kind: str, **fields: Any) -> RunSpec:
    return RunSpec(kind=kind, model="distilbert", environment="local", **fields)


def hpo(tracker: Tracker) -> dict[str, Any]:
    runs: dict[str, Any] = {}
    with tracker.start_run(spec("hpo_sweep", study_key_hash=STUDY)) as sweep:
        runs["sweep"] = sweep
        with sweep.child("hpo_trial", trial_number=1, trial_key_hash=TRIAL) as trial:
            runs["trial"] = trial
        with sweep.child("hpo_refit", trial_number=1, trial_key_hash=TRIAL) as refit:
            runs["refit"] = refit
    return runs


def note_of(uri: str, run_id: str) -> str:
    return MlflowClient(uri).get_run(run_id).data.tags["mlflow.note.content"]


def test_final_training_description_names_trial_refit_and_sweep(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("links")
    runs = hpo(tracker)
    final_spec = spec("final_training", spec_fp="abc123de99", exec_fp="fedcba9876", lineage=tracker.lineage(runs["refit"].id))  # fmt: skip
    with tracker.start_run(final_spec) as final:
        pass
    lines = note_of(trainkit_store.uri, final.id).splitlines()
    assert lines[:5] == [
        "Lineage:",
        "",
        f"- trial: `{runs['trial'].name}`, run id `{runs['trial'].id}`",
        f"- refit: `{runs['refit'].name}`, run id `{runs['refit'].id}`",
        f"- sweep: `{runs['sweep'].name}`, run id `{runs['sweep'].id}`",
    ]
    # A sqlite store has no web UI: the description says that these are ids, not links.
    assert lines[-1].startswith("Run ids, not links: this tracking store has no web UI address")


@pytest.mark.server
def test_description_links_to_the_runs_on_a_server(trainkit_server: Any) -> None:
    tracker = Tracker("links-server", trainkit_server.uri)
    runs = hpo(tracker)
    with tracker.start_run(spec("final_training", lineage=tracker.lineage(runs["trial"].id))) as final:  # fmt: skip
        pass
    note = note_of(trainkit_server.uri, final.id)
    exp = tracker.experiment_id
    for key in ("trial", "sweep"):
        url = f"{trainkit_server.uri}/#/experiments/{exp}/runs/{runs[key].id}"
        assert f"- {key}: [{runs[key].name}]({url})" in note
        assert url == runs[key].url
    assert "Run ids, not links" not in note


def test_benchmark_and_conversion_lineage_from_the_tracker(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("links")
    runs = hpo(tracker)
    final_spec = spec("final_training", spec_fp="abc123de99", exec_fp="fedcba9876", lineage=tracker.lineage(runs["refit"].id))  # fmt: skip
    with tracker.start_run(final_spec) as final:
        pass
    # A benchmark of the final training: named after its study and trial, not '…unknown…'.
    bench_spec = spec("benchmarking", benchmark_config_hash="be9c4a1f00", lineage=tracker.lineage(final.id))  # fmt: skip
    assert (bench_spec.study_key_hash, bench_spec.trial_key_hash) == (STUDY, TRIAL)
    with tracker.start_run(bench_spec) as bench:
        pass
    assert "unknown" not in bench.name and f"trial-{TRIAL[:8]}" in bench.name
    tags = MlflowClient(trainkit_store.uri).get_run(bench.id).data.tags
    assert tags["code.lineage.parent_training_run_id"] == final.id
    assert tags["code.lineage.parent_kind"] == "final_training"
    assert tags["code.trial_key_hash"] == TRIAL
    assert f"- final training: `{final.name}`, run id `{final.id}`" in note_of(trainkit_store.uri, bench.id)  # fmt: skip

    conversion_spec = spec("conversion", conv_fp="c0ffee1234", parent_training_id=training_id("abc123de99", "fedcba9876"), lineage=tracker.lineage(final.id))  # fmt: skip
    with tracker.start_run(conversion_spec) as conversion:
        pass
    assert f"- final training: `{final.name}`" in note_of(trainkit_store.uri, conversion.id)
    # A benchmark of the converted model: its parent is the conversion.
    onnx_bench = spec("benchmarking", benchmark_config_hash="0000aaaa11", lineage=tracker.lineage(conversion.id))  # fmt: skip
    assert onnx_bench.trial_key_hash == TRIAL  # read through the conversion's final training
    with tracker.start_run(onnx_bench) as measured:
        pass
    tags = MlflowClient(trainkit_store.uri).get_run(measured.id).data.tags
    assert tags["code.lineage.parent_kind"] == "conversion"
    assert tags["code.lineage.parent_training_run_id"] == conversion.id
    assert f"- conversion: `{conversion.name}`" in note_of(trainkit_store.uri, measured.id)

    with pytest.raises(TrackingError, match="benchmarking run; lineage comes from"):
        tracker.lineage(bench.id)


def test_own_description_wins_and_broken_links_cost_only_themselves(
    trainkit_store: TrainkitStore,
) -> None:
    tracker = Tracker("links")
    runs = hpo(tracker)
    mine = spec("final_training", lineage=tracker.lineage(runs["trial"].id), tags={"mlflow.note.content": "mine"})  # fmt: skip
    with tracker.start_run(mine) as final:
        pass
    assert note_of(trainkit_store.uri, final.id) == "mine"
    elsewhere = "0123456789abcdef" * 2  # a run of another store (an offline run's parent)
    gone = spec("final_training", lineage=Lineage(hpo_trial_run_id=elsewhere, hpo_sweep_run_id=runs["sweep"].id))  # fmt: skip
    with tracker.start_run(gone) as other:
        pass
    note = note_of(trainkit_store.uri, other.id)
    assert f"- trial: run id `{elsewhere}` (not in this store)" in note
    assert f"- sweep: `{runs['sweep'].name}`, run id `{runs['sweep'].id}`" in note
