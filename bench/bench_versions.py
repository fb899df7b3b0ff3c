"""What version claims cost, and whether a lighter primitive keeps versions exact.

Today a version is claimed by creating a hidden (soft-deleted) experiment whose name is
unique to (experiment, base name, version). This prints, for N versioned runs on a local
sqlite store: the experiments left behind and the time to list every experiment
(``search_experiments``, all pages, ``view_type`` ALL and ACTIVE_ONLY; the fastest of
15 interleaved rounds), against raw MLflow (N runs, no claims) and against a prototype of "one claims run per experiment, first writer wins" (a claim is
``log_param(claims_run, "<base sha>/<N>", token)``: params are immutable, the
(run, key) primary key lets exactly one value in). Then 16 processes, released together by
a ``multiprocessing.Barrier``, each claim one version of the same base with both
primitives, on sqlite and (when PostgreSQL is installed) on a PostgreSQL-backed
``mlflow server``: the versions they got, which must be exactly 1..16. docs/versions.md.

    python bench/bench_versions.py            # N = 500
    python bench/bench_versions.py --quick    # N = 100
    python bench/bench_versions.py --no-race  # the footprint table only

Reports timings, asserts none; the race rows say "exact" or list the duplicates.
"""

from __future__ import annotations

import argparse
import hashlib
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


def _digest(base: str) -> str:
    return hashlib.sha256(base.encode("utf-8")).hexdigest()[:32]


def param_claim(client: Any, claims_run: str, base: str, start: int = 1) -> int:
    """The prototype: claim the first free version >= start as a param of the claims run.

    The param decides: after any error the run is read back, and the version is ours only
    if the param holds our token (so a retried call whose first try committed still wins).
    """
    token = uuid.uuid4().hex
    prefix = f"{_digest(base)}/"
    version = start
    while True:
        key = f"{prefix}{version}"
        try:
            client.log_param(claims_run, key, token)
            return version
        except Exception:  # another value is in, or the call failed: read it back
            pass
        params = client.get_run(claims_run).data.params
        owner = params.get(key)
        if owner == token:
            return version
        if owner is None:
            time.sleep(0.01)  # the call failed before writing: try the same number again
            continue
        taken = {int(k[len(prefix) :]) for k in params if k.startswith(prefix)}
        version += 1
        while version in taken:
            version += 1


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

    def params(uri: str) -> None:
        client = MlflowClient(uri)
        experiment = client.create_experiment("versions-bench")
        claims_experiment = client.create_experiment(".trainkit-claims")
        claims_run = client.create_run(claims_experiment, run_name=".trainkit-claims").info.run_id
        version = 1
        for _ in range(n):
            version = param_claim(client, claims_run, BASE, version)
            run = client.create_run(experiment, run_name=f"{BASE}_{version}")
            client.set_terminated(run.info.run_id)
            version += 1

    rows = []
    for label, create in (
        ("hidden experiment per claim (today)", today),
        ("raw MLflow, no claims", raw),
        ("claims run, param per claim (prototype)", params),
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
            version = param_claim(client, claims_run, BASE)
        results.put((version, time.monotonic() - released))
    except BaseException as exc:
        results.put(f"{type(exc).__name__}: {exc}")
        raise


def race(uri: str, label: str) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    ctx = multiprocessing.get_context("spawn")
    for kind, primitive in (
        ("today", "hidden experiment per claim"),
        ("params", "claims run, param per claim"),
    ):
        experiment_id = client.create_experiment(f"race-{kind}-{uuid.uuid4().hex[:8]}")
        claims_run = ""
        if kind == "params":
            claims = client.create_experiment(f".trainkit-claims-{uuid.uuid4().hex[:8]}")
            claims_run = client.create_run(claims).info.run_id
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
