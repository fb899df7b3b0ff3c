"""Benchmarks of trainkit_tracking's logging against raw MLflow, side by side in one run.

Prints a Markdown table of ratios measured on the same stores in the same process: a
sqlite store and a local ``mlflow server`` on 127.0.0.1 started by this script.

    python bench/bench_logging.py            # the table in docs/performance.md
    python bench/bench_logging.py --quick    # a smoke run for CI (small sizes, seconds)

Benchmarks never assert timings; they only report them.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")  # keep the table clean


@dataclass
class Sizes:
    calls: int  # single-metric calls, trainkit and MLflow async (which drains slowly)
    sync_calls: int  # synchronous mlflow.log_metric calls (milliseconds each)
    points: int  # points for sustained ingestion
    imports: int  # fresh interpreters for the import time


FULL = Sizes(calls=5_000, sync_calls=300, points=100_000, imports=7)
QUICK = Sizes(calls=300, sync_calls=20, points=5_000, imports=2)


@dataclass
class Row:
    benchmark: str
    store: str
    ours: str
    raw: str
    ratio: str


def fmt_time(seconds: float) -> str:
    if seconds < 1e-3:
        return f"{seconds * 1e6:.1f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


def per_call(fn: Callable[[int], object], n: int) -> list[float]:
    durations = []
    clock = time.perf_counter
    for i in range(n):
        start = clock()
        fn(i)
        durations.append(clock() - start)
    return durations


def p99(values: list[float]) -> float:
    return sorted(values)[min(len(values) - 1, int(len(values) * 0.99))]


# Stores --------------------------------------------------------------------------


def sqlite_store(root: Path) -> str:
    return f"sqlite:///{root / 'bench.db'}"


def start_server(root: Path) -> tuple[str, Callable[[], None]]:
    from trainkit_tracking.testing import MlflowServer

    server = MlflowServer(f"sqlite:///{root / 'server.db'}", root / "artifacts")
    server.start(timeout=180)
    return server.uri, server.stop


def new_run(uri: str, name: str) -> str:
    from trainkit_tracking._store.store import Store

    store = Store(uri)
    return store.create_run(store.get_or_create_experiment("bench"), name, {}).run_id


# Benchmarks ----------------------------------------------------------------------


def bench_per_call(uri: str, label: str, sizes: Sizes, spool: Path) -> list[Row]:
    """Cost of one logging call in the training loop, and time until all calls are stored."""
    import mlflow

    from trainkit_tracking._journal.run_logger import RunLogger

    logger = RunLogger(uri, new_run(uri, "ours-per-call"), spool_dir=spool)
    start = time.perf_counter()
    ours = per_call(lambda i: logger.log_metrics({"loss": 1.0 / (i + 1)}, step=i), sizes.calls)
    logger.end(timeout=600)
    ours_stored = time.perf_counter() - start

    mlflow.set_tracking_uri(uri)
    with mlflow.start_run(run_id=new_run(uri, "mlflow-sync")):
        sync = per_call(lambda i: mlflow.log_metric("loss", 1.0 / (i + 1), step=i),
                        sizes.sync_calls)  # fmt: skip
    with mlflow.start_run(run_id=new_run(uri, "mlflow-async")):
        start = time.perf_counter()
        asynchronous = per_call(
            lambda i: mlflow.log_metric("loss", 1.0 / (i + 1), step=i, synchronous=False),
            sizes.calls,
        )
        mlflow.flush_async_logging()
        async_stored = time.perf_counter() - start
    m_ours, m_sync, m_async = (statistics.median(d) for d in (ours, sync, asynchronous))
    ours_cell = f"{fmt_time(m_ours)} ({fmt_time(p99(ours))})"
    return [
        Row("log_metrics call, median (p99)", label, ours_cell,
            f"sync log_metric {fmt_time(m_sync)} ({fmt_time(p99(sync))})",
            f"{m_sync / m_ours:,.0f}x faster"),
        Row("log_metrics call, median (p99)", label, ours_cell,
            f"async log_metric {fmt_time(m_async)} ({fmt_time(p99(asynchronous))})",
            f"{m_async / m_ours:,.0f}x faster"),
        Row(f"{sizes.calls:,} single-metric calls until stored", label, fmt_time(ours_stored),
            f"async log_metric {fmt_time(async_stored)}",
            f"{async_stored / ours_stored:,.1f}x faster"),
    ]  # fmt: skip


def bench_ingestion(uri: str, label: str, sizes: Sizes, spool: Path) -> list[Row]:
    """Sustained ingestion: N points from the first call until stored, vs log_batch in 1000s."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from trainkit_tracking._journal.run_logger import RunLogger

    keys = [f"m{k:02d}" for k in range(100)]
    steps = sizes.points // len(keys)

    client = MlflowClient(uri)

    def raw() -> float:
        run_id = new_run(uri, "raw-ingest")
        start = time.perf_counter()
        ts = int(time.time() * 1000)
        batch: list[Metric] = []
        for step in range(steps):
            for key in keys:
                batch.append(Metric(key, step * 0.5, ts, step))
                if len(batch) == 1000:
                    client.log_batch(run_id, metrics=batch, synchronous=True)
                    batch = []
        if batch:
            client.log_batch(run_id, metrics=batch, synchronous=True)
        return time.perf_counter() - start

    def ours() -> float:
        logger = RunLogger(uri, new_run(uri, "ours-ingest"), spool_dir=spool)
        start = time.perf_counter()
        for step in range(steps):
            logger.log_metrics({key: step * 0.5 for key in keys}, step=step)
        if not logger.flush(timeout=3600):
            raise RuntimeError("flush timed out")
        elapsed = time.perf_counter() - start
        logger.end(timeout=600)
        return elapsed

    # A, B, B, A: the store slows down as it fills, so both sides get early and late turns.
    raw_time = raw()
    ours_time = ours() + ours()
    raw_time += raw()
    raw_time, ours_time = raw_time / 2, ours_time / 2
    n = steps * len(keys)
    return [
        Row(f"ingest {n:,} points until stored (mean of 2)", label,
            f"{fmt_time(ours_time)} ({n / ours_time:,.0f} pts/s)",
            f"log_batch x1000: {fmt_time(raw_time)} ({n / raw_time:,.0f} pts/s)",
            f"{raw_time / ours_time:.2f}x raw throughput")
    ]  # fmt: skip


