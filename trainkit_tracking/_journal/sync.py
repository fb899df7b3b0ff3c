"""``sync``: store what the journal holds, now, exactly once, and say what it did.

For each store with entries in the spool dir, ``sync`` becomes its sender (it takes the
store's sender lock and sends in the foreground, finishing the files of dead writers) or,
when a live sender holds the lock, wakes it ("the store may be back: retry now") and
watches its marks until everything is settled. Either way it returns once every entry is
stored or set aside, or once the store has not answered for ``timeout`` seconds.
``retry_set_aside`` also sends the set-aside log again (after a deleted run was restored,
a file put back).
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.redact import get_logger, redact_value
from trainkit_tracking._journal import ledger as _ledger
from trainkit_tracking._journal.delivery import StoreDown, deliver
from trainkit_tracking._journal.sender import Sender
from trainkit_tracking._journal.sender_lock import hold_lock, read_status
from trainkit_tracking._journal.spool import (
    SpoolFile,
    default_spool_dir,
    read_spool,
    spool_paths,
    uri_id,
)
from trainkit_tracking._journal.wake import Waker
from trainkit_tracking._store.store import DEFAULT_TIMEOUT, Store

log = get_logger(__name__)


@dataclass
class SyncReport:
    """What ``sync`` did (or, with ``dry_run``, would do)."""

    dry_run: bool = False
    files: int = 0  # journal files read
    sent: int = 0  # entries stored: batches, artifact uploads, run terminations
    metrics: int = 0
    params: int = 0
    tags: int = 0
    artifacts: int = 0
    terminated: int = 0
    busy: int = 0  # kept for compatibility: sync no longer leaves a live file alone
    sending: int = 0  # files a live sender held: woken, and watched until settled
    watched: int = 0  # entries that live sender stored while sync watched
    other_store: int = 0  # files of another tracking URI than the one asked for
    other_experiment: int = 0  # runs of another experiment than the one asked for
    dropped: list[str] = field(default_factory=list)  # kept for compatibility
    errors: list[str] = field(default_factory=list)  # entries not stored; a later sync tries
    refused: list[str] = field(default_factory=list)  # items set aside (store or local)
    retried: int = 0  # set-aside entries stored by --retry-set-aside
    pending: int = 0  # entries left in the journal afterwards

    @property
    def set_aside(self) -> list[str]:
        return self.refused

    @property
    def ok(self) -> bool:
        return not self.errors


def pending(spool_dir: Path | None = None) -> int:
    """The number of journal entries (batches, uploads, terminations) not yet settled."""
    total = 0
    for path in spool_paths(spool_dir or default_spool_dir()):
        with contextlib.suppress(OSError):
            total += len(read_spool(path).pending)
    return total


def _store_uri(spool: SpoolFile, tracking_uri: str | None, environ_uri: str | None) -> str | None:
    """The real URI of a journal file's store, or None when it is not known here.

    Headers keep the URI with its credentials masked, and an id of the real one: a URI
    given (``tracking_uri``, else ``MLFLOW_TRACKING_URI``) is used when its id matches.
    """
    for candidate in (tracking_uri, environ_uri):
        if candidate and spool.uri_id == uri_id(candidate):
            return candidate
    if (
        tracking_uri is None
        and spool.tracking_uri
        and redact_value(spool.tracking_uri) == spool.tracking_uri
        and spool.uri_id == uri_id(spool.tracking_uri)
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
    retry_set_aside: bool = False,
) -> SyncReport:
    """Store what the journal holds, exactly once (see the module docstring).

    ``tracking_uri`` limits the sync to that store (and is needed for a store whose URI
    holds credentials); ``experiment`` (a name or id) to that experiment's runs. Returns
    when everything is stored or set aside, or when a store has not answered for
    ``timeout`` seconds (what is left stays for a later sync).
    """
    spool_dir = spool_dir or default_spool_dir()
    report = SyncReport(dry_run=dry_run)
    environ_uri = os.environ.get(_env.MLFLOW_TRACKING_URI)
    stores: dict[str, tuple[str, list[SpoolFile]]] = {}
    for path in spool_paths(spool_dir):
        try:
            spool = read_spool(path)
        except OSError:  # finished and deleted meanwhile
            continue
        report.files += 1
        uri = _store_uri(spool, tracking_uri, environ_uri)
        if spool.tracking_uri is None or spool.run_id is None or spool.uri_id is None:
            report.errors.append(f"{path}: no header, not a trainkit journal file; left alone")
        elif uri is None and tracking_uri is None and spool.pending:
            report.errors.append(
                f"{path.name}: its store {spool.tracking_uri} has credentials in its URI, "
                "which the journal does not keep; pass it with --tracking-uri"
            )
        elif uri is None:
            report.other_store += 1
        else:
            stores.setdefault(spool.uri_id, (uri, []))[1].append(spool)
    total = sum(len(s.pending) for _, spools in stores.values() for s in spools)
    done = [0]

    def tick(count: int) -> None:
        done[0] += count
        if progress is not None and count:
            progress(min(done[0], total), total)

    for uid, (uri, spools) in stores.items():
        if dry_run:
            for spool in spools:
                for record in spool.pending:
                    _count(report, record)
                    tick(1)
            continue
        if any(s.pending for s in spools):
            _sync_store(spool_dir, uid, uri, spools, experiment, timeout, report, tick)
    if retry_set_aside and not dry_run:
        _retry_set_aside(spool_dir, tracking_uri, environ_uri, timeout, report)
    report.pending = pending(spool_dir)
    return report


def _sync_store(
    spool_dir: Path,
    uid: str,
    uri: str,
    spools: list[SpoolFile],
    experiment: str | None,
    timeout: float,
    report: SyncReport,
    tick: Callable[[int], None],
) -> None:
    shown = redact_value(uri)
    accept = _experiment_filter(uri, experiment, timeout, report) if experiment else None
    deadline = time.monotonic() + timeout
    while True:
        fd = hold_lock(spool_dir, uid)
        if fd is not None:
            _send_in_foreground(spool_dir, uri, fd, accept, timeout, report, tick)
            return
        # A live sender has the store: wake it, and watch its marks.
        report.sending += len(spools)
        if _drive(spool_dir, uid, spools, deadline, report, tick):
            return
        if hold_lock_free(spool_dir, uid):
            continue  # it ended meanwhile: finish the job ourselves
        report.errors.append(
            f"the sender of {shown} (pid {read_status(spool_dir, uid).get('pid')}) did not store "
            f"everything within {timeout:.0f} s (the store does not answer?); it goes on "
            "trying, and `trainkit-tracking doctor` shows how it fares"
        )
        return


def _send_in_foreground(
    spool_dir: Path,
    uri: str,
    fd: int,
    accept: Callable[[str], bool] | None,
    timeout: float,
    report: SyncReport,
    tick: Callable[[int], None],
) -> None:
    """``sync`` as the store's sender (it holds the lock ``fd``, and releases it)."""
    try:
        sender = Sender(
            spool_dir,
            uri,
            timeout=timeout,
            mode="sync",
            lock_fd=fd,
            accept=accept,
            on_settled=lambda: tick(1),
        )
    except BaseException:
        os.close(fd)
        raise
    finished = sender.run_until_done(timeout)  # releases the lock when it returns
    report.sent += sender.progress.stored
    for key, count in sender.progress.counts.items():
        setattr(report, key, getattr(report, key) + count)
    report.refused.extend(sender.progress.set_aside)
    if not finished:
        left = sender.left or "some"
        report.errors.append(
            f"{redact_value(uri)} did not answer for {timeout:.0f} s: {left} entries are left "
            "in the journal; run `trainkit-tracking sync` again once it answers"
        )


