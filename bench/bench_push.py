"""Benchmarks of ``push``: its throughput against raw ``log_batch``, and the cost of an unchanged store.

Prints a Markdown table measured on the same stores in the same process: a sqlite
source, and as targets a sqlite store and a local ``mlflow server`` on 127.0.0.1
started by this script.

    python bench/bench_push.py            # the table in docs/performance.md
    python bench/bench_push.py --quick    # a smoke run for CI (small sizes, seconds)

Benchmarks never assert timings; they only report them.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import statistics
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
    points: int  # points of the one run pushed for throughput
    keys: int  # metric keys it has
    rounds: int  # A-B-B-A rounds of throughput
    runs: tuple[int, ...]  # runs of the unchanged stores
    per_run: tuple[int, ...]  # points per run of the unchanged stores


FULL = Sizes(points=100_000, keys=10, rounds=2, runs=(20, 80), per_run=(100, 2_000))
QUICK = Sizes(points=3_000, keys=3, rounds=1, runs=(2, 4), per_run=(10, 100))


@dataclass
class Row:
    benchmark: str
    target: str
    push: str
    raw: str
    ratio: str


def fmt_time(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    return f"{seconds:.2f} s"


# Stores --------------------------------------------------------------------------


def fresh_sqlite(template: Path, path: Path) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, path)
    return f"sqlite:///{path}"


def start_server(root: Path, template: Path) -> tuple[str, Callable[[], None]]:
    from trainkit_tracking.testing import MlflowServer

    db = root / "server.db"
    shutil.copyfile(template, db)
    server = MlflowServer(f"sqlite:///{db}", root / "artifacts")
    server.start(timeout=180)
    return server.uri, server.stop


def fill(uri: str, experiment: str, runs: int, points: int, keys: int) -> None:
    """``runs`` finished runs of ``points`` points each over ``keys`` keys, with raw log_batch."""
    from trainkit_tracking._store.store import Store

    store = Store(uri)
    experiment_id = store.get_or_create_experiment(experiment)
    steps = max(1, points // keys)
    for number in range(runs):
        run_id = store.create_run(experiment_id, f"run-{number}", {"code.kind": "bench"}).run_id
        batch: list[tuple[str, float, int, int]] = []
        for step in range(steps):
            for key in range(keys):
                batch.append((f"m{key}", step / 3, 1_700_000_000_000 + step, step))
                if len(batch) == 1000:
                    store.log_batch(run_id, metrics=batch)
                    batch = []
        if batch:
            store.log_batch(run_id, metrics=batch)
        store.log_batch(run_id, params={"lr": "0.1"}, tags={"note": "bench"})
        store.terminate(run_id, "FINISHED", 1_800_000_000_000)


# Benchmarks ----------------------------------------------------------------------


def bench_throughput(source: str, target: str, label: str, sizes: Sizes) -> list[Row]:
    """Push one run of ``points`` points into a fresh experiment vs raw log_batch x1000."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    from trainkit_tracking import push
    from trainkit_tracking._store.store import Store

    steps = sizes.points // sizes.keys
    metrics = [
        Metric(f"m{key}", step / 3, 1_700_000_000_000 + step, step)
        for step in range(steps)
        for key in range(sizes.keys)
    ]
    client = MlflowClient(target)
    store = Store(target)
    counter = iter(range(1_000_000))

    def raw() -> float:
        exp = store.get_or_create_experiment(f"raw-{label}-{next(counter)}")
        run_id = client.create_run(exp).info.run_id
        start = time.perf_counter()
        for i in range(0, len(metrics), 1000):
            client.log_batch(run_id, metrics=metrics[i : i + 1000], synchronous=True)
        return time.perf_counter() - start

    def ours() -> float:
        name = f"push-{label}-{next(counter)}"
        fill(source, name, 1, sizes.points, sizes.keys)
        start = time.perf_counter()
        report = push(source, target, name)
        elapsed = time.perf_counter() - start
        assert report.points == steps * sizes.keys, report.points
        return elapsed

    raw_times: list[float] = []
    our_times: list[float] = []
    for _ in range(sizes.rounds):  # A-B-B-A: the store slows down as it fills
        raw_times.append(raw())
        our_times.append(ours())
        our_times.append(ours())
        raw_times.append(raw())
    n = steps * sizes.keys
    t_ours, t_raw = statistics.mean(our_times), statistics.mean(raw_times)
    return [
        Row(
            f"push one run of {n:,} points (mean of {len(our_times)})",
            label,
            f"{fmt_time(t_ours)} ({n / t_ours:,.0f} pts/s)",
            f"log_batch x1000: {fmt_time(t_raw)} ({n / t_raw:,.0f} pts/s)",
            f"{t_raw / t_ours:.2f}x raw throughput",
        )
    ]


def bench_unchanged(
    source_dir: Path, template: Path, target: str, label: str, sizes: Sizes
) -> list[Row]:
    """Push an unchanged store again: time per run, for two sizes of history."""
    from trainkit_tracking import push

    rows: list[Row] = []
    for runs in sizes.runs:
        cells: list[float] = []
        for per_run in sizes.per_run:
            name = f"unchanged-{label}-{runs}-{per_run}".replace(" ", "_")
            source = fresh_sqlite(template, source_dir / f"{name}.db")
            fill(source, name, runs, per_run, 10 if per_run >= 10 else 1)
            first = push(source, target, name)
            assert first.created == runs
            times = []
            for _ in range(3):
                start = time.perf_counter()
                again = push(source, target, name)
                times.append(time.perf_counter() - start)
                assert (again.unchanged, again.points) == (runs, 0)
            cells.append(statistics.median(times))
        small, large = cells
        rows.append(
            Row(
                f"push an unchanged store of {runs} runs again (median of 3)",
                label,
                f"{sizes.per_run[0]:,} pts/run: {fmt_time(small)} ({fmt_time(small / runs)}/run)",
                f"{sizes.per_run[1]:,} pts/run: {fmt_time(large)} ({fmt_time(large / runs)}/run)",
                f"{large / small:.2f}x for {sizes.per_run[1] // sizes.per_run[0]}x the points",
            )
        )
    return rows


def render(rows: list[Row]) -> str:
    lines = [
        "| benchmark | target | push | raw / other size | ratio |",
        "|---|---|---|---|---|",
    ]
    lines += [f"| {r.benchmark} | {r.target} | {r.push} | {r.raw} | {r.ratio} |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes (a smoke run)")
    parser.add_argument("--no-server", action="store_true", help="sqlite target only")
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else FULL

    import mlflow

    import trainkit_tracking
    from trainkit_tracking.testing import migrated_sqlite_template

    rows: list[Row] = []
    with tempfile.TemporaryDirectory(prefix="trainkit-bench-push-") as tmp:
        root = Path(tmp)
        os.chdir(root)  # default artifact roots land in the temporary directory
        template = migrated_sqlite_template(root / "template")
        source = fresh_sqlite(template, root / "source.db")
        targets: list[tuple[str, str, Callable[[], None]]] = [
            ("sqlite", fresh_sqlite(template, root / "target.db"), lambda: None)
        ]
        if not args.no_server:
            uri, stop = start_server(root, template)
            targets.append(("local server", uri, stop))
        try:
            for label, target, _ in targets:
                rows += bench_throughput(source, target, label, sizes)
                rows += bench_unchanged(root / "sources", template, target, label, sizes)
        finally:
            for _, _, stop in targets:
                stop()
    print(
        f"trainkit-tracking {trainkit_tracking.__version__}, mlflow {mlflow.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs; source: sqlite"
    )
    print()
    print(render(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
