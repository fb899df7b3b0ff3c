"""The transition between 0.1's claims (one hidden experiment per claim) and 0.2's (a
param of the experiment's claims run): processes of both releases in one experiment never
share a version (docs/versions.md).

A 0.1 process is played by the functions 0.1 claimed with, kept unchanged in
``_store/legacy_claims.py``: its ``Versions.assign`` (the sentinel check, then the
hidden-experiment claim), and the run it then created.
"""

from __future__ import annotations

import multiprocessing
import re
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking import NamingPolicy, RunSpec, Tracker
from trainkit_tracking._store import legacy_claims
from trainkit_tracking._store.store import Store
from trainkit_tracking.testing import MlflowServer, TrainkitStore

SPEC = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="0ld0ld00")
BASE = "local_bert_hpo_study-0ld0ld00"
EXPERIMENT = "transition"


def old_release_run(uri: str) -> str:
    """What 0.1's start_run did for a versioned run: claim, then create the run."""
    store = Store(uri)
    experiment_id = store.get_or_create_experiment(EXPERIMENT)
    intact = legacy_claims.claims_intact(store, experiment_id, "code.version")
    version = legacy_claims.claim_version(store, experiment_id, BASE, 1)
    if not intact:  # 0.1's `mlflow gc` path: above what live runs carry
        records = store.search([experiment_id], f"tags.`code.base_name` = '{BASE}'")
        highest = max((int(r.tags["code.version"]) for r in records), default=0)
        if highest >= version:
            version = legacy_claims.claim_version(store, experiment_id, BASE, highest + 1)
    name = f"{BASE}_{version}"
    MlflowClient(uri).create_run(
        experiment_id,
        run_name=name,
        tags={"code.base_name": BASE, "code.version": str(version)},
    )
    legacy_claims._drain_hides()
    return name


def new_release_run(uri: str) -> str:
    # The seed's names, as 0.1 gave them (docs/migrating.md): the same base names, so the
    # two releases claim the same numbers.
    tracker = Tracker(EXPERIMENT, uri, policy=NamingPolicy.seed())
    run = tracker.start_run(SPEC)
    run.end()
    tracker.close()
    return run.name


def _racer(old: bool, uri: str, barrier: Any, results: Any) -> None:
    try:
        Store(uri).get_or_create_experiment(EXPERIMENT)
        barrier.wait(timeout=300)
        results.put(old_release_run(uri) if old else new_release_run(uri))
    except BaseException as exc:
        results.put(f"error: {type(exc).__name__}: {exc}")
        raise


def versions(names: list[str]) -> list[int]:
    assert not [n for n in names if n.startswith("error")], names
    # `_N` of the seed's names (0.1) and of the default's (`sweep_N ...`) alike
    return sorted(int(re.search(r"_(\d+)(?: |$)", n).group(1)) for n in names)  # type: ignore[union-attr]


def test_old_and_new_release_one_after_the_other_never_share_a_version(
    trainkit_store: TrainkitStore,
) -> None:
    uri = trainkit_store.uri
    names = [old_release_run(uri)]  # 0.1 used the experiment before the upgrade
    for _ in range(2):
        names.append(new_release_run(uri))
        names.append(old_release_run(uri))
    assert versions(names) == [1, 2, 3, 4, 5]


def transition_race(uri: str, each: int) -> list[str]:
    names = [old_release_run(uri)]
    ctx = multiprocessing.get_context("spawn")
    barrier = ctx.Barrier(2 * each)
    results = ctx.Queue()
    procs = [
        ctx.Process(target=_racer, args=(old, uri, barrier, results))
        for old in [True, False] * each
    ]
    for proc in procs:
        proc.start()
    names += [results.get(timeout=600) for _ in procs]
    for proc in procs:
        proc.join(timeout=120)
    return names


@pytest.mark.slow
def test_old_and_new_release_racing_never_share_a_version_on_sqlite(
    trainkit_store: TrainkitStore,
) -> None:
    assert versions(transition_race(trainkit_store.uri, 4)) == list(range(1, 10))


@pytest.mark.slow
@pytest.mark.postgres
def test_old_and_new_release_racing_never_share_a_version_on_postgres(
    trainkit_postgres_server: MlflowServer,
) -> None:
    assert versions(transition_race(trainkit_postgres_server.uri, 8)) == list(range(1, 18))
