"""``sync``: send what dead processes left in the spool to their store, exactly once.

Each spool file is locked first (files of live processes and of a concurrent ``sync``
are skipped), and so is the store's sender lock (a sender process that is sending them
has them). A record is marked done in the file's ack log right after the store took it;
resending one whose mark was lost stores nothing twice, and a tag is only re-sent when
no later record of the run sets it again, so a newer value is never reverted.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainkit_tracking._core.redact import get_logger, redact_value
from trainkit_tracking._journal.sender_lock import hold_lock
from trainkit_tracking._journal.spool import (
    AckLog,
    Record,
    SpoolFile,
    ack_path,
    checksum,
    default_spool_dir,
    read_lines,
    read_spool,
    send_record,
    spool_paths,
    try_lock,
    uri_id,
)
from trainkit_tracking._store.store import DEFAULT_TIMEOUT, Store, is_transient

log = get_logger(__name__)


@dataclass
class SyncReport:
    """What ``sync`` did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    files: int = 0  # spool files read
    sent: int = 0  # records sent: batches, artifact uploads, run terminations
    metrics: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    terminated: int = 0
    busy: int = 0  # files held by a live process or by another sync: left alone
    sending: int = 0  # files a sender process is sending: left to it
    other_store: int = 0  # files of another tracking URI than the one asked for
    other_experiment: int = 0  # runs of another experiment than the one asked for
    dropped: list[str] = field(default_factory=list)  # artifacts gone or changed on disk
    errors: list[str] = field(default_factory=list)  # records not stored; sent by a later sync
    refused: list[str] = field(default_factory=list)  # items the store refused for good
    pending: int = 0  # unsent records left in the spool afterwards

    @property
    def ok(self) -> bool:
        return not self.errors


def pending(spool_dir: Path | None = None) -> int:
    """The number of spooled records (batches, uploads, terminations) not yet stored."""
    total = 0
    for path in spool_paths(spool_dir or default_spool_dir()):
        with contextlib.suppress(OSError):
            total += len(read_spool(path).pending)
    return total


def _store_uri(spool: SpoolFile, tracking_uri: str | None, environ_uri: str | None) -> str | None:
    """The real URI of a spool file's store, or None when it is not known here.

    Headers keep the URI with its credentials masked, and an id of the real one: a URI
    given (``tracking_uri``, else ``MLFLOW_TRACKING_URI``) is used when its id matches.
    """
    for candidate in (tracking_uri, environ_uri):
        if candidate and (
            spool.uri_id == uri_id(candidate)
            or (spool.uri_id is None and spool.tracking_uri == candidate)
        ):
            return candidate
    if (
        tracking_uri is None
        and spool.tracking_uri
        and redact_value(spool.tracking_uri) == (spool.tracking_uri)
    ):
        return spool.tracking_uri  # nothing was masked: the header is the URI itself
    return None


def sync(
    spool_dir: Path | None = None,
    *,
    tracking_uri: str | None = None,
    experiment: str | None = None,
    dry_run: bool = False,
    progress: Callable[[int, int], None] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
) -> SyncReport:
    """Send leftover spooled records to their store, exactly once.

    Each file is locked first: files of live processes and of a concurrent ``sync`` are
    skipped. Records go to the store recorded in their file (``tracking_uri`` limits the
    sync to that store, and is needed for a store whose URI holds credentials);
    ``experiment`` (a name or id) limits it to that experiment's runs. A run's
    termination is sent after all its data and only when none of that data failed;
    items the store refuses for good are reported and never sent again. Every store
    call waits at most ``timeout`` seconds.
    """
    spool_dir = spool_dir or default_spool_dir()
    report = SyncReport(dry_run=dry_run)
    held: list[tuple[int, SpoolFile, str]] = []
    sender_locks: dict[str, int | None] = {}
    acks: dict[int, AckLog] = {}
    environ_uri = os.environ.get("MLFLOW_TRACKING_URI")
    try:
        for path in spool_paths(spool_dir):
            # The store's sender lock first, then the file's: a sender process (or another
            # sync) that holds the store keeps all of its files.
            uid = _header_uri_id(path)
            if uid is not None and not dry_run:
                if uid not in sender_locks:
                    sender_locks[uid] = hold_lock(spool_dir, uid)
                if sender_locks[uid] is None:
                    report.sending += 1
                    continue
            try:
                fd = os.open(path, os.O_RDWR)
            except FileNotFoundError:  # finished and deleted meanwhile
                continue
            if not try_lock(fd):
                os.close(fd)
                report.busy += 1
                continue
            spool = read_spool(path)
            report.files += 1
            uri = _store_uri(spool, tracking_uri, environ_uri)
            if spool.tracking_uri is None or spool.run_id is None:
                report.errors.append(f"{path}: no header, not a trainkit spool file; left alone")
            elif uri is None and tracking_uri is None and spool.pending:
                report.errors.append(
                    f"{path.name}: its store {spool.tracking_uri} has credentials in its URI, "
                    "which the spool does not keep; pass it with --tracking-uri"
                )
            elif uri is None:
                report.other_store += 1
            else:
                held.append((fd, spool, uri))
                continue
            os.close(fd)
        runs: dict[tuple[str, str], list[SpoolFile]] = {}
        for _, spool, uri in held:
            runs.setdefault((uri, str(spool.run_id)), []).append(spool)
        stores: dict[str, Store] = {}
        if experiment is not None:
            runs = _in_experiment(runs, experiment, stores, timeout, report)
        total = sum(len(s.pending) for spools in runs.values() for s in spools)
        done = 0
        for (uri, run_id), spools in runs.items():
            spools.sort(key=lambda sp: (sp.started, sp.path.name))
            todo = [(s, r) for s in spools for r in s.pending]
            todo.sort(key=lambda item: item[1]["t"] == "e")  # terminations last
            later_tags = _later_tags(spools)
            failed = False
            for spool, record in todo:
                done += 1
                if record["t"] == "e" and failed:
                    report.errors.append(
                        f"run {run_id}: not ended as {record['status']} because some of its "
                        "data was not stored"
                    )
                elif record["t"] == "a" and (reason := _artifact_problem(spool, record)):
                    report.dropped.append(f"run {run_id}: artifact {record['src']!r} {reason}")
                    if not dry_run:
                        _ack(acks, spool).write({"t": "x", "n": record["n"], "why": reason})
                        spool.done.add(record["n"])
                elif dry_run:
                    _count(report, record)
                else:
                    store = stores.setdefault(uri, Store(uri, timeout=timeout))
                    skip = later_tags.get((id(spool), record["n"]), frozenset())
                    try:
                        refused = send_record(store, run_id, record, skip_tags=skip)
                    except Exception as exc:
                        failed = True
                        report.errors.append(
                            f"run {run_id}: {_what(record)} not stored: {redact_value(str(exc))}"
                        )
                        if is_transient(exc):  # the store is down: try this run another time
                            break
                        continue  # refused as a whole (a deleted run): kept for a later sync
                    if refused:
                        report.refused.extend(f"run {run_id}: {r}" for r in refused)
                        _ack(acks, spool).write({"t": "r", "n": record["n"], "why": refused})
                    else:
                        _ack(acks, spool).write({"t": "d", "n": record["n"]})
                        _count(report, record)
                    spool.done.add(record["n"])
                if progress is not None:
                    progress(done, total)
    finally:
        for ack in acks.values():
            ack.close()
        for fd, _, _ in held:
            os.close(fd)
    # Unlocked first (Windows cannot delete an open file); a sync that locks one of these
    # in between finds nothing pending in it.
    for _, spool, _ in held:
        if not dry_run and not spool.pending:
            for path in (spool.path, ack_path(spool.path)):
                with contextlib.suppress(OSError):
                    path.unlink()
    for lock in sender_locks.values():
        if lock is not None:
            os.close(lock)
    report.pending = pending(spool_dir)
    return report