def bench_tree_creation(uri: str, label: str, sizes: Sizes, spool: Path) -> list[Row]:
    """HPO tree creation (1 sweep, 20 trials x 5 folds) via the Tracker vs raw create_run."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_tree import bench_tree

    quick = sizes is QUICK
    trials, folds, rounds = (3, 2, 1) if quick else (20, 5, 3)
    ours, raw = bench_tree(uri, spool, trials=trials, folds=folds, rounds=rounds)
    runs = 1 + trials + trials * folds
    return [
        Row(f"create HPO tree, {runs} runs (median of {rounds})", label, fmt_time(ours),
            f"create_run, same tags: {fmt_time(raw)}", f"{ours / raw:.2f}x raw time")
    ]  # fmt: skip


def bench_import(sizes: Sizes) -> list[Row]:
    """``import trainkit_tracking`` in a fresh interpreter (SPEC: < 0.3 s), vs ``import mlflow``."""
    code = (
        "import time, sys; t = time.perf_counter(); import {mod}; "
        "sys.stdout.write(str(time.perf_counter() - t))"
    )

    def measure(mod: str) -> float:
        runs = []
        for _ in range(sizes.imports):
            out = subprocess.run([sys.executable, "-c", code.format(mod=mod)],
                                 capture_output=True, text=True, check=True)  # fmt: skip
            runs.append(float(out.stdout))
        return statistics.median(runs)

    ours, raw = measure("trainkit_tracking"), measure("mlflow")
    return [Row("import, fresh interpreter", "-", fmt_time(ours), f"import mlflow {fmt_time(raw)}",
                f"{raw / ours:.0f}x faster")]  # fmt: skip


# Main ----------------------------------------------------------------------------


def render(rows: list[Row]) -> str:
    header = ["benchmark", "store", "trainkit-tracking", "raw MLflow", "ratio"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += [f"| {r.benchmark} | {r.store} | {r.ours} | {r.raw} | {r.ratio} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a CI smoke run")
    parser.add_argument("--no-server", action="store_true", help="sqlite only")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trainkit-bench-") as tmp:
        root = Path(tmp)
        stores: list[tuple[str, str, Callable[[], None]]] = [
            ("sqlite", sqlite_store(root), lambda: None)
        ]
        if not args.no_server:
            uri, stop = start_server(root)
            stores.append(("local server", uri, stop))
        try:
            for label, uri, _ in stores:
                for bench in (bench_per_call, bench_ingestion, bench_tree_creation):
                    start = time.perf_counter()
                    rows += bench(uri, label, sizes, root / "spool")
                    took = time.perf_counter() - start
                    print(f"{bench.__name__} on {label}: {took:.1f}s", file=sys.stderr)
        finally:
            for _, _, stop in stores:
                stop()
    rows += bench_import(sizes)
    import mlflow

    import trainkit_tracking

    print(
        f"trainkit-tracking {trainkit_tracking.__version__}, mlflow {mlflow.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs{' (quick)' if args.quick else ''}\n"
    )
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
