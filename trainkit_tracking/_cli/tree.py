"""The run tree as text: runs under their parent with status, duration and a metric.

Parents come from the tag ``mlflow.parentRunId``. Used by ``trainkit-tracking tree``;
scripts and examples call ``render_tree``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._core.spec import RunKind, validate_run_id
from trainkit_tracking._insight import cv as _cv
from trainkit_tracking._insight import cv_stats as _cv_stats
from trainkit_tracking._store.store import RunRecord, Store
from trainkit_tracking.errors import StoreUnavailableError, TrackingError

_TRIAL = RunKind.HPO_TRIAL.value
_FOLD = RunKind.HPO_TRIAL_FOLD.value
_KIND_TAG = "code.run_kind"

_UNICODE = ("├── ", "└── ", "│   ", "    ")
_ASCII = ("|-- ", "`-- ", "|   ", "    ")
_STATUS_COLORS = {"FINISHED": "green", "RUNNING": "cyan", "FAILED": "red", "KILLED": "yellow"}


@dataclass(frozen=True)
class _Row:
    prefix: str
    name: str
    status: str
    duration: str
    metric: str
    run_id: str


def format_duration(seconds: float) -> str:
    """``4.2s``, ``42s``, ``2m03s``, ``1h02m``, ``3d04h``."""
    if seconds < 0 or math.isnan(seconds):
        return "-"
    if seconds < 10:
        return f"{seconds:.1f}s"
    whole = int(seconds)
    if whole < 60:
        return f"{whole}s"
    minutes, secs = divmod(whole, 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    if hours < 24:
        return f"{hours}h{minutes:02d}m"
    days, hours = divmod(hours, 24)
    return f"{days}d{hours:02d}h"


def _duration(record: RunRecord, now_ms: int) -> str:
    if record.start_time is None:
        return "-"
    end = record.end_time if record.end_time else None
    if end is None:
        # A terminal run without an end time has no duration to show; a live one its age.
        if record.status != "RUNNING":
            return "-"
        end = now_ms
    return format_duration((end - record.start_time) / 1000)


def _format_value(value: float) -> str:
    return f"{value:.4g}"


def _metric(record: RunRecord, candidates: Sequence[str]) -> str:
    for key in candidates:
        if key in record.metrics:
            return f"{key}={_format_value(record.metrics[key])}"
    return ""


def _study_metric(record: RunRecord, by_id: Mapping[str, RunRecord]) -> str | None:
    """The study metric tagged on the run or its nearest ancestor (a trial's or fold's sweep)."""
    current: RunRecord | None = record
    for _ in range(4):  # sweep -> trial -> fold, and a little slack
        if current is None:
            return None
        if _cv.METRIC_TAG in current.tags:
            return current.tags[_cv.METRIC_TAG]
        current = by_id.get(current.parent_id) if current.parent_id else None
    return None


def _trial_metric(
    record: RunRecord, folds: Sequence[RunRecord], candidates: Sequence[str], ascii: bool
) -> str:
    """``metric=mean ± std (n folds)`` over the finished folds, else the trial's own value."""
    chosen, _ = _cv_stats.select_folds(folds, "code.hpo.fold_idx")
    found = _cv_stats.score(record, chosen, candidates)
    if found is None:
        return ""
    s = found.stats
    if not found.from_folds:
        return f"{found.metric}={_format_value(s.mean)}"
    plus_minus = "+-" if ascii else "±"
    folds_text = f"{s.n} fold{'s' * (s.n != 1)}"
    return f"{found.metric}={_format_value(s.mean)} {plus_minus} {s.std:.2g} ({folds_text})"


def _start(record: RunRecord) -> tuple[int, str]:
    return (record.start_time if record.start_time is not None else 0, record.run_id)


def _rows(
    records: Iterable[RunRecord],
    roots: Sequence[RunRecord],
    metric: str | None,
    chars: tuple[str, str, str, str],
    now_ms: int,
) -> list[_Row]:
    children: dict[str, list[RunRecord]] = {}
    by_id: dict[str, RunRecord] = {}
    for record in records:
        by_id[record.run_id] = record
        if record.parent_id is not None:
            children.setdefault(record.parent_id, []).append(record)
    for kids in children.values():
        kids.sort(key=_start)
    tee, elbow, pipe, blank = chars
    rows: list[_Row] = []
    seen: set[str] = set()

    def visit(record: RunRecord, lead: str, branch: str) -> None:
        if (
            record.run_id in seen
        ):  # a parent loop cannot come from MLflow, but never recurse forever
            return
        seen.add(record.run_id)
        kids = children.get(record.run_id, [])
        candidates = _cv_stats.metric_candidates(
            None if metric else _study_metric(record, by_id), metric
        )
        if record.tags.get(_KIND_TAG) == _TRIAL:
            folds = [k for k in kids if k.tags.get(_KIND_TAG) == _FOLD]
            shown = _trial_metric(record, folds, candidates, chars == _ASCII)
        else:
            shown = _metric(record, candidates)
        rows.append(
            _Row(
                prefix=lead + branch,
                name=record.name or record.run_id[:8],
                status=record.status,
                duration=_duration(record, now_ms),
                metric=shown,
                run_id=record.run_id,
            )
        )
        below = lead + ("" if not branch else (blank if branch == elbow else pipe))
        for index, kid in enumerate(kids):
            visit(kid, below, elbow if index == len(kids) - 1 else tee)

    for root in roots:
        visit(root, "", "")
    return rows


