"""Pure statistics over fold records: which folds and metrics count, their mean/std/min/max
as ``cv.*`` metrics, and a trial's score."""

from __future__ import annotations

import logging
import math
import re
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from fnmatch import fnmatchcase

from trainkit_tracking._core.limits import MAX_KEY
from trainkit_tracking._store.store import RunRecord

log = logging.getLogger(__name__)

PRUNED_TAG = "code.pruned"

PREFIX = "cv."
STATS = ("mean", "std", "min", "max")
# The metric shown when none is asked for and the sweep names none: the first a run has.
DEFAULT_METRICS = ("val_loss", "eval_loss", "loss", "accuracy")
# What a CV summary covers by default, besides the study's metric: what the folds logged at
# evaluation (the HF Trainer's eval_*/test_*, Keras' and Lightning's val_*), not counters
# such as epoch or learning_rate.
EVAL_PATTERNS = ("eval_*", "eval/*", "val_*", "val/*", "test_*", "test/*")
# Timings the HF Trainer logs with every evaluation: how fast, not how good.
_TIMINGS = ("*_runtime", "*_samples_per_second", "*_steps_per_second")
_PATTERN_CHARS = re.compile(r"^[\w ./:*?\[\]!-]+$")


def check_cv_metrics(value: object, where: str = "cv_metrics") -> tuple[str, ...] | None:
    """``value`` as a tuple of metric names or ``fnmatch`` patterns (None: the default).

    A bare string, a non-string item, an empty name or a character MLflow keys cannot
    hold (a comma included) is a ValueError/TypeError naming ``where`` and the value.
    """
    if value is None:
        return None
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)):
        raise TypeError(
            f"{where} must be a list of metric names or patterns, e.g. ['f1', 'eval_*'], "
            f"got {value!r}"
        )
    names: list[str] = []
    for item in value:
        if not isinstance(item, str):
            raise TypeError(f"{where} items must be str, got {item!r} in {value!r}")
        if not item.strip() or not _PATTERN_CHARS.match(item):
            raise ValueError(
                f"{where} has {item!r}, which is not a metric name or pattern: use letters, "
                "digits and _ . / : - space, with * ? [ ] as wildcards, e.g. 'eval_*'"
            )
        names.append(item)
    return tuple(sorted(set(names), key=names.index))


def summarised(name: str, study_metric: str | None, patterns: Sequence[str] | None = None) -> bool:
    """Whether the CV summary covers metric ``name``: the study's metric always; then
    ``patterns`` (``Tracker(cv_metrics=...)``), else what folds log at evaluation."""
    if name == study_metric:
        return True
    if name.startswith("system/"):  # hardware samples describe the machine, not the model
        return False
    if patterns is not None:
        return any(fnmatchcase(name, p) for p in patterns)
    return any(fnmatchcase(name, p) for p in EVAL_PATTERNS) and not any(
        fnmatchcase(name, t) for t in _TIMINGS
    )


@dataclass(frozen=True)
class Stats:
    mean: float
    std: float  # sample standard deviation; 0 for one value
    min: float
    max: float
    n: int


def stats(values: Sequence[float]) -> Stats:
    """Mean, sample std (0 for one value), min and max; all NaN when a value is NaN."""
    if not values:
        raise ValueError("stats() needs at least one value")
    if any(math.isnan(v) for v in values):
        nan = float("nan")
        return Stats(nan, nan, nan, nan, len(values))
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return Stats(statistics.fmean(values), std, min(values), max(values), len(values))


def by_start(record: RunRecord) -> tuple[int, str]:
    return (record.start_time or 0, record.run_id)


def _fold_order(key: str) -> tuple[int, str]:
    return (int(key), "") if key.isdigit() else (1 << 62, key)


def select_folds(folds: Iterable[RunRecord], fold_key: str) -> tuple[list[RunRecord], int]:
    """The fold runs a summary is computed over, and how many folds did not finish.

    Per fold index (tag ``fold_key``; a run without one is its own fold): its newest
    FINISHED run, so a fold run again after a failure counts once. A fold index with no
    FINISHED run (failed, killed, or still running) counts as not finished.
    """
    groups: dict[str, list[RunRecord]] = {}
    for record in folds:
        groups.setdefault(record.tags.get(fold_key) or record.run_id, []).append(record)
    chosen: list[RunRecord] = []
    failed = 0
    for key in sorted(groups, key=_fold_order):
        done = [r for r in groups[key] if r.status == "FINISHED"]
        if done:
            chosen.append(max(done, key=by_start))
        else:
            failed += 1
    return chosen, failed


def summarize(
    folds: Iterable[RunRecord],
    *,
    fold_key: str = "code.hpo.fold_idx",
    study_metric: str | None = None,
    patterns: Sequence[str] | None = None,
) -> dict[str, float]:
    """``cv.<metric>.mean/std/min/max`` over the last values of the finished folds, for
    each metric ``summarised`` covers, plus ``cv.n_folds`` (finished) and ``cv.n_failed``
    (did not finish)."""
    chosen, failed = select_folds(folds, fold_key)
    summary = {f"{PREFIX}n_folds": float(len(chosen)), f"{PREFIX}n_failed": float(failed)}
    names = {
        key
        for record in chosen
        for key in record.metrics
        if summarised(key, study_metric, patterns)
    }
    for name in sorted(names):
        keys = [f"{PREFIX}{name}.{stat}" for stat in STATS]
        if max(map(len, keys)) > MAX_KEY:
            log.debug("fold metric %r: its cv.* keys are too long for MLflow; skipped", name)
            continue
        s = stats([r.metrics[name] for r in chosen if name in r.metrics])
        summary.update(zip(keys, (s.mean, s.std, s.min, s.max), strict=True))
    return summary


@dataclass(frozen=True)
class Score:
    """A trial's main metric: its fold values (``from_folds``) or the trial's own value."""

    metric: str
    values: tuple[float, ...]
    from_folds: bool

    @property
    def stats(self) -> Stats:
        return stats(self.values)


def score(trial: RunRecord, folds: Sequence[RunRecord], candidates: Sequence[str]) -> Score | None:
    """The first of ``candidates`` that the finished ``folds`` logged, else that the trial has."""
    for name in candidates:
        values = tuple(f.metrics[name] for f in folds if name in f.metrics)
        if values:
            return Score(name, values, True)
        if name in trial.metrics:
            return Score(name, (trial.metrics[name],), False)
    return None


def metric_candidates(study_metric: str | None, asked: str | None = None) -> tuple[str, ...]:
    """The metric asked for, else the study's metric then the generic list."""
    if asked:
        return (asked,)
    if study_metric:
        return (study_metric, *(m for m in DEFAULT_METRICS if m != study_metric))
    return DEFAULT_METRICS


@dataclass(frozen=True)
class TrialRow:
    """One trial of a sweep, with the fold runs its summary is computed over."""

    record: RunRecord
    number: int | None
    folds: tuple[RunRecord, ...]
    summary: Mapping[str, float] = field(default_factory=dict)
    score: Score | None = None

    @property
    def pruned(self) -> bool:
        return self.record.tags.get(PRUNED_TAG) == "true"


@dataclass(frozen=True)
class Leaderboard:
    sweep: RunRecord
    rows: tuple[TrialRow, ...]
    study_metric: str | None
    direction: str | None  # "MAXIMIZE", "MINIMIZE" or None when unknown
    best_number: int | None
    patterns: tuple[str, ...] | None = None  # Tracker(cv_metrics=...): what is summarised
