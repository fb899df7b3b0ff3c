"""Cross-validation summaries of a run's fold children, and the leaderboard of a sweep.

Folds and trials are read back from the store, so folds that ran in subprocesses or on
other machines count; the statistics over them are ``_cv_stats``'s pure functions.
"""

from __future__ import annotations

import csv
import dataclasses
import logging
import math
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

from trainkit_tracking._core.spec import RunKind, RunSpec
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._insight.cv_stats import (
    PREFIX,
    Leaderboard,
    TrialRow,
    by_start,
    metric_candidates,
    score,
    select_folds,
    summarised,
    summarize,
)
from trainkit_tracking._process.bounded import bounded
from trainkit_tracking._store.store import RunRecord, Store

log = logging.getLogger(__name__)

# The study's objective metric, tagged on the sweep by TrackedStudy (or by hand).
METRIC_TAG = "code.hpo.metric"
BEST_NUMBER_TAG = "best_trial_number"
DIRECTION_PARAM = "study_direction"
LEADERBOARD_CSV = "leaderboard.csv"
LEADERBOARD_PNG = "leaderboard.png"
# The most a run's end spends on its summary or leaderboard when no timeout is given.
END_TIMEOUT = 10.0


class SummarisedRun(Protocol):
    """What a summary or a leaderboard needs of the run it is logged into."""

    @property
    def id(self) -> str: ...

    @property
    def experiment_id(self) -> str: ...

    @property
    def spec(self) -> RunSpec | None: ...

    @property
    def parent_id(self) -> str | None: ...

    def log_metrics(self, metrics: Mapping[str, Any], step: int | None = None) -> None: ...

    def log_artifact(self, path: str, artifact_path: str | None = None) -> None: ...

    def _wait_stored(self, timeout: float | None) -> bool: ...


# Reading the store --------------------------------------------------------------------


def _children_filter(parent_id: str, kind: RunKind, keys: TagKeys) -> str:
    return (
        f"tags.`{keys['parent_run_id']}` = '{parent_id}' "
        f"AND tags.`{keys['run_kind']}` = '{kind.value}'"
    )


def fold_records(store: Store, experiment_id: str, run_id: str, keys: TagKeys) -> list[RunRecord]:
    """The ``hpo_trial_fold`` children of ``run_id``, as stored."""
    return store.search([experiment_id], _children_filter(run_id, RunKind.HPO_TRIAL_FOLD, keys))


def cv_summary(
    run: SummarisedRun, store: Store, keys: TagKeys, patterns: Sequence[str] | None = None
) -> dict[str, float]:
    """Read the fold children of ``run``, log their summary on it and return it ({} without
    folds): the study's metric and the evaluation metrics, or ``patterns``."""
    summary = _read_summary(store, run, keys, patterns)
    if summary:
        run.log_metrics(summary)
    return summary


def _read_summary(
    store: Store, run: SummarisedRun, keys: TagKeys, patterns: Sequence[str] | None
) -> dict[str, float]:
    folds = fold_records(store, run.experiment_id, run.id, keys)
    if not folds:
        return {}
    return summarize(
        folds,
        fold_key=keys["fold_idx"],
        study_metric=_study_metric(store, run.parent_id),
        patterns=patterns,
    )


# (store, sweep id) -> the study's metric: one read per sweep and process, not per trial.
_study_metrics: dict[tuple[str, str], str] = {}


def _study_metric(store: Store, parent_id: str | None) -> str | None:
    """The study's metric, tagged on the sweep (a trial's parent); None when it has none."""
    if parent_id is None:
        return None
    key = (store.tracking_uri, parent_id)
    if key not in _study_metrics:
        metric = store.get_run(parent_id).tags.get(METRIC_TAG)
        if not metric:
            return None  # not tagged (yet): asked again next time
        _study_metrics[key] = metric
    return _study_metrics[key]


def _number(record: RunRecord, keys: TagKeys) -> int | None:
    value = record.tags.get(keys["trial_number"], "")
    return int(value) if value.isdigit() else None


