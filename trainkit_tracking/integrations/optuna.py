"""Run an Optuna study as an ``hpo_sweep`` run with one ``hpo_trial`` child per trial.

The objective gets the trial's run and creates fold runs on it for k-fold CV
(``trial_run.child("hpo_trial_fold", fold_idx=k)``). Runs are passed explicitly, never
looked up through a thread-local active run, so ``n_jobs>1`` (threads) keeps the tree.
"""

from __future__ import annotations

import json
import logging
import math
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from types import TracebackType
from typing import Any

try:
    import optuna
    from optuna.distributions import (
        BaseDistribution,
        CategoricalDistribution,
        FloatDistribution,
        IntDistribution,
        distribution_to_json,
    )
except ImportError as exc:  # pragma: no cover - exercised only without optuna
    raise ImportError(
        "trainkit_tracking.integrations.optuna needs Optuna; install it with "
        'pip install "trainkit-tracking[optuna]"'
    ) from exc

from trainkit_tracking import Run, RunKind, RunSpec, Tracker, TrackingError, study_key, trial_key

__all__ = ["RUN_ID_ATTR", "TrackedStudy", "search_space_description"]

log = logging.getLogger(__name__)

Objective = Callable[[optuna.Trial, Run], "float | Sequence[float]"]

# The user attribute of each Optuna trial that holds its run id.
RUN_ID_ATTR = "trainkit_run_id"
PRUNED_TAG = "code.pruned"
# On the sweep: the study's metric, which `trainkit-tracking tree` and the leaderboard show.
METRIC_TAG = "code.hpo.metric"
# Read by Tracker.lineage(sweep_run_id): keep these names.
BEST_RUN_TAG = "best_trial_run_id"
BEST_NUMBER_TAG = "best_trial_number"
BEST_KEY_TAG = "best_trial_key_hash"


def search_space_description(search_space: Mapping[str, BaseDistribution]) -> dict[str, Any]:
    """A JSON-able description of Optuna distributions (what ``study_key`` fingerprints)."""
    described: dict[str, Any] = {}
    for name, distribution in search_space.items():
        if not isinstance(distribution, BaseDistribution):
            raise TypeError(
                f"search_space[{name!r}] must be an optuna distribution "
                f"(FloatDistribution, IntDistribution, CategoricalDistribution), got {distribution!r}"
            )
        described[name] = json.loads(distribution_to_json(distribution))
    return described


def _retried_trial(trial: optuna.Trial) -> int | None:
    """The number of the trial that ``trial`` retries (RetryFailedTrialCallback), if any."""
    try:
        attrs = trial.storage.get_trial_system_attrs(trial._trial_id)
    except Exception as exc:  # a storage without system attrs: no link, nothing else lost
        log.debug("trial %s: no system attrs: %s", trial.number, exc)
        return None
    history = attrs.get("retry_history") or []
    previous = history[-1] if history else attrs.get("failed_trial")
    return int(previous) if previous is not None else None


def _suggest(trial: optuna.Trial, name: str, distribution: BaseDistribution) -> Any:
    # Sampled before the trial run exists, so that trial_key_hash is part of its identity;
    # the objective's own trial.suggest_* with the same arguments returns the same value.
    if isinstance(distribution, FloatDistribution):
        return trial.suggest_float(
            name, distribution.low, distribution.high, log=distribution.log, step=distribution.step
        )
    if isinstance(distribution, IntDistribution):
        return trial.suggest_int(
            name, distribution.low, distribution.high, log=distribution.log, step=distribution.step
        )
    if isinstance(distribution, CategoricalDistribution):
        return trial.suggest_categorical(name, list(distribution.choices))
    raise TypeError(f"unsupported optuna distribution for {name!r}: {distribution!r}")


