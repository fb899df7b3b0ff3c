"""Benchmark: what sending costs the training loop, and what an outage costs in memory.

A loop whose steps release the GIL (a single-threaded torch matmul, as training steps do)
logs 5 metrics per step, at half and at twice the rate the store absorbs (measured first
with raw ``log_batch``). Its own time is compared with the same loop untracked, for
trainkit-tracking's sender process (the default), its in-process sender
(``TRAINKIT_SENDER=thread``) and MLflow's async logging. Each loop runs in a fresh
interpreter. Then: ingestion against raw ``log_batch``, the memory of a 5M-point outage,
and the time from a SIGKILL to the last point stored once the store is back.

    python bench/bench_sender.py            # the tables in docs/performance.md
    python bench/bench_sender.py --quick    # a smoke run for CI

The local server stands for another machine: it runs at nice 10 (as our sender does), so
that on a small machine it does not take the training loop's core. Timings are reported,
never asserted.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")

LOOP = textwrap.dedent(
    """
    import json, os, sys, time
    import torch
    torch.set_num_threads(1)
    mode, uri, rate, seconds = sys.argv[1], sys.argv[2], float(sys.argv[3]), float(sys.argv[4])
    size = int(sys.argv[5])
    a, b = torch.rand(size, size), torch.rand(size, size)
    steps = int(rate / 5 * seconds)
    log = None
    if mode in ("process", "thread"):
        from trainkit_tracking._journal.run_logger import RunLogger
        from trainkit_tracking._store.store import Store
        store = Store(uri)
        run_id = store.create_run(store.get_or_create_experiment("bench"), mode, {}).run_id
        logger = RunLogger(uri, run_id, spool_dir=sys.argv[6])
        log = logger.log_metrics
    elif mode == "mlflow-async":
        import mlflow
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("bench")
        mlflow.start_run()
        log = lambda m, step: mlflow.log_metrics(m, step=step, synchronous=False)
    for _ in range(20):
        torch.mm(a, b)
    import resource
    def cpu():
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    start, cpu0, main0 = time.perf_counter(), cpu(), time.thread_time()
    for step in range(steps):
        torch.mm(a, b)
        if log is not None:
            log({"loss": 0.5, "acc": 0.9, "lr": 1e-4, "grad": 1.0, "tok": 3.0}, step=step)
    loop = time.perf_counter() - start
    # CPU the process spent beside the loop's own thread (its background threads).
    background = (cpu() - cpu0) - (time.thread_time() - main0)
    if mode in ("process", "thread"):
        assert logger.end(timeout=600)  # drained before the next loop starts
    out = {"loop": loop, "all": time.perf_counter() - start, "steps": steps}
    print(json.dumps({**out, "background": background}), flush=True)
    os._exit(0)  # MLflow async would drain its queue first, for minutes: not measured
    """
)


def run_loop(mode: str, uri: str, rate: float, seconds: float, size: int, spool: Path) -> dict:
    env = {**os.environ, "TRAINKIT_SENDER": "thread" if mode == "thread" else "process"}
    out = subprocess.run(
        [sys.executable, "-c", LOOP, mode, uri, str(rate), str(seconds), str(size), str(spool)],
        capture_output=True,
        text=True,
        env=env,
        timeout=1800,
        check=False,
    )
    if out.returncode != 0:
        raise RuntimeError(out.stderr[-2000:])
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


def step_size(target_s: float) -> int:
    """A matmul size whose single-threaded step takes about ``target_s``."""
    import torch

    torch.set_num_threads(1)
    size = 16
    while True:
        a = torch.rand(size, size)
        start = time.perf_counter()
        for _ in range(50):
            torch.mm(a, a)
        took = (time.perf_counter() - start) / 50
        if took >= target_s or size > 2048:
            return size
        size = int(size * 1.15) + 1


def capacity(uri: str) -> float:
    """Points per second the store absorbs through raw log_batch (batches of 1000)."""
    from mlflow import MlflowClient
    from mlflow.entities import Metric

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name("bench")
    exp_id = exp.experiment_id if exp else client.create_experiment("bench")
    run_id = client.create_run(exp_id).info.run_id
    now = int(time.time() * 1000)
    batches = [
        [Metric(f"k{i % 5}", 1.0, now, b * 200 + i // 5) for i in range(1000)] for b in range(8)
    ]
    start = time.perf_counter()
    for batch in batches:
        client.log_batch(run_id, metrics=batch)
    return 8000 / (time.perf_counter() - start)


def start_server(root: Path, name: str) -> tuple[str, object]:
    from trainkit_tracking.testing import MlflowServer

    server = MlflowServer(f"sqlite:///{root / f'{name}.db'}", root / f"{name}-artifacts")
    server.start(timeout=180)
    assert server.pid is not None
    for pid in _group(server.pid):
        os.setpriority(os.PRIO_PROCESS, pid, 10)
    return server.uri, server


def _group(pgid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                if os.getpgid(int(entry)) == pgid:
                    pids.append(int(entry))
            except OSError:
                pass
    return pids


def bench_loops(
    stores: list[tuple[str, str]], seconds: float, root: Path, reps: int
) -> list[list[str]]:
    rows = []
    for label, uri in stores:
        cap = capacity(uri)
        for factor in (0.5, 2.0):
            rate = cap * factor
            size = step_size(5 / rate)  # a step per 5 points at this rate
            spool = root / f"spool-{label}-{factor}".replace(" ", "-")
            base = statistics.median(
                run_loop("none", uri, rate, seconds, size, spool)["loop"] for _ in range(reps)
            )
            cells = [label, f"{rate:,.0f} ({factor:g}x)"]
            for mode in ("process", "thread", "mlflow-async"):
                result = run_loop(mode, uri, rate, seconds, size, spool)
                cells.append(f"{(result['loop'] / base - 1) * 100:+.1f}%")
            rows.append(cells)
            print(f"loops on {label} at {factor}x done", file=sys.stderr)
    return rows


def bench_ingestion(stores: list[tuple[str, str]], points: int, root: Path) -> list[list[str]]:
    rows = []
    for label, uri in stores:
        raw = capacity(uri)
        env = {**os.environ, "TRAINKIT_SENDER": "process"}
        script = textwrap.dedent(
            """
            import sys, time
            from trainkit_tracking._journal.run_logger import RunLogger
            from trainkit_tracking._store.store import Store
            uri, n, spool = sys.argv[1], int(sys.argv[2]), sys.argv[3]
            store = Store(uri)
            run_id = store.create_run(store.get_or_create_experiment("bench"), "in", {}).run_id
            logger = RunLogger(uri, run_id, spool_dir=spool)
            logger.log_metric("warm", 1.0)
            assert logger.flush(120)  # the sender is up, as raw MLflow's client is
            start = time.perf_counter()
            for i in range(n // 5):
                logger.log_metrics({f"k{j}": float(i) for j in range(5)}, step=i)
            assert logger.flush(600)
            print(n / (time.perf_counter() - start))
            """
        )
        spool = root / f"spool-in-{label}".replace(" ", "-")
        out = subprocess.run(
            [sys.executable, "-c", script, uri, str(points), str(spool)],
            capture_output=True, text=True, env=env, check=True, timeout=1800,
        )  # fmt: skip
        ours = float(out.stdout.strip().splitlines()[-1])
        rows.append([label, f"{ours:,.0f}", f"{raw:,.0f}", f"{ours / raw:.2f}x"])
    return rows


OUTAGE = textwrap.dedent(
    """
    import os, sys, time
    from trainkit_tracking import RunSpec, Tracker
    uri, go, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
    def vm(key):
        with open("/proc/self/status") as fh:
            return next(int(l.split()[1]) / 1024 for l in fh if l.startswith(key + ":"))
    tracker = Tracker("outage", uri, fallback_to_local=False, timeout=5)
    spec = RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="ab12")
    run = tracker.start_run(spec)
    run.log_metric("warm", 1.0)
    assert run.flush(60)
    print("ready", run.id, flush=True)
    while not os.path.exists(go):
        time.sleep(0.01)
    before = vm("VmRSS")
    for step in range(n // 5):
        run.log_metrics({"a": 1.0, "b": 2.0, "c": 3.0, "d": 4.0, "e": float(step)}, step=step)
    run.flush(1.0)
    print("logged", before, vm("VmHWM"), flush=True)
    time.sleep(3600)
    """
)


def _vm(pid: int, key: str) -> float:
    with open(f"/proc/{pid}/status") as fh:
        return next(int(line.split()[1]) / 1024 for line in fh if line.startswith(key + ":"))


def _outage(
    points: int, root: Path, name: str
) -> tuple[str, object, subprocess.Popen[str], Path, str]:
    """A training process that logged ``points`` while the server was SIGKILLed."""
    uri, server = start_server(root, name)
    spool, go = root / f"spool-{name}", root / f"go-{name}"
    env = {**os.environ, "TRAINKIT_SPOOL_DIR": str(spool), "TRAINKIT_SENDER": "process"}
    proc = subprocess.Popen(
        [sys.executable, "-c", OUTAGE, uri, str(go), str(points)],
        stdout=subprocess.PIPE, text=True, env=env,
    )  # fmt: skip
    assert proc.stdout is not None
    run_id = proc.stdout.readline().split()[1]
    os.killpg(server.pid, signal.SIGKILL)  # type: ignore[attr-defined]
    go.touch()
    return uri, server, proc, spool, run_id


def bench_outage(rss_points: int, kill_points: int, root: Path) -> list[list[str]]:
    """RSS of the training process and of the sender through an outage of ``rss_points``;
    then, for ``kill_points``, SIGKILL of the training process and the time until the last
    point is stored once the server is back (no `sync`)."""
    from trainkit_tracking._journal.sender_lock import read_status
    from trainkit_tracking._journal.spool import uri_id
    from trainkit_tracking._store.store import Store

    uri, server, proc, spool, _ = _outage(rss_points, root, "rss")
    try:
        sender = int(read_status(spool, uri_id(uri))["pid"])
        sender_before = _vm(sender, "VmRSS")
        assert proc.stdout is not None
        _, before, peak = proc.stdout.readline().split()
        sender_peak = _vm(sender, "VmHWM")
        os.kill(sender, signal.SIGKILL)
    finally:
        proc.kill()
        server.stop()  # type: ignore[attr-defined]
    rows = [
        [f"training process ({rss_points:,} points)", f"{float(before):.0f} MB",
         f"+{float(peak) - float(before):.0f} MB"],
        [f"sender process ({rss_points:,} points)", f"{sender_before:.0f} MB",
         f"+{sender_peak - sender_before:.0f} MB"],
    ]  # fmt: skip
    uri, server, proc, spool, run_id = _outage(kill_points, root, "kill")
    try:
        assert proc.stdout is not None
        proc.stdout.readline()  # logged and spooled
        proc.kill()
        proc.wait()
        server.restart(timeout=180)  # type: ignore[attr-defined]
        back = time.perf_counter()
        store = Store(uri)
        while len(store.client.get_metric_history(run_id, "e")) < kill_points // 5:
            time.sleep(0.2)
        stored = time.perf_counter() - back
    finally:
        proc.kill()
        server.stop()  # type: ignore[attr-defined]
    rows.append(
        [f"SIGKILL with {kill_points:,} points unsent, store back: all stored after", "",
         f"{stored:.1f} s ({kill_points / stored:,.0f} points/s)"]
    )  # fmt: skip
    return rows


def table(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: a CI smoke run")
    args = parser.parse_args(argv)
    sizes = (2.0, 20_000, 200_000, 20_000) if args.quick else (5.0, 200_000, 5_000_000, 200_000)
    seconds, points, outage, killed = sizes
    reps = 1 if args.quick else 3
    import logging

    logging.getLogger("mlflow").setLevel(logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="trainkit-bench-") as tmp:
        root = Path(tmp)
        uri, server = start_server(root, "server")
        stores = [("sqlite", f"sqlite:///{root / 'bench.db'}"), ("local server", uri)]
        try:
            capacity(stores[0][1])  # creates the sqlite schema outside any timing
            # The quick run: sqlite only, one untracked baseline (a smoke run, not a number).
            loops = bench_loops(stores[:1] if args.quick else stores, seconds, root, reps)
            ingestion = bench_ingestion(stores, points, root)
        finally:
            server.stop()  # type: ignore[attr-defined]
        outages = bench_outage(outage, killed, root)
        shutil.rmtree(root, ignore_errors=True)
    import mlflow

    import trainkit_tracking

    print(
        f"trainkit-tracking {trainkit_tracking.__version__}, mlflow {mlflow.__version__}, "
        f"Python {platform.python_version()}, {platform.system()} {platform.machine()}, "
        f"{os.cpu_count()} CPUs{' (quick)' if args.quick else ''}\n"
    )
    print("Training-loop time against the same loop untracked (5 metrics per step):\n")
    header = ["store", "points/s", "sender process", "in-process sender", "MLflow async"]
    print(table(header, loops))
    print(f"\nIngestion of {points:,} points, logged and flushed, against raw log_batch:\n")
    print(table(["store", "ours points/s", "raw log_batch points/s", "ratio"], ingestion))
    print("\nAn outage (server SIGKILLed): resident memory, and recovery without sync:\n")
    print(table(["", "before", "growth (peak) / time"], outages))
    return 0


if __name__ == "__main__":
    sys.exit(main())