def hold_lock_free(spool_dir: Path, uid: str) -> bool:
    fd = hold_lock(spool_dir, uid)
    if fd is None:
        return False
    os.close(fd)
    return True


def _drive(
    spool_dir: Path,
    uid: str,
    spools: list[SpoolFile],
    deadline: float,
    report: SyncReport,
    tick: Callable[[int], None],
) -> bool:
    """Wake the live sender and watch until every entry of ``spools`` is settled."""
    waker = Waker()
    ledgers = [(spool, _ledger.Ledger(spool.path)) for spool in spools]
    left = {(id(s), n) for s in spools for n in s.records if n not in s.done}
    last_poke = 0.0
    try:
        while left:
            now = time.monotonic()
            if now - last_poke > 1.0:  # again: it may be in a backoff, or just started
                port = read_status(spool_dir, uid).get("port")
                waker.send(port if isinstance(port, int) else 0, "r")
                last_poke = now
            for spool, ledger in ledgers:
                for settled in ledger.read_new():
                    key = (id(spool), settled.seq)
                    if key not in left:
                        continue
                    left.discard(key)
                    tick(1)
                    record = spool.records.get(settled.seq, {})
                    if settled.whole:
                        report.refused.extend(f"run {spool.run_id}: {w}" for w in settled.aside)
                    else:
                        report.watched += 1
                        _count(report, record)
                        report.refused.extend(f"run {spool.run_id}: {w}" for w in settled.aside)
            if not left:
                return True
            if now > deadline or hold_lock_free(spool_dir, uid):
                return False
            waker.wait(0.2)
        return True
    finally:
        waker.close()


