"""``reap`` (end runs whose process is gone) and the summary of ``sync``, for the CLI."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from trainkit_tracking._cli.common import describe, plural
from trainkit_tracking._cli.tree import format_duration
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._store.store import RunRecord, Store

if TYPE_CHECKING:
    from trainkit_tracking._journal.run_logger import SyncReport

# Experiments per search request: MLflow servers cap the list a request may carry.
_SEARCH_CHUNK = 50
# Heartbeats above this are milliseconds, not seconds (tolerated: the tag is meant as seconds).
_MS_THRESHOLD = 1e11


@dataclass(frozen=True)
class Stale:
    """A RUNNING run that has not shown a sign of life for ``age`` seconds."""

    record: RunRecord
    experiment: str
    age: float
    seen_by: str  # "heartbeat" or "start time"
    last_seen: float  # epoch seconds


@dataclass
class ReapReport:
    """What ``reap`` found and did (with ``dry_run``: would do)."""

    dry_run: bool
    running: int = 0
    stale: list[Stale] = field(default_factory=list)
    ended: list[Stale] = field(default_factory=list)
    revived: int = 0  # stale at search time, alive when re-read: left alone
    errors: list[str] = field(default_factory=list)


def last_seen(record: RunRecord, heartbeat_key: str) -> tuple[float, str] | None:
    """(epoch seconds, what it comes from): the heartbeat tag, else the start time."""
    raw = record.tags.get(heartbeat_key)
    if raw:
        try:
            beat = float(raw)
        except ValueError:
            beat = None
        if beat is not None:
            return (beat / 1000 if beat > _MS_THRESHOLD else beat), "heartbeat"
    if record.start_time is not None:
        return record.start_time / 1000, "start time"
    return None


def _stale(
    record: RunRecord, experiment: str, older_than: float, now: float, heartbeat_key: str
) -> Stale | None:
    seen = last_seen(record, heartbeat_key)
    if seen is None or record.status != "RUNNING":
        return None
    age = now - seen[0]
    if age < older_than:
        return None
    return Stale(record, experiment, age, seen[1], seen[0])


def find_running(
    store: Store, experiments: Sequence[tuple[str, str]]
) -> list[tuple[RunRecord, str]]:
    """Every RUNNING run of ``experiments`` ((id, name) pairs), oldest first, with its name."""
    names = dict(experiments)
    ids = list(names)
    found: list[tuple[RunRecord, str]] = []
    for start in range(0, len(ids), _SEARCH_CHUNK):
        chunk = ids[start : start + _SEARCH_CHUNK]
        for record in store.search(
            chunk, "attributes.status = 'RUNNING'", order_by=("attributes.start_time ASC",)
        ):
            found.append((record, names.get(record.experiment_id, record.experiment_id)))
    return found


def reap(
    store: Store,
    running: Sequence[tuple[RunRecord, str]],
    older_than: float,
    *,
    dry_run: bool = False,
    now: float | None = None,
    keys: TagKeys | None = None,
    progress: Callable[[int], None] | None = None,
) -> ReapReport:
    """End the runs of ``running`` not seen alive for ``older_than`` seconds as KILLED.

    Each stale run is read again just before it is ended, so a run whose heartbeat came
    back meanwhile is left alone. It gets ``code.interrupted=true`` first, then status
    KILLED with its last sign of life as end time: its last heartbeat (else its start
    time), or its last metric point when that came later.
    """
    keys = keys or TagKeys.default()
    heartbeat, interrupted = keys["heartbeat"], keys["interrupted"]
    clock = time.time() if now is None else now
    report = ReapReport(dry_run=dry_run, running=len(running))
    for record, experiment in running:
        try:
            found = _stale(record, experiment, older_than, clock, heartbeat)
            if found is not None:
                report.stale.append(found)
                if not dry_run:
                    _end(store, found, older_than, clock, heartbeat, interrupted, report)
        except Exception as exc:
            report.errors.append(f"run {record.run_id}: {describe(exc)}")
        if progress is not None:
            progress(1)
    return report


def _end(
    store: Store,
    found: Stale,
    older_than: float,
    now: float,
    heartbeat: str,
    interrupted: str,
    report: ReapReport,
) -> None:
    fresh = _stale(store.get_run(found.record.run_id), found.experiment, older_than, now, heartbeat)
    if fresh is None:
        report.revived += 1
        return
    # Its last sign of life: the last heartbeat (else the start), never before its last point.
    end_time = int(fresh.last_seen * 1000)
    last_point = store.last_point_time(fresh.record.run_id)
    for later in (fresh.record.start_time, last_point):
        if later is not None:
            end_time = max(end_time, later)
    store.set_tags(fresh.record.run_id, {interrupted: "true"})
    store.terminate(fresh.record.run_id, "KILLED", end_time)
    report.ended.append(fresh)


def reap_lines(report: ReapReport) -> list[str]:
    """One line per stale run and a summary."""
    verb = "would end" if report.dry_run else "ended"
    done = report.stale if report.dry_run else report.ended
    lines = [
        f"{verb} {s.record.run_id} {s.record.name or '-'} (experiment {s.experiment!r}, "
        f"no sign of life for {format_duration(s.age)}, judged by its {s.seen_by})"
        for s in done
    ]
    summary = f"{len(done)} of {plural(report.running, 'running run')} {verb} as KILLED"
    if report.revived:
        summary += f"; {plural(report.revived, 'run')} came back to life and stayed RUNNING"
    if report.dry_run:
        summary += " (dry run: nothing changed)"
    lines.append(summary)
    lines += [f"error: {e}" for e in report.errors]
    return lines


def sync_lines(report: SyncReport, spool_dir: Path) -> list[str]:
    """What ``sync`` stored (or would), what it set aside and what is left."""
    verb = "would send" if report.dry_run else "sent"
    if not report.files and not report.sending and not report.retried:
        lines = [f"nothing to send: no spool files in {spool_dir}"]
    else:
        lines = [
            f"{verb} {plural(report.sent, 'record')} from {plural(report.files, 'spool file')}: "
            f"{plural(report.metrics, 'metric')}, {plural(report.params, 'param')}, "
            f"{plural(report.tags, 'tag')}, {plural(report.artifacts, 'artifact')}, "
            f"{plural(report.terminated, 'run end')}"
        ]
    if report.sending:
        lines.append(
            f"{plural(report.sending, 'file')} had a live sender: woken, it stored "
            f"{plural(report.watched, 'record')} while sync watched"
        )
    if report.retried:
        lines.append(f"stored {plural(report.retried, 'set-aside record')} on a new try")
    if report.other_store:
        lines.append(f"skipped {plural(report.other_store, 'file')} of other tracking stores")
    if report.other_experiment:
        lines.append(f"skipped {plural(report.other_experiment, 'run')} of other experiments")
    lines += [f"warning: dropped {d}" for d in report.dropped]
    lines += [
        f"warning: set aside (see `trainkit-tracking doctor`; `sync --retry-set-aside` tries "
        f"again): {r}"
        for r in report.refused
    ]
    lines += [f"error: {e}" for e in report.errors]
    if report.pending:
        lines.append(f"{plural(report.pending, 'record')} still pending")
    return lines