def _layout(rows: Sequence[_Row], *, color: bool, show_ids: bool) -> list[str]:
    name_width = max(len(r.prefix) + len(r.name) for r in rows)
    status_width = max(len(r.status) for r in rows)
    duration_width = max(len(r.duration) for r in rows)
    lines = []
    for row in rows:
        status = row.status.ljust(status_width)
        if color:
            import click

            status = click.style(status, fg=_STATUS_COLORS.get(row.status))
        cells = [
            (row.prefix + row.name).ljust(name_width),
            status,
            row.duration.rjust(duration_width),
            row.metric,
        ]
        if show_ids:
            cells.insert(1, row.run_id)
        lines.append("  ".join(cells).rstrip())
    return lines


def render_tree(
    store_or_uri: Store | str,
    experiment_id: str | None = None,
    run_id: str | None = None,
    metric: str | None = None,
    *,
    ascii: bool = False,
    color: bool = False,
    show_ids: bool = False,
    now: float | None = None,
) -> str:
    """The run tree of an experiment, or of the subtree under ``run_id``, as text.

    One line per run, children under their parent (tag ``mlflow.parentRunId``), siblings
    by start time: name, status, duration (a live run: its age so far) and ``metric``
    (default: the first of val_loss, eval_loss, loss, accuracy that the run has). Trial
    rows show ``metric=mean ± std (n folds)`` over their finished fold runs (their own
    value when they have no folds); their default metric is the study's (the sweep's tag
    ``code.hpo.metric``), then the list above. A run whose parent is not in the experiment is shown as a root. ``ascii`` draws with
    ``|--`` instead of box characters; ``color`` styles the status (for terminals);
    ``show_ids`` adds each run's id; ``now`` (epoch seconds) fixes the clock for ages.
    """
    if experiment_id is None and run_id is None:
        raise ValueError("render_tree needs an experiment_id or a run_id")
    store = Store(store_or_uri) if isinstance(store_or_uri, str) else store_or_uri
    now_ms = int((time.time() if now is None else now) * 1000)
    root: RunRecord | None = None
    if run_id is not None:
        validate_run_id(run_id)
        try:
            root = store.get_run(run_id)
        except StoreUnavailableError:
            raise  # the store did not answer: that says nothing about the run
        except Exception as exc:
            raise TrackingError(
                f"run {run_id!r} not found in {redact_value(store.tracking_uri)!r}: {exc}"
            ) from exc
        experiment_id = root.experiment_id
    assert experiment_id is not None
    experiment = store.experiment_name(experiment_id)
    records = store.search([experiment_id], order_by=("attributes.start_time ASC",))
    ids = {r.run_id for r in records}
    if root is not None:
        roots: list[RunRecord] = [next((r for r in records if r.run_id == root.run_id), root)]
        header = f"run {root.run_id} in experiment {experiment!r}"
    else:
        roots = sorted((r for r in records if r.parent_id not in ids), key=_start)
        count = len(records)
        header = f"experiment {experiment!r} (id {experiment_id}): {count} run{'s' * (count != 1)}"
    if not records and root is None:
        return header
    rows = _rows(records, roots, metric, _ASCII if ascii else _UNICODE, now_ms)
    return "\n".join([header, *_layout(rows, color=color, show_ids=show_ids)])


def draw(
    tracking_uri: str | None,
    experiment: str | None,
    run_id: str | None,
    metric: str | None,
    show_ids: bool,
    use_ascii: bool,
    timeout: float,
) -> str:
    """What ``trainkit-tracking tree`` prints; a run or experiment that is not there gets a
    CliError with the close ones."""
    from trainkit_tracking._cli.common import (
        EXIT_USAGE,
        CliError,
        find_experiment,
        open_store,
        run_hint,
    )

    if run_id is None and not experiment:
        raise CliError(
            "no experiment: pass --experiment NAME or --run ID, or set MLFLOW_EXPERIMENT_NAME",
            EXIT_USAGE,
        )
    store, _ = open_store(tracking_uri, timeout)
    if run_id is None:
        assert experiment is not None
        experiment_id, _ = find_experiment(store, experiment)
    else:
        within = _experiment_ids(store, experiment)  # where to look for close runs
        try:
            validate_run_id(run_id, "--run")
            store.get_run(run_id)
        except StoreUnavailableError:
            raise
        except ValueError as exc:  # not an id at all: a run name, a cut id?
            hint = run_hint(store, run_id, within)
            raise CliError(f"{exc}{'; ' + hint if hint else ''}", EXIT_USAGE) from exc
        except Exception as exc:
            hint = run_hint(store, run_id, within)
            raise CliError(
                f"run {run_id!r} not found in {store.shown_uri}"
                + (f"; {hint}" if hint else f": {redact_value(str(exc))}")
            ) from exc
        experiment_id = None
    return render_tree(
        store,
        experiment_id=experiment_id,
        run_id=run_id,
        metric=metric,
        ascii=use_ascii,
        color=True,
        show_ids=show_ids,
    )


def _experiment_ids(store: Store, experiment: str | None) -> list[str] | None:
    """[the id of ``experiment``] if it exists, else None (every experiment)."""
    try:
        found = store.find_experiment(experiment) if experiment else None
    except Exception:  # only a narrower search for hints is lost
        return None
    return [found.experiment_id] if found is not None else None
