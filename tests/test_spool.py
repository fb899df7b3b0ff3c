"""The spool file format, batching, and `sync`: exactly once, locked, against real sqlite stores."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from trainkit_tracking._journal.ledger import Ledger, read_set_aside
from trainkit_tracking._journal.run_logger import RunLogger, pending, sync
from trainkit_tracking._journal.spool import (
    MAX_BATCH_BYTES,
    SpoolWriter,
    ack_path,
    make_batches,
    read_spool,
    spool_paths,
)
from trainkit_tracking._store.store import Store
from trainkit_tracking.testing import TrainkitStore

# The journal's own tests run the sender users get: a process of its own.
pytestmark = pytest.mark.default_sender


@pytest.fixture
def store(trainkit_store: TrainkitStore) -> Store:
    return Store(trainkit_store.uri)


@pytest.fixture
def spool(tmp_path: Path) -> Path:
    return tmp_path / "spool"


def new_run(store: Store, name: str = "run") -> str:
    return store.create_run(store.get_or_create_experiment("spool"), name, {}).run_id


def points(store: Store, run_id: str, key: str) -> list[int]:
    """Steps of every stored point of ``key``, duplicates included."""
    return sorted(m.step for m in store.client.get_metric_history(run_id, key))


def write_spool(spool: Path, uri: str, run_id: str, records: list[dict[str, object]]) -> Path:
    """A spool file as a process that died right after spooling would leave it."""
    writer = SpoolWriter(spool, uri, run_id)
    for n, record in enumerate(records, start=1):
        record["n"] = n
    writer.append(records)
    writer.sync_to_disk()
    path = writer.path
    assert path is not None
    writer.close(delete=False)
    return path


def batch(key: str, steps: range, ts: int = 1_700_000_000_000) -> dict[str, object]:
    return {"t": "b", "m": [[key, float(s), ts + s, s] for s in steps]}


# --- file format --------------------------------------------------------------------


def test_writer_reader_round_trip_and_torn_last_line(spool: Path) -> None:
    writer = SpoolWriter(spool, "sqlite:///x.db", "a" * 32)
    writer.append([{"t": "b", "n": 1, "m": [["k", float("nan"), 1, 0]]}, {"t": "e", "n": 2,
                   "status": "FINISHED", "end": 5}])  # fmt: skip
    path = writer.path
    assert path is not None
    Ledger(path).stored(1)  # what the sender marks once the store took it
    writer.settle(1)
    assert path is not None and path.name.startswith("a" * 32) and path.suffix == ".jsonl"
    assert oct(path.stat().st_mode & 0o777) == oct(0o600)
    with open(path, "ab") as fh:
        fh.write(b'{"t":"b","n":3,"m":[["k",1.0')  # a write cut short by SIGKILL
    content = read_spool(path)
    assert (content.tracking_uri, content.run_id) == ("sqlite:///x.db", "a" * 32)
    assert content.done == {1}
    assert [r["n"] for r in content.pending] == [2]
    assert content.corrupt_lines == 1
    nan = content.records[1]["m"][0][1]
    assert nan != nan
    writer.close(delete=False)
    assert path.exists()


def test_sync_stores_a_live_file_and_leaves_it_to_its_writer(store: Store, spool: Path) -> None:
    run_id = new_run(store)
    writer = SpoolWriter(spool, store.tracking_uri, run_id)
    writer.append([{**batch("m", range(3)), "n": 1}])
    report = sync(spool)  # sync stores what the journal holds, live files included
    assert (report.busy, report.sent, report.pending) == (0, 1, 0)
    assert points(store, run_id, "m") == [0, 1, 2]
    assert not list(spool.glob("*.tmp"))  # a file is locked before it is visible
    assert writer.path is not None and writer.path.exists()  # its writer lives: it closes it
    writer.close(delete=False)
    assert spool_paths(spool) == [] or read_spool(spool_paths(spool)[0]).pending == []


def test_segments_rotate_once_fully_acknowledged(
    spool: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import trainkit_tracking._journal.spool as spool_module

    monkeypatch.setattr(spool_module, "ROTATE_BYTES", 2000)
    writer = SpoolWriter(spool, "sqlite:///x.db", "c" * 32)
    first = writer.path
    writer.append([{**batch("m", range(200)), "n": 1}])
    assert first is not None
    Ledger(first).stored(1)
    writer.settle(1)
    assert not first.exists() and not ack_path(first).exists()  # all done and big: dropped
    writer.append([{**batch("m", range(2)), "n": 2}])
    second = writer.path
    assert second is not None and second != first and second.name.endswith(".0002.jsonl")
    assert [r["n"] for r in read_spool(second).pending] == [2]
    writer.close(delete=False)


def test_make_batches_respects_every_mlflow_limit() -> None:
    pts = [(f"m{i % 7}", float(i), i, i) for i in range(2500)]
    params = {f"p{i}": "v" * 5000 for i in range(250)}
    tags = {f"t{i}": "é" * 2000 for i in range(150)}
    batches = make_batches(pts, params, tags)
    for b in batches:
        m, p, g = (len(b.get(k, ())) for k in "mpg")
        assert m <= 1000 and p <= 100 and g <= 100 and m + p + g <= 1000
        assert len(json.dumps(b).encode()) < 1_000_000
    assert [pt for b in batches for pt in b.get("m", ())] == pts
    assert {k: v for b in batches for k, v in b.get("p", {}).items()} == params
    assert {k: v for b in batches for k, v in b.get("g", {}).items()} == tags
    assert MAX_BATCH_BYTES < 1_000_000
    assert make_batches([], {}, {}) == []


# --- sync ---------------------------------------------------------------------------


def test_sync_sends_data_then_ends_the_run(store: Store, spool: Path) -> None:
    run_id = new_run(store)
    write_spool(
        spool,
        store.tracking_uri,
        run_id,
        [
            batch("loss", range(1500)),
            {"t": "b", "p": {"lr": "0.1"}, "g": {"stage": "x"}},
            {"t": "e", "status": "KILLED", "end": 1_700_000_009_000},
        ],
    )
    assert pending(spool) == 3
    seen: list[tuple[int, int]] = []
    report = sync(spool, progress=lambda done, total: seen.append((done, total)))
    assert report.ok, report.errors
    assert (report.sent, report.metrics, report.params, report.tags, report.terminated) == (
        3, 1500, 1, 1, 1,
    )  # fmt: skip
    assert seen[-1] == (3, 3) and len(seen) == 3
    run = store.get_run(run_id)
    assert (run.status, run.end_time) == ("KILLED", 1_700_000_009_000)
    assert run.params == {"lr": "0.1"} and run.tags["stage"] == "x"
    assert points(store, run_id, "loss") == list(range(1500))
    assert spool_paths(spool) == [] and report.pending == 0


def test_sync_after_a_crash_between_send_and_acknowledgement_is_exactly_once(
    store: Store, spool: Path, tmp_path: Path
) -> None:
    logger = RunLogger(store.tracking_uri, new_run(store), spool_dir=spool)
    for step in range(2000):
        logger.log_metrics({"a": float(step), "b": step * 2.0}, step=step)
    logger.log_params({"seed": 1})
    assert logger.flush(60)
    (live,) = spool_paths(spool)
    # What the file would hold had the process died before writing its acknowledgements.
    lost_acks = spool / live.name.replace(".0001.", ".9999.")
    lines = [ln for ln in live.read_text().splitlines() if json.loads(ln)["t"] != "d"]
    lost_acks.write_text("\n".join(lines) + "\n")
    assert logger.end()
    assert pending(spool) >= 4
    report = sync(spool)  # sends the copy itself, or watches the live sender send it
    assert report.ok and report.pending == 0
    assert points(store, logger.run_id, "a") == list(range(2000))
    assert points(store, logger.run_id, "b") == list(range(2000))
    assert pending(spool) == 0
    assert sync(spool).sent == 0  # nothing left: a second sync is a no-op


def test_two_concurrent_syncs_send_each_record_once(store: Store, spool: Path) -> None:
    run_ids = [new_run(store, f"r{i}") for i in range(6)]
    for run_id in run_ids:
        write_spool(spool, store.tracking_uri, run_id,
                    [batch("m", range(i * 100, i * 100 + 100)) for i in range(20)])  # fmt: skip
    code = textwrap.dedent(
        """
        import json, sys
        from pathlib import Path
        from trainkit_tracking._journal.run_logger import sync
        report = sync(Path(sys.argv[1]))
        print(json.dumps({"sent": report.sent, "busy": report.busy, "errors": report.errors}))
        """
    )
    env = {**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"}
    procs = [
        subprocess.Popen([sys.executable, "-c", code, str(spool)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]  # fmt: skip
    results = []
    for proc in procs:
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, err
        results.append(json.loads(out.strip().splitlines()[-1]))
    assert not any(r["errors"] for r in results)
    # Each file was sent by exactly one of them, whoever locked it first.
    assert sum(r["sent"] for r in results) == 6 * 20
    for run_id in run_ids:
        assert points(store, run_id, "m") == list(range(2000))
    assert pending(spool) == 0


def test_dry_run_sends_nothing(store: Store, spool: Path) -> None:
    run_id = new_run(store)
    write_spool(spool, store.tracking_uri, run_id, [batch("m", range(10))])
    report = sync(spool, dry_run=True)
    assert (report.dry_run, report.sent, report.metrics, report.pending) == (True, 1, 10, 1)
    assert points(store, run_id, "m") == []


def test_tracking_uri_limits_the_sync(store: Store, spool: Path) -> None:
    run_id = new_run(store)
    write_spool(spool, store.tracking_uri, run_id, [batch("m", range(3))])
    write_spool(spool, "sqlite:////elsewhere/mlflow.db", "d" * 32, [batch("m", range(3))])
    report = sync(spool, tracking_uri=store.tracking_uri)
    assert (report.sent, report.other_store, report.pending) == (1, 1, 1)
    assert points(store, run_id, "m") == [0, 1, 2]


def test_sync_sets_aside_an_artifact_that_is_gone_and_ends_the_run(
    store: Store, spool: Path, tmp_path: Path
) -> None:
    run_id = new_run(store)
    good, gone = tmp_path / "good.txt", tmp_path / "gone.txt"
    for path in (good, gone):
        path.write_text(path.name)
    write_spool(
        spool,
        store.tracking_uri,
        run_id,
        [
            {"t": "a", "src": str(good), "dst": "d", "dir": False, "tmp": False},
            {"t": "a", "src": str(gone), "dst": None, "dir": False, "tmp": False},
            {"t": "e", "status": "FINISHED", "end": 1_700_000_000_000},
        ],
    )
    gone.unlink()
    report = sync(spool)
    # The missing file costs only itself: set aside (this machine failed it), the rest stored.
    assert report.ok and report.artifacts == 1 and report.terminated == 1
    assert len(report.refused) == 1 and "no longer exists" in report.refused[0]
    (entry,) = read_set_aside(spool)
    assert (entry["run"], entry["origin"]) == (run_id, "local")
    assert [a.path for a in store.client.list_artifacts(run_id, "d")] == ["d/good.txt"]
    assert store.get_run(run_id).status == "FINISHED"
    assert pending(spool) == 0


def test_a_deleted_run_is_set_aside_and_stored_on_retry_once_restored(
    store: Store, spool: Path
) -> None:
    run_id = new_run(store)
    store.client.delete_run(run_id)
    write_spool(spool, store.tracking_uri, run_id,
                [batch("m", range(3)), {"t": "e", "status": "FINISHED", "end": 1}])  # fmt: skip
    report = sync(spool)
    # Refused by the store: set aside (never retried by itself, never blocking anything).
    assert report.ok and len(report.refused) == 2 and report.pending == 0
    assert spool_paths(spool) == [] and len(read_set_aside(spool)) == 2
    assert sync(spool).refused == []  # a plain sync does not try them again
    store.client.restore_run(run_id)
    retried = sync(spool, retry_set_aside=True)
    assert retried.retried == 2 and read_set_aside(spool) == []
    assert store.get_run(run_id).status == "FINISHED"
    assert points(store, run_id, "m") == [0, 1, 2]


def test_sync_of_an_empty_or_missing_spool(tmp_path: Path) -> None:
    report = sync(tmp_path / "nothing-here")
    assert (report.files, report.sent, report.pending, report.ok) == (0, 0, 0, True)
    assert pending(tmp_path / "nothing-here") == 0


def test_file_without_header_is_reported_not_sent(spool: Path) -> None:
    spool.mkdir()
    (spool / "junk.jsonl").write_text('{"t":"b","n":1,"m":[]}\n')
    report = sync(spool)
    assert not report.ok and "no header" in report.errors[0]
    assert (spool / "junk.jsonl").exists()