def _ack(acks: dict[int, AckLog], spool: SpoolFile) -> AckLog:
    return acks.setdefault(id(spool), AckLog(spool.path))


def _header_uri_id(path: Path) -> str | None:
    """The ``uri_id`` in a spool file's header (None for files written by 0.1)."""
    header = read_lines(path, 0, 64 << 10)[0]
    uid = header[0].get("uri_id") if header and header[0].get("t") == "h" else None
    return uid if isinstance(uid, str) else None


def _later_tags(spools: list[SpoolFile]) -> dict[tuple[int, int], frozenset[str]]:
    """For each pending batch of a run: the tags that a later record of the run sets again.

    Records are ordered by file (start time) and sequence number, done or not: a done
    record set the newer value in the store already, and must not be reverted.
    """
    ordered = [(id(s), n, r) for s in spools for n, r in sorted(s.records.items())]
    seen: set[str] = set()
    result: dict[tuple[int, int], frozenset[str]] = {}
    for file_id, n, record in reversed(ordered):
        tags = set((record.get("g") or {}).keys()) if record["t"] == "b" else set()
        if tags & seen:
            result[(file_id, n)] = frozenset(tags & seen)
        seen |= tags
    return result


def _in_experiment(
    runs: dict[tuple[str, str], list[SpoolFile]],
    experiment: str,
    stores: dict[str, Store],
    timeout: float,
    report: SyncReport,
) -> dict[tuple[str, str], list[SpoolFile]]:
    """The runs of ``runs`` that belong to experiment ``experiment`` (a name or an id)."""
    kept: dict[tuple[str, str], list[SpoolFile]] = {}
    wanted: dict[str, set[str]] = {}
    for (uri, run_id), spools in runs.items():
        store = stores.setdefault(uri, Store(uri, timeout=timeout))
        if uri not in wanted:
            wanted[uri] = {experiment}
            try:
                found = store.find_experiment(experiment)
            except Exception as exc:  # a store that is down: its runs are left for later
                report.errors.append(f"{store.shown_uri}: {redact_value(str(exc))}")
                found = None
            if found is not None:
                wanted[uri].add(found.experiment_id)
        try:
            experiment_id = store.get_run(run_id).experiment_id
        except Exception as exc:  # reported; the run is left for another sync
            report.errors.append(
                f"run {run_id}: cannot tell its experiment: {redact_value(str(exc))}"
            )
            continue
        if experiment_id in wanted[uri]:
            kept[(uri, run_id)] = spools
        else:
            report.other_experiment += 1
    return kept


def _artifact_problem(spool: SpoolFile, record: Record) -> str | None:
    src = Path(record["src"])
    if not src.exists():
        return "no longer exists"
    expected = spool.checksums.get(record["n"])
    if expected is not None and checksum(src) != expected:
        return "changed since it was logged; not uploaded"
    return None


def _what(record: Record) -> str:
    if record["t"] == "a":
        return f"artifact {record['src']!r}"
    return {"b": "batch", "e": "end"}.get(record["t"], "record") + f" #{record['n']}"


def _count(report: SyncReport, record: Record) -> None:
    report.sent += 1
    if record["t"] == "b":
        report.metrics += len(record.get("m", ()))
        report.params += len(record.get("p", ()))
        report.tags += len(record.get("g", ()))
    elif record["t"] == "a":
        report.artifacts += 1
    elif record["t"] == "e":
        report.terminated += 1