def _folds_of(
    store: Store, experiment_id: str, trials: Sequence[RunRecord], keys: TagKeys
) -> dict[str, list[RunRecord]]:
    """Fold runs by trial id: one search per study hash (folds inherit it), else per trial."""
    ids = {t.run_id for t in trials}
    by_trial: dict[str, list[RunRecord]] = {t.run_id: [] for t in trials}
    hashes = {t.tags.get(keys["study_key_hash"]) for t in trials}
    for study_hash in sorted(h for h in hashes if h):
        found = store.search(
            [experiment_id],
            f"tags.`{keys['run_kind']}` = '{RunKind.HPO_TRIAL_FOLD.value}' "
            f"AND tags.`{keys['study_key_hash']}` = '{study_hash}'",
        )
        for fold in found:
            if fold.parent_id in ids:
                by_trial[fold.parent_id].append(fold)
    for trial in trials:
        if not trial.tags.get(keys["study_key_hash"]):
            by_trial[trial.run_id] = fold_records(store, experiment_id, trial.run_id, keys)
    return by_trial


def read_leaderboard(
    store: Store, sweep_id: str, keys: TagKeys, patterns: Sequence[str] | None = None
) -> Leaderboard:
    """The sweep's ``hpo_trial`` children with their fold summaries and main metric."""
    sweep = store.get_run(sweep_id)
    trials = store.search(
        [sweep.experiment_id], _children_filter(sweep_id, RunKind.HPO_TRIAL, keys)
    )
    folds = _folds_of(store, sweep.experiment_id, trials, keys)
    study_metric = sweep.tags.get(METRIC_TAG) or None
    candidates = metric_candidates(study_metric)
    rows = []
    for trial in trials:
        chosen, _ = select_folds(folds[trial.run_id], keys["fold_idx"])
        if folds[trial.run_id]:
            summary: Mapping[str, float] = summarize(
                folds[trial.run_id],
                fold_key=keys["fold_idx"],
                study_metric=study_metric,
                patterns=patterns,
            )
        else:  # folds gone (deleted) or never made: what the trial logged itself, if any
            summary = {k: v for k, v in trial.metrics.items() if k.startswith(PREFIX)}
        rows.append(
            TrialRow(
                record=trial,
                number=_number(trial, keys),
                folds=tuple(chosen),
                summary=summary,
                score=score(trial, chosen, candidates),
            )
        )
    rows.sort(key=lambda r: (r.number if r.number is not None else 1 << 62, *by_start(r.record)))
    direction = sweep.params.get(DIRECTION_PARAM, "").upper()
    best_tag = sweep.tags.get(BEST_NUMBER_TAG, "")
    board = Leaderboard(
        sweep=sweep,
        rows=tuple(rows),
        study_metric=study_metric,
        direction=direction if direction in ("MAXIMIZE", "MINIMIZE") else None,
        best_number=int(best_tag) if best_tag.isdigit() else None,
        patterns=None if patterns is None else tuple(patterns),
    )
    if board.best_number is None and board.direction is not None:
        board = dataclasses.replace(board, best_number=_best(board))
    return board


def _best(board: Leaderboard) -> int | None:
    scored = [
        (r.score.stats.mean, r.number)
        for r in board.rows
        if r.score is not None
        and r.number is not None
        and r.record.status == "FINISHED"
        and not math.isnan(r.score.stats.mean)
    ]
    if not scored:
        return None
    pick = max if board.direction == "MAXIMIZE" else min
    return pick(scored)[1]


# Writing the leaderboard --------------------------------------------------------------