def _experiment_filter(
    uri: str, experiment: str, timeout: float, report: SyncReport
) -> Callable[[str], bool]:
    """Whether a run belongs to ``experiment`` (a name or an id), asked once per run."""
    store = Store(uri, timeout=timeout)
    wanted = {experiment}
    try:
        found = store.find_experiment(experiment)
    except Exception as exc:  # a store that is down: its runs are left for later
        report.errors.append(f"{store.shown_uri}: {redact_value(str(exc))}")
        found = None
    if found is not None:
        wanted.add(found.experiment_id)
    answers: dict[str, bool] = {}

    def accept(run_id: str) -> bool:
        if run_id not in answers:
            try:
                answers[run_id] = store.get_run(run_id).experiment_id in wanted
            except Exception as exc:  # reported; the run is left for another sync
                report.errors.append(
                    f"run {run_id}: cannot tell its experiment: {redact_value(str(exc))}"
                )
                return False
            if not answers[run_id]:
                report.other_experiment += 1
        return answers[run_id]

    return accept


def _retry_set_aside(
    spool_dir: Path,
    tracking_uri: str | None,
    environ_uri: str | None,
    timeout: float,
    report: SyncReport,
) -> None:
    """Send the set-aside log again: what is stored now leaves it, the rest stays."""
    with _ledger.set_aside_lock(spool_dir):
        entries = _ledger.read_set_aside(spool_dir)
        keep = []
        stores: dict[str, Store] = {}
        for entry in entries:
            uri = next(
                (u for u in (tracking_uri, environ_uri) if u and uri_id(u) == entry.get("uri_id")),
                None,
            )
            if (
                uri is None
                and entry.get("uri")
                and uri_id(str(entry["uri"])) == entry.get("uri_id")
            ):
                uri = str(entry["uri"])
            if uri is None:
                keep.append(entry)
                continue
            store = stores.setdefault(uri, Store(uri, timeout=timeout))
            try:
                outcome = deliver(store, str(entry["run"]), dict(entry["record"]))
            except StoreDown as exc:
                report.errors.append(f"{store.shown_uri}: {exc}")
                keep.append(entry)
                continue
            if outcome.aside:
                keep.append({**entry, "why": outcome.aside[0].why})
            else:
                report.retried += 1
                _count(report, dict(entry["record"]))
        _ledger.rewrite_set_aside(spool_dir, keep)


def _count(report: SyncReport, record: _ledger.Record) -> None:
    kind = record.get("t")
    if kind == "b":
        report.metrics += len(record.get("m") or ())
        report.params += len(record.get("p") or ())
        report.tags += len(record.get("g") or ())
    elif kind == "a":
        report.artifacts += 1
    elif kind == "e":
        report.terminated += 1
    if kind in ("b", "a", "e") and report.dry_run:
        report.sent += 1
