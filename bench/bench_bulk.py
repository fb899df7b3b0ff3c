"""Benchmark: points bulk-inserted into MLflow's own tables (SPEC section 17) against raw
``log_batch``, side by side in one run, on sqlite and on a ``postgresql://`` store.

1. The store: points in batches of 1,000 through ``Store.log_batch`` (the bulk path)
   against ``MlflowClient.log_batch`` of prebuilt ``Metric``s, A-B-B-A into fresh runs.
2. End to end: points logged by a ``RunLogger`` (5 per step) until ``flush()`` returns, the
   sender process storing them, against the same raw ``log_batch``; and the CPU time the
   sender process spent per 1,000 points (what it takes from the training loop's machine).
3. The training loop of ``bench_sender.py`` on sqlite, logging at twice what raw
   ``log_batch`` absorbs (measured first), against the same loop untracked (median of 3,
   alternating), the sender process included.

    python bench/bench_bulk.py            # the table in docs/performance.md
    python bench/bench_bulk.py --quick    # a smoke run for CI; numbers meaningless

The PostgreSQL cluster is tests/pg.py's (Debian's postgresql package). Timings are
reported, never asserted.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
# The PostgreSQL cluster manager is the test suite's (tests/pg.py), not the package's.
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from bench_sender import run_loop, step_size, table
from pg import PostgresCluster, postgres_unavailable_reason

BATCH = 1000


def batches(points: int, offset: int) -> list[list[tuple[str, float, int, int]]]:
    """``points`` as batches of 1,000: 5 keys, a step per 5 points (a training loop's)."""
    now = int(time.time() * 1000)
    flat = [(f"k{i % 5}", float(i), now + offset, i // 5) for i in range(points)]
    return [flat[i : i + BATCH] for i in range(0, points, BATCH)]


def store_rates(uri: str, points: int) -> tuple[float, float, str]:
    """Points/s of Store.log_batch and of raw log_batch, A-B-B-A; and the store's path."""
    from mlflow.entities import Metric

    from trainkit_tracking._store.store import Store

    store = Store(uri, timeout=600)
    experiment = store.get_or_create_experiment("bench-bulk")
    path = store.metric_path()
    times: dict[str, list[float]] = {"ours": [], "raw": []}
    for round_, side in enumerate(("ours", "raw", "raw", "ours")):
        run_id = store.create_run(experiment, f"{side}-{round_}", {}).run_id
        data = batches(points, round_)
        if side == "ours":
            start = time.perf_counter()
            for batch in data:
                store.log_batch(run_id, metrics=batch)
        else:
            metrics = [[Metric(*p) for p in batch] for batch in data]
            start = time.perf_counter()
            for entities in metrics:
                store.client.log_batch(run_id, metrics=entities)
        times[side].append(time.perf_counter() - start)
    ours, raw = (points * 2 / sum(times[side]) for side in ("ours", "raw"))
    return ours, raw, path


LOGGED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from trainkit_tracking._journal.run_logger import RunLogger
    from trainkit_tracking._journal.sender_lock import read_status
    from trainkit_tracking._journal.spool import uri_id
    from trainkit_tracking._store.store import Store
    uri, n, spool = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    store = Store(uri)
    run_id = store.create_run(store.get_or_create_experiment("bench-bulk"), "in", {}).run_id
    logger = RunLogger(uri, run_id, spool_dir=spool)
    logger.log_metric("warm", 1.0)
    assert logger.flush(120)  # the sender is up, as raw MLflow's client is
    sender = int(read_status(Path(spool), uri_id(uri))["pid"])
    def cpu():  # the sender process's user + system time, in seconds
        fields = open(f"/proc/{sender}/stat").read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    start, cpu0 = time.perf_counter(), cpu()
    for i in range(n // 5):
        logger.log_metrics({f"k{j}": float(i) for j in range(5)}, step=i)
    assert logger.flush(900)
    print(n / (time.perf_counter() - start), (cpu() - cpu0) / n * 1000)
    assert logger.end(timeout=120)
    """
)


def logged_rate(uri: str, points: int, spool: Path) -> tuple[float, float]:
    """Points/s from the first log_metrics call until flush() returns (sender process),
    and the sender's CPU seconds per 1,000 points."""
    env = {**os.environ, "TRAINKIT_SENDER": "process"}
    out = subprocess.run(
        [sys.executable, "-c", LOGGED, uri, str(points), str(spool)],
        capture_output=True, text=True, env=env, check=False, timeout=1800,
    )  # fmt: skip
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    rate, cpu = out.stdout.strip().splitlines()[-1].split()
    return float(rate), float(cpu)


def loop_slowdown(uri: str, raw: float, seconds: float, reps: int, root: Path) -> list[str]:
    """The training loop at twice ``raw`` points/s: its time against untracked, in %,
    untracked and tracked runs alternating (the machine's load moves both)."""
    rate = 2 * raw
    size = step_size(5 / rate)  # a step per 5 points at this rate
    spool = root / "spool-loop"
    times: dict[str, list[float]] = {"none": [], "process": []}
    for _ in range(reps):
        for mode in times:
            times[mode].append(run_loop(mode, uri, rate, seconds, size, spool)["loop"])
    base, ours = (statistics.median(times[mode]) for mode in times)
    return [
        f"{rate:,.0f} (2x raw)",
        f"{base:.2f} s",
        f"{ours:.2f} s",
        f"{(ours / base - 1) * 100:+.1f}%",
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a CI smoke run")
    args = parser.parse_args(argv)
    points, logged, seconds, reps = (
        (5_000, 5_000, 1.0, 1) if args.quick else (50_000, 100_000, 5.0, 3)
    )
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    rows_store, rows_logged = [], []
    with tempfile.TemporaryDirectory(prefix="trainkit-bench-bulk-") as tmp:
        root = Path(tmp)
        stores = [("sqlite", f"sqlite:///{root / 'bench.db'}")]
        reason = postgres_unavailable_reason()
        cluster = PostgresCluster().start() if reason is None else None
        try:
            if cluster is not None:
                stores.append(("postgresql://", cluster.uri))
            else:
                print(f"(no PostgreSQL: {reason})", file=sys.stderr)
            raws = {}
            for label, uri in stores:
                ours, raw, path = store_rates(uri, points)
                raws[label] = raw
                rows_store.append(
                    [label, f"{ours:,.0f}", f"{raw:,.0f}", f"{ours / raw:.1f}x", path]
                )
                spool = root / f"spool-{len(rows_logged)}"
                rate, cpu = logged_rate(uri, logged, spool)
                rows_logged.append(
                    [
                        label,
                        f"{rate:,.0f}",
                        f"{raw:,.0f}",
                        f"{rate / raw:.1f}x",
                        f"{cpu * 1000:.0f} ms",
                    ]
                )
                print(f"ingestion on {label} done", file=sys.stderr)
            loop = loop_slowdown(stores[0][1], raws["sqlite"], seconds, reps, root)
        finally:
            if cluster is not None:
                cluster.stop()
    import mlflow
    import sqlalchemy

    import trainkit_tracking

    print(
        f"trainkit-tracking {trainkit_tracking.__version__}, mlflow {mlflow.__version__}, "
        f"SQLAlchemy {sqlalchemy.__version__}, Python {platform.python_version()}, "
        f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs"
        f"{' (quick)' if args.quick else ''}, load average {os.getloadavg()[0]:.1f}\n"
    )
    print(f"Store.log_batch of {points:,} points (batches of 1,000) against raw log_batch:\n")
    header = ["store", "ours points/s", "raw log_batch points/s", "ratio", "path"]
    print(table(header, rows_store))
    print(f"\n{logged:,} points logged and flushed (the sender process) against raw:\n")
    header = [
        "store",
        "ours points/s",
        "raw log_batch points/s",
        "ratio",
        "sender CPU / 1,000 points",
    ]
    print(table(header, rows_logged))
    print(f"\nThe training loop on sqlite, median of {reps}, against the same loop untracked:\n")
    print(table(["points/s", "untracked", "sender process", "slowdown"], [loop]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