class _ReportingTrial(optuna.Trial):
    """The trial the objective gets: ``report`` also logs the value on the trial run.

    It shares its state (``__dict__``) with the trial Optuna made, so both are one trial
    to Optuna (same storage, cache and number); only ``report`` is added to.
    """

    __slots__ = ("_trainkit_key", "_trainkit_run", "_trainkit_steps")

    def __init__(self, trial: optuna.Trial, run: Run, key: str) -> None:
        # Not Trial.__init__: it would run the sampler's before_trial a second time.
        self.__dict__ = trial.__dict__
        self._trainkit_run = run
        self._trainkit_key = key
        self._trainkit_steps: set[int] = set()

    def report(self, value: float, step: int) -> None:
        super().report(value, step)  # validates; ignores a step reported before
        if step in self._trainkit_steps:
            return
        self._trainkit_steps.add(step)
        try:
            self._trainkit_run.log_metric(self._trainkit_key, float(value), step=int(step))
        except (TrackingError, TypeError, ValueError) as exc:
            log.warning("trial %s: intermediate value not logged: %s", self.number, exc)


class TrackedStudy:
    """An Optuna study tracked as one ``hpo_sweep`` run and one ``hpo_trial`` child per trial.

    ``search_space`` (name -> optuna distribution) is sampled before the objective runs,
    so each trial's ``trial_key_hash = trial_key(study_key_hash, params)`` is known when
    its run is created and is inherited by its fold runs; ``study_key_hash =
    study_key(model, search_space_description(search_space), **study_settings)``.
    Parameters the objective suggests beyond the space are logged but not hashed.

    Trial state -> run status: complete -> FINISHED (objective value logged as
    ``metric``); pruned -> KILLED with tag ``code.pruned=true``; failed (an exception,
    or a NaN/None value) -> FAILED. Values the objective reports with
    ``trial.report(value, step)`` are logged on the trial run as the step metric
    ``intermediate_metric`` (default ``intermediate_<metric>``). After ``optimize`` the
    best trial is recorded on the sweep: tags ``best_trial_run_id``,
    ``best_trial_number``, ``best_trial_key_hash`` and metric ``best_<metric>``
    (single-objective studies). The sweep is tagged ``code.hpo.metric=<metric>``.

    k-fold CV: create the folds with ``trial_run.child("hpo_trial_fold", fold_idx=k)``
    and return ``trial_run.cv_summary()[f"cv.{metric}.mean"]`` when the folds log
    ``metric``: each trial run then carries ``cv.*`` over its folds, and the sweep's
    leaderboard and ``trainkit-tracking tree`` show the fold spread of the same metric.

    Use it as a context manager (the sweep run ends when the block does), or call
    ``start()`` / ``end()``.
    """

    def __init__(
        self,
        tracker: Tracker,
        study: optuna.Study,
        *,
        model: str,
        search_space: Mapping[str, BaseDistribution],
        metric: str = "value",
        intermediate_metric: str | None = None,
        study_name: str | None = None,
        study_settings: Mapping[str, Any] | None = None,
        sweep_run: Run | None = None,
        resume: bool = False,
        **spec_fields: Any,
    ) -> None:
        self.tracker = tracker
        self.study = study
        self.metric = metric
        self.intermediate_metric = intermediate_metric or f"intermediate_{metric}"
        self.search_space = dict(search_space)
        self.study_key_hash = study_key(
            model, search_space_description(self.search_space), **dict(study_settings or {})
        )
        if study_name is None and not study.study_name.startswith("no-name-"):
            study_name = study.study_name  # Optuna's generated names carry no meaning
        self.sweep_spec = RunSpec(
            kind=RunKind.HPO_SWEEP,
            model=model,
            study_name=study_name,
            study_key_hash=self.study_key_hash,
            **spec_fields,
        )
        self._resume = resume
        self._sweep: Run | None = sweep_run
        self._owns_sweep = sweep_run is None
        self._lock = threading.Lock()
        self._trial_runs: dict[int, str] = {}
        self._trial_keys: dict[int, str] = {}

    # The sweep ---------------------------------------------------------------------

    @property
    def sweep_run(self) -> Run:
        """The sweep run (started on first use)."""
        return self.start()

    def start(self) -> Run:
        """Start the sweep run (once) and log the search space on it."""
        with self._lock:
            if self._sweep is None:
                self._sweep = self.tracker.start_run(self.sweep_spec, resume=self._resume)
                self._sweep.set_tags({METRIC_TAG: self.metric})
                self._sweep.log_params(
                    {
                        "search_space": {
                            name: json.dumps(desc["attributes"], sort_keys=True)
                            for name, desc in search_space_description(self.search_space).items()
                        },
                        "study_direction": ",".join(d.name for d in self.study.directions),
                    }
                )
                # Trials read the study's metric from the sweep when they summarise their
                # folds: it must be stored before the first trial ends (bounded, never fatal).
                self._sweep.flush(self.tracker.timeout)
            return self._sweep

    def end(self, status: str = "FINISHED") -> None:
        """End the sweep run (only when this object started it)."""
        if self._sweep is not None and self._owns_sweep:
            self._record_best_at_end()
            self._sweep.end(status)

    def _record_best_at_end(self) -> None:
        # A worker's tag can land after another's newer one: the last to end has the last say.
        try:
            self.record_best()
        except Exception as exc:  # never fatal: the tag is a convenience
            log.warning("could not tag the sweep with the best trial: %s", exc)

    def __enter__(self) -> TrackedStudy:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._sweep is None or not self._owns_sweep:
            return
        if exc is None:
            self._record_best_at_end()
        # The Run's own exit maps the outcome to a status (FINISHED / FAILED / KILLED).
        self._sweep.__exit__(exc_type, exc, tb)

    # Trials ------------------------------------------------------------------------

    def trial_key_hash(self, params: Mapping[str, Any]) -> str:
        return trial_key(self.study_key_hash, params)

    def trial_run_id(self, number: int) -> str | None:
        """The run id of trial ``number`` (of this process's trials, else its user attr)."""
        with self._lock:
            if number in self._trial_runs:
                return self._trial_runs[number]
        for frozen in self.study.get_trials(deepcopy=False):
            if frozen.number == number:
                value = frozen.user_attrs.get(RUN_ID_ATTR)
                return str(value) if value else None
        return None

    def optimize(
        self,
        objective: Objective,
        n_trials: int | None = None,
        *,
        timeout: float | None = None,
        n_jobs: int = 1,
        catch: Iterable[type[Exception]] | type[Exception] = (),
        callbacks: Iterable[Callable[[optuna.Study, optuna.trial.FrozenTrial], None]] | None = None,
        gc_after_trial: bool = False,
        show_progress_bar: bool = False,
    ) -> optuna.trial.FrozenTrial | None:
        """``study.optimize`` with ``objective(trial, trial_run)``; returns the best trial."""
        sweep = self.start()

        # The best trial on the sweep stays current as trials finish, in every worker.
        def keep_current(study: optuna.Study, frozen: optuna.trial.FrozenTrial) -> None:
            self.record_best()

        keep_best = [*(callbacks or ()), keep_current]
        self.study.optimize(
            lambda trial: self._run_trial(sweep, trial, objective),
            n_trials=n_trials,
            timeout=timeout,
            n_jobs=n_jobs,
            catch=catch,
            callbacks=keep_best,
            gc_after_trial=gc_after_trial,
            show_progress_bar=show_progress_bar,
        )
        return self.record_best()

    def _run_trial(self, sweep: Run, trial: optuna.Trial, objective: Objective) -> Any:
        params = {name: _suggest(trial, name, d) for name, d in self.search_space.items()}
        key = self.trial_key_hash(params)
        run = sweep.child(RunKind.HPO_TRIAL, trial_number=trial.number, trial_key_hash=key)
        with self._lock:
            self._trial_runs[trial.number] = run.id
            self._trial_keys[trial.number] = key
        if run.id is not None:  # a NoopRun on ranks other than 0 has no id without a group
            trial.set_user_attr(RUN_ID_ATTR, run.id)
        retried = _retried_trial(trial)
        if retried is not None:  # RetryFailedTrialCallback: link to the trial this retries
            keys = self.tracker.keys
            link = {keys["retry_of"]: str(retried)}
            retried_run = self.trial_run_id(retried)
            if retried_run:
                link[keys["retry_of_run_id"]] = retried_run
            run.set_tags(link)
        run.log_params(params)
        try:
            value = objective(_ReportingTrial(trial, run, self.intermediate_metric), run)
        except optuna.TrialPruned:
            run.set_tags({PRUNED_TAG: "true"})
            _summarize_pruned(run, trial.number)
            run.end("KILLED")
            raise
        except KeyboardInterrupt:
            run.set_tags({self.tracker.keys["interrupted"]: "true"})
            run.end("KILLED")
            raise
        except BaseException:
            run.end("FAILED")
            raise
        try:
            # Parameters suggested inside the objective (conditional ones) too.
            run.log_params(dict(trial.params))
        except TrackingError as exc:
            log.warning("trial %s: params not logged: %s", trial.number, exc)
        values = _values(value)
        if values is None:
            run.end("FAILED")  # Optuna marks a None/NaN result as a failed trial
            return value
        if len(values) == 1:
            run.log_metric(self.metric, values[0])
        else:
            run.log_metrics({f"{self.metric}_{i}": v for i, v in enumerate(values)})
        run.end("FINISHED")
        return value

    def record_best(self) -> optuna.trial.FrozenTrial | None:
        """Tag the sweep with the best trial (single-objective); None when no trial completed."""
        if len(self.study.directions) != 1:
            return None
        try:
            best = self.study.best_trial
        except ValueError:  # no completed trial
            return None
        run_id = self.trial_run_id(best.number)
        tags = {BEST_NUMBER_TAG: str(best.number)}
        if run_id:
            tags[BEST_RUN_TAG] = run_id
        key = self._trial_keys.get(best.number)
        if key is None and all(name in best.params for name in self.search_space):
            key = self.trial_key_hash({name: best.params[name] for name in self.search_space})
        if key is not None:
            tags[BEST_KEY_TAG] = key
        sweep = self.start()
        sweep.set_tags(tags)
        if best.value is not None:
            sweep.log_metric(f"best_{self.metric}", best.value)
        return best

    # After the sweep ---------------------------------------------------------------

    def refit_spec(self, trial: optuna.trial.FrozenTrial | None = None, **changes: Any) -> RunSpec:
        """The ``hpo_refit`` spec for ``trial`` (default: the best trial), a child of the sweep."""
        chosen = trial if trial is not None else self.study.best_trial
        key = self._trial_keys.get(chosen.number) or self.trial_key_hash(
            {name: chosen.params[name] for name in self.search_space}
        )
        fields: dict[str, Any] = {"trial_number": chosen.number, "trial_key_hash": key}
        fields.update(changes)
        return self.sweep_spec.child(RunKind.HPO_REFIT, **fields)

    def start_refit(self, trial: optuna.trial.FrozenTrial | None = None, **changes: Any) -> Run:
        """Start the refit run of ``trial`` (default: the best) under the sweep."""
        return self.tracker.start_run(self.refit_spec(trial, **changes), parent=self.sweep_run)


def _summarize_pruned(run: Run, number: int) -> None:
    # A KILLED run gets no summary at its end (an interrupt must not wait for the store);
    # a pruned trial is not an interrupt, and the folds it finished are worth a summary.
    try:
        run.cv_summary()
    except Exception as exc:
        log.warning("trial %s: no cross-validation summary: %s", number, exc)


def _values(value: Any) -> list[float] | None:
    """The objective's value(s) as floats, or None when Optuna will count the trial as failed."""
    if value is None:
        return None
    items = list(value) if isinstance(value, Sequence) and not isinstance(value, str) else [value]
    try:
        floats = [float(item) for item in items]
    except (TypeError, ValueError):
        return None
    if not floats or any(math.isnan(item) for item in floats):
        return None
    return floats
