"""What version claims cost, and whether each primitive keeps versions exact.

0.2 claims a version as a param of the experiment's claims run (``_store/claims.py``:
the (run, key) primary key lets one value in); 0.1 created a hidden (soft-deleted)
experiment per claim (``_store/legacy_claims.py``). This prints, for N versioned runs on
a local sqlite store: the experiments left behind and the time to list every experiment
(``search_experiments``, all pages, ``view_type`` ALL and ACTIVE_ONLY; the fastest of
15 interleaved rounds) with 0.2 (through ``Tracker``), 0.1 (its claim functions, runs
by ``MlflowClient``) and raw MLflow (N runs, no claims). Then 16 processes, released
together by a ``multiprocessing.Barrier``, each claim one version of the same base with
both primitives, on sqlite and (when PostgreSQL is installed) on a PostgreSQL-backed
``mlflow server``: the versions they got, which must be exactly 1..16. docs/versions.md.

    python bench/bench_versions.py            # N = 500
    python bench/bench_versions.py --quick    # N = 100
    python bench/bench_versions.py --no-race  # the footprint table only

Reports timings, asserts none; the race rows say "exact" or list the duplicates.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The PostgreSQL cluster manager is the test suite's (tests/pg.py), not the package's.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

RACERS = 16
BASE = "local_bert_hpo_study-cafe0123"


def _all_experiments(client: Any, view: str = "ALL") -> list[Any]:
    from mlflow.entities import ViewType

    found: list[Any] = []
    token = None
    while True:
        page = client.search_experiments(
            view_type=getattr(ViewType, view), max_results=1000, page_token=token
        )
        found += list(page)
        token = page.token
        if not token:
            return found


def _fresh_store(template: Path, root: Path, name: str) -> str:
    import shutil

    db = root / f"{name}.db"
    shutil.copyfile(template, db)
    return f"sqlite:///{db}"


def footprint(template: Path, root: Path, n: int) -> None:
    from mlflow import MlflowClient

    from trainkit_tracking import RunSpec, Tracker

    def today(uri: str) -> None:
        tracker = Tracker("versions-bench", uri, spool_dir=root / "spool")
        spec = RunSpec(
            kind="hpo_sweep", model="bert", environment="local", study_key_hash="cafe0123"
        )
        for _ in range(n):
            tracker.start_run(spec).end(timeout=60)
        tracker.close()

    def raw(uri: str) -> None:
        client = MlflowClient(uri)
        experiment = client.create_experiment("versions-bench")
        for number in range(1, n + 1):
            run = client.create_run(experiment, run_name=f"{BASE}_{number}")
            client.set_terminated(run.info.run_id)

    def legacy(uri: str) -> None:
        from trainkit_tracking._store import legacy_claims
        from trainkit_tracking._store.store import Store

        client = MlflowClient(uri)
        store = Store(uri)
        experiment = client.create_experiment("versions-bench")
        version = 1
        for _ in range(n):
            version = legacy_claims.claim_version(store, experiment, BASE, version)
            run = client.create_run(experiment, run_name=f"{BASE}_{version}")
            client.set_terminated(run.info.run_id)
            version += 1
        legacy_claims._drain_hides()

    rows = []
    for label, create in (
        ("claims run, param per claim (0.2, through Tracker)", today),
        ("raw MLflow, no claims", raw),
        ("hidden experiment per claim (0.1)", legacy),
    ):
        uri = _fresh_store(template, root, create.__name__)
        started = time.perf_counter()
        create(uri)
        per_run = (time.perf_counter() - started) / n * 1000
        rows.append((label, MlflowClient(uri), per_run))
    # Listing times: rounds interleaved over the three stores, the fastest of each kept, so
    # that load from elsewhere on the machine hits every store alike.
    best: dict[tuple[str, str], float] = {}
    for _ in range(15):
        for label, client, _ in rows:
            for view in ("ALL", "ACTIVE_ONLY"):
                started = time.perf_counter()
                _all_experiments(client, view)
                took = time.perf_counter() - started
                best[label, view] = min(took, best.get((label, view), took))

    print(f"\nN versioned runs of one base on a local sqlite store (mlflow {_mlflow_version()})\n")
    print(
        "| primitive | runs | experiments left | list experiments, ALL "
        "| ACTIVE_ONLY | per run (create + claim) |"
    )
    print("|---|---|---|---|---|---|")
    for label, client, per_run in rows:
        experiments = _all_experiments(client)
        deleted = sum(1 for e in experiments if e.lifecycle_stage == "deleted")
        print(
            f"| {label} | {n} | {len(experiments)} ({deleted} deleted) "
            f"| {best[label, 'ALL'] * 1000:.1f} ms | {best[label, 'ACTIVE_ONLY'] * 1000:.1f} ms "
            f"| {per_run:.1f} ms |"
        )


def _mlflow_version() -> str:
    import mlflow

    return str(mlflow.__version__)


def _racer(
    kind: str, uri: str, experiment_id: str, claims_run: str, barrier: Any, results: Any
) -> None:
    from mlflow import MlflowClient

    from trainkit_tracking._store.claims import claim_version
    from trainkit_tracking._store.legacy_claims import claim_version as legacy_claim_version
    from trainkit_tracking._store.store import Store

    try:
        store = Store(uri, timeout=120)
        client = MlflowClient(uri)
        client.get_experiment(experiment_id)  # connected and warm before the release
        barrier.wait(timeout=300)
        released = time.monotonic()  # CLOCK_MONOTONIC: one clock for every process
        if kind == "today":
            version = claim_version(store, experiment_id, BASE)
        else:
            version = legacy_claim_version(store, experiment_id, BASE)
        results.put((version, time.monotonic() - released))
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")
        raise


def race(uri: str, label: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    ctx = multiprocessing.get_context("spawn")
    for kind, primitive in (
        ("today", "claims run, param per claim (0.2)"),
        ("legacy", "hidden experiment per claim (0.1)"),
    ):
        experiment_id = client.create_experiment(f"race-{kind}-{uuid.uuid4().hex[:8]}")
        claims_run = ""
        barrier = ctx.Barrier(RACERS)
        results = ctx.Queue()
        procs = [
            ctx.Process(
                target=_racer, args=(kind, uri, experiment_id, claims_run, barrier, results)
            )
            for _ in range(RACERS)
        ]
        for proc in procs:
            proc.start()
        got = [results.get(timeout=600) for _ in procs]
        for proc in procs:
            proc.join(timeout=60)
        errors = [g for g in got if not isinstance(g, tuple)]
        versions = sorted(g[0] for g in got if isinstance(g, tuple))
        slowest = max((g[1] for g in got if isinstance(g, tuple)), default=0.0)
        duplicates = sorted(v for v, c in Counter(versions).items() if c > 1)
        if errors:
            verdict = f"errors: {errors[:2]}"
        elif versions == list(range(1, RACERS + 1)):
            verdict = "exact 1..16"
        else:
            verdict = f"NOT exact: {versions} (duplicates {duplicates})"
        print(f"| {label} | {primitive} | {RACERS} | {verdict} | {slowest:.2f} s |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--runs", type=int, default=0, help="N (default 500, --quick 100)")
    parser.add_argument("--no-race", action="store_true", help="only the footprint table")
    parser.add_argument("--no-postgres", action="store_true", help="skip the PostgreSQL race")
    args = parser.parse_args()
    n = args.runs or (100 if args.quick else 500)
    root = Path(tempfile.mkdtemp(prefix="trainkit-bench-versions-"))
    from trainkit_tracking.testing import MlflowServer, migrated_sqlite_template

    template = migrated_sqlite_template(root / "template")
    footprint(template, root, n)
    if args.no_race:
        return

    print(f"\n{RACERS} processes released by a multiprocessing.Barrier, one claim each\n")
    print("| store | primitive | processes | versions | slowest claim after the release |")
    print("|---|---|---|---|---|")
    race(_fresh_store(template, root, "race"), "sqlite file")

    from pg import PostgresCluster, postgres_unavailable_reason

    reason = postgres_unavailable_reason()
    if args.no_postgres or reason is not None:
        print(f"\n(PostgreSQL race skipped: {reason or '--no-postgres'})")
        return
    with PostgresCluster() as cluster:
        server = MlflowServer(cluster.uri, root / "artifacts").start(timeout=120)
        try:
            race(server.uri, "mlflow server on PostgreSQL")
        finally:
            server.stop()


if __name__ == "__main__":
    main()