def write_csv(board: Leaderboard, path: Path) -> None:
    """One row per trial: trial number, status and score first; then the score's spread,
    name, id, params, the trial's own summarised metrics and the cv means and stds."""
    params = sorted({k for r in board.rows for k in r.record.params})
    own = sorted(
        {
            k
            for r in board.rows
            for k in r.record.metrics
            if not k.startswith(PREFIX) and summarised(k, board.study_metric, board.patterns)
        }
    )
    cv_names = sorted(
        {
            k[len(PREFIX) : -len(".mean")]
            for r in board.rows
            for k in r.summary
            if k.endswith(".mean")
        }
    )
    cv_columns = [f"{PREFIX}n_folds", f"{PREFIX}n_failed"] + [
        f"{PREFIX}{name}.{stat}" for name in cv_names for stat in ("mean", "std")
    ]
    header = ["trial", "status", "score", "score_std", "score_n", "score_metric"]
    header += ["pruned", "run_name", "run_id"]
    header += [f"params.{p}" for p in params] + own + cv_columns
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        for row in board.rows:
            rec = row.record
            main = row.score
            cells: list[object] = [
                "" if row.number is None else row.number,
                rec.status,
                _cell(main.stats.mean) if main else "",
                _cell(main.stats.std) if main and main.from_folds else "",
                main.stats.n if main and main.from_folds else "",
                main.metric if main else "",
                "true" if row.pruned else "false",
                rec.name,
                rec.run_id,
            ]
            cells += [rec.params.get(p, "") for p in params]
            cells += [_cell(rec.metrics.get(m)) for m in own]
            cells += [_cell(row.summary.get(c)) for c in cv_columns]
            writer.writerow(cells)


def _cell(value: float | None) -> str:
    if value is None:
        return ""
    if float(value).is_integer() and abs(value) < 1e15:
        return str(int(value))
    return repr(float(value))


def log_leaderboard(
    run: SummarisedRun,
    store: Store,
    keys: TagKeys,
    timeout: float,
    patterns: Sequence[str] | None = None,
) -> list[str]:
    """Write ``leaderboard.csv`` (and, with matplotlib, ``leaderboard.png``) into the sweep.

    Reads within ``timeout``; the files are uploaded by the run's logger and removed once
    stored (left in place for ``sync`` when the upload is not done within ``timeout``).
    """
    # Tags set on the sweep so far (best trial, study metric) must be in the store first.
    run._wait_stored(timeout)
    board = bounded(
        lambda: read_leaderboard(store, run.id, keys, patterns),
        timeout=timeout,
        what="reading the sweep's trials",
    )
    if not board.rows:
        return []
    directory = Path(tempfile.mkdtemp(prefix="trainkit-leaderboard-"))
    written = [directory / LEADERBOARD_CSV]
    write_csv(board, written[0])
    try:
        import matplotlib  # noqa: F401  (the plots extra)
    except ImportError:  # no matplotlib: the CSV alone, quietly
        log.debug("matplotlib is not installed; no %s", LEADERBOARD_PNG)
    else:
        from trainkit_tracking._insight.plots import plot_leaderboard

        try:
            plot_leaderboard(board, directory / LEADERBOARD_PNG)
            written.append(directory / LEADERBOARD_PNG)
        except Exception as exc:  # a broken picture must not cost the CSV
            log.warning("sweep %s: %s not drawn: %s", run.id, LEADERBOARD_PNG, exc)
    for path in written:
        run.log_artifact(str(path))
    if run._wait_stored(timeout):
        shutil.rmtree(directory, ignore_errors=True)
    return [p.name for p in written]


# The hook in Run.end ------------------------------------------------------------------


def at_end(
    run: SummarisedRun,
    store: Store,
    keys: TagKeys,
    status: str,
    timeout: float | None,
    patterns: Sequence[str] | None = None,
) -> None:
    """Before a run's end record: its CV summary, or a sweep's leaderboard. Never raises.

    Skipped for runs ended KILLED (an interrupt should not wait for the store; call
    ``run.cv_summary()`` first when it is wanted) and for fold runs themselves.
    """
    spec = run.spec
    if status == "KILLED" or spec is None or spec.kind == RunKind.HPO_TRIAL_FOLD:
        return
    limit = END_TIMEOUT if timeout is None else max(0.0, min(END_TIMEOUT, timeout / 2))
    try:
        if spec.kind == RunKind.HPO_SWEEP:
            log_leaderboard(run, store, keys, limit, patterns)
            return
        summary = bounded(
            lambda: _read_summary(store, run, keys, patterns),
            timeout=limit,
            what="reading the fold runs",
        )
        if summary:
            run.log_metrics(summary)
    except Exception as exc:  # a summary must never stop training or hide the run's end
        what = "leaderboard" if spec.kind == RunKind.HPO_SWEEP else "cross-validation summary"
        log.warning("run %s: no %s: %s", run.id, what, exc)
