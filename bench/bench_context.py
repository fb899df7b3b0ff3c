"""Benchmark: what run context tags and the system-metrics sampler cost.

Measures, on a temporary sqlite store, inside this checkout (a git work tree):
- the context tags: reading them once per Tracker (git status, package metadata), and
  what they add to every later ``start_run`` (merging the cached tags), with the
  end-to-end ``start_run`` + ``end`` median with and without them;
- the sampler: the CPU time of one sample round, the process CPU time it adds over a
  window at a 1 s interval (extrapolated to the default 10 s), and the
  ``log_metrics`` call median while it runs and while it does not.

    python bench/bench_context.py [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

Row = tuple[str, str, str]


def fmt(seconds: float) -> str:
    if seconds >= 1:
        return f"{seconds:.2f} s"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.2f} ms"
    return f"{seconds * 1e6:.1f} us"


def timed(fn: Callable[[], object], n: int) -> list[float]:
    times = []
    for _ in range(n):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return times


def bench_context_tags(uri: str, spool: Path, n: int) -> list[Row]:
    from trainkit_tracking import RunSpec, TagKeys, Tracker
    from trainkit_tracking._insight.context import RunContext, git_info, package_versions

    keys = TagKeys.default()
    git = statistics.median(timed(lambda: git_info(ROOT), max(5, n // 10)))

    def versions() -> None:
        package_versions.cache_clear()
        package_versions()

    metadata = statistics.median(timed(versions, max(5, n // 10)))
    first = statistics.median(
        timed(lambda: RunContext(os.environ, ROOT).tags(keys), max(5, n // 10))
    )
    spec = RunSpec(kind="hpo_trial", model="bert", study_key_hash="ab" * 8, trial_number=3)
    with_ctx = Tracker("ctx-bench", uri, spool_dir=spool, cwd=ROOT)
    without = Tracker("ctx-bench", uri, spool_dir=spool, cwd=ROOT, context=False)
    with_ctx.setup()
    without.setup()
    with_ctx._spec_tags(spec)  # the first call reads git and metadata
    tags_on = statistics.median(timed(lambda: with_ctx._spec_tags(spec), n * 20))
    tags_off = statistics.median(timed(lambda: without._spec_tags(spec), n * 20))

    def start_end(tracker: Tracker) -> Callable[[], None]:
        def run() -> None:
            tracker.start_run(spec.child("hpo_trial", trial_number=3)).end(timeout=60)

        return run

    on, off = [], []
    for _ in range(n):  # alternating turns: the store slows down as it fills
        off += timed(start_end(without), 1)
        on += timed(start_end(with_ctx), 1)
    added = tags_on - tags_off
    return [
        ("context: git status, once per Tracker", fmt(git), "one subprocess, 2 s timeout"),
        ("context: package metadata, once per process", fmt(metadata), "4 distributions"),
        ("context: first run of a Tracker, all tags", fmt(first), "git + host + user + env"),
        (
            "context: added per later start_run",
            fmt(added),
            f"spec tags {fmt(tags_on)} with vs {fmt(tags_off)} without",
        ),
        (
            "start_run + end, sqlite, median",
            f"{fmt(statistics.median(on))} with",
            f"{fmt(statistics.median(off))} without ({n} each)",
        ),
    ]


def bench_sampler(uri: str, spool: Path, window: float, calls: int) -> list[Row]:
    from trainkit_tracking import RunSpec, Tracker
    from trainkit_tracking._insight.system import DEFAULT_INTERVAL

    spec = RunSpec(kind="final_training", model="bert")
    probe_tracker = Tracker("sys-bench", uri, spool_dir=spool, system_metrics=True)
    sampler = probe_tracker._system
    assert sampler is not None
    probes, shutdown = sampler._probes()
    rounds = 200
    cpu0 = time.process_time()
    for _ in range(rounds):
        sampler._sample(probes)
    per_round = (time.process_time() - cpu0) / rounds
    shutdown()

    def idle_cpu(system_metrics: bool) -> float:
        tracker = Tracker(
            "sys-bench",
            uri,
            spool_dir=spool,
            system_metrics=system_metrics,
            system_metrics_interval=1.0,
        )
        with tracker.start_run(spec.model_copy(update={"variant": 2})):
            cpu = time.process_time()
            time.sleep(window)  # the process is idle: what it spends is background work
            return time.process_time() - cpu

    baseline = idle_cpu(False)
    sampled = idle_cpu(True)
    per_second = max(0.0, sampled - baseline) / window  # CPU seconds per second at 1 s
    at_default = per_second / DEFAULT_INTERVAL

    def call_median(system_metrics: bool) -> float:
        tracker = Tracker(
            "sys-bench",
            uri,
            spool_dir=spool,
            system_metrics=system_metrics,
            system_metrics_interval=1.0,
        )
        with tracker.start_run(spec.model_copy(update={"variant": 3})) as run:
            step = iter(range(10**9))
            times = timed(lambda: run.log_metrics({"loss": 0.5}, step=next(step)), calls)
        return statistics.median(times)

    calls_off = call_median(False)
    calls_on = call_median(True)
    return [
        ("sampler: one sample round, CPU time", fmt(per_round), "4 host probes, no GPU here"),
        (
            f"sampler: process CPU at 1 s interval over {window:.0f} s",
            f"{per_second * 100:.3f}% of a core",
            f"{fmt(sampled)} vs {fmt(baseline)} CPU without; mostly the worker storing the points",
        ),
        (
            "sampler: extrapolated to the default 10 s interval",
            f"{at_default * 100:.4f}% of a core",
            "target < 1%",
        ),
        (
            "log_metrics call, median",
            f"{fmt(calls_on)} with the sampler",
            f"{fmt(calls_off)} without ({calls} calls each)",
        ),
    ]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="a CI smoke run; numbers meaningless")
    args = parser.parse_args(argv)
    n, window, calls = (5, 2.0, 500) if args.quick else (40, 20.0, 5000)
    import mlflow
    import psutil

    import trainkit_tracking

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        uri = f"sqlite:///{root}/mlflow-{uuid.uuid4().hex[:6]}.db"
        spool = root / "spool"
        rows = bench_context_tags(uri, spool, n) + bench_sampler(uri, spool, window, calls)
    print(
        f"trainkit-tracking {trainkit_tracking.__version__}, mlflow {mlflow.__version__}, "
        f"psutil {psutil.__version__}, Python {sys.version.split()[0]}, "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| measure | value | detail |")
    print("|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
