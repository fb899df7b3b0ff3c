"""How push recognises runs: the tags that record a run's origin and last push, the source
run as push reads it, and the digest that tells a target run is up to date."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass

from trainkit_tracking._core.redact import get_logger
from trainkit_tracking._journal.spool import Point
from trainkit_tracking._push import store_calls as _push_store
from trainkit_tracking._push.background_calls import call
from trainkit_tracking._push.store_calls import PushRun
from trainkit_tracking._store.store import TERMINAL_STATUSES, RunRecord, Store

log = get_logger(__name__)

PUSHED_FROM = "code.pushed_from"
PUSH_TO = "code.push_to"
REMOTE_PARENT = "code.remote_parent_id"
SYNC_MARK = "code.push.sync_mark"
PARENT = "mlflow.parentRunId"
LINEAGE_PREFIX = "code.lineage."
# The source store's id: an experiment tag on a hidden experiment, made once per store.
STORE_EXPERIMENT = ".trainkit-store"
STORE_ID_TAG = "code.store_id"
HIDDEN_PREFIX = ".trainkit"
MARK_VERSION = "1"
# Tags that describe a run's place in the source, not the run: never copied as they are.
NOT_COPIED = frozenset({PUSHED_FROM, SYNC_MARK, PUSH_TO, REMOTE_PARENT, PARENT})
_RUN_ID = re.compile(r"^(?:[0-9a-f]{32}|[0-9a-fA-F]{8}(?:-[0-9a-fA-F]{4}){3}-[0-9a-fA-F]{12})$")


@dataclass(frozen=True)
class Source:
    run: PushRun
    experiment: str

    @property
    def id(self) -> str:
        return self.run.record.run_id

    @property
    def tags(self) -> Mapping[str, str]:
        return self.run.record.tags


def read_source(store: Store, run_id: str, timeout: float) -> Source | None:
    try:
        record = call(lambda: store.get_run(run_id), timeout, "get_run")
    except TimeoutError:
        raise
    except Exception as exc:
        log.debug("source run %s not readable: %s", run_id, exc)
        return None
    exp_name = call(lambda: store.experiment_name(record.experiment_id), timeout, "get_experiment")
    runs = call(
        lambda: _push_store.search_latest(
            store, [record.experiment_id], f"attributes.run_id = '{run_id}'", include_deleted=False
        ),
        timeout,
        "search_runs",
    )
    return Source(runs[0], exp_name) if runs else None


def lineage_refs(tags: Mapping[str, str]) -> dict[str, str]:
    """Lineage tags whose value is a run id: key -> run id."""
    return {
        key: value
        for key, value in tags.items()
        if key.startswith(LINEAGE_PREFIX) and _RUN_ID.match(value)
    }


def point_key(point: Point) -> tuple[str, int, int, float | str]:
    key, value, timestamp, step = point
    # NaN != NaN: compare it by name so a stored NaN point is found again.
    return key, step, timestamp, value if value == value else "nan"


def missing_points(
    source: Store, target: Store, source_id: str, target_id: str, key: str, in_target: bool
) -> list[Point]:
    """The points of metric ``key`` of the source run that the target run lacks."""
    have = {point_key(p) for p in target.metric_history(target_id, key)} if in_target else set()
    points = source.metric_history(source_id, key)
    return [p for p in points if point_key(p) not in have] if have else points


def status_differs(source: RunRecord, target: RunRecord) -> bool:
    if source.status in TERMINAL_STATUSES:
        return (target.status, target.end_time) != (source.status, source.end_time)
    return source.status != target.status


def sync_mark(run: PushRun, tags: Mapping[str, str], files: Mapping[str, int]) -> str:
    """A digest of everything push copies that a run search returns, without histories.

    Any new point whose (step, timestamp, value) sorts after the key's latest point
    changes it; so do a status or end time change (a resumed run), a tag, a param or
    an artifact file. Equal digests: the target already has the run.
    """
    record = run.record
    payload = {
        "v": MARK_VERSION,
        "status": record.status,
        "start": record.start_time,
        "end": record.end_time,
        "tags": sorted(tags.items()),
        "params": sorted(record.params.items()),
        "latest": sorted([k, s, t, repr(v)] for k, (v, t, s) in run.latest.items()),
        "files": sorted(files.items()),
    }
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"))
    return f"{MARK_VERSION}:{hashlib.sha256(text.encode('utf-8')).hexdigest()[:40]}"
