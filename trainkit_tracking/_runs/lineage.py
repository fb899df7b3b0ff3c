"""What a final_training run trained from an HPO trial, refit or sweep should carry."""

from __future__ import annotations

from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._core.spec import Lineage, RunKind, article, validate_run_id
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._store.store import RunRecord, Store
from trainkit_tracking.errors import StoreUnavailableError, TrackingError


def lineage_of(store: Store, keys: TagKeys, run_id: str) -> Lineage:
    """The lineage a final_training run trained from this HPO trial/refit/sweep should carry."""
    try:
        validate_run_id(run_id)
    except ValueError as exc:
        raise TrackingError(f"lineage() needs a run id: {exc}") from exc
    record = _lineage_run(store, run_id, "run")
    tags = record.tags
    kind = tags.get(keys["run_kind"])
    study = tags.get(keys["study_key_hash"])
    trial_key = tags.get(keys["trial_key_hash"])
    if kind == RunKind.HPO_TRIAL.value:
        return Lineage(
            hpo_study_key_hash=study,
            hpo_trial_key_hash=trial_key,
            hpo_trial_run_id=run_id,
            hpo_sweep_run_id=record.parent_id,
        )
    if kind == RunKind.HPO_REFIT.value:
        trial_run = _trial_of_refit(store, keys, record)
        if trial_key is None and trial_run is not None:
            trial_key = trial_run.tags.get(keys["trial_key_hash"])
        return Lineage(
            hpo_study_key_hash=study,
            hpo_trial_key_hash=trial_key,
            hpo_trial_run_id=trial_run.run_id if trial_run else None,
            hpo_refit_run_id=run_id,
            hpo_sweep_run_id=record.parent_id,
        )
    if kind == RunKind.HPO_SWEEP.value:
        best = tags.get("best_trial_run_id")
        if not best:
            raise TrackingError(
                f"sweep {run_id!r} has no best trial (no 'best_trial_run_id' tag: no trial "
                "completed, or the sweep was not run by TrackedStudy); pass the id of the "
                "trial or refit run to lineage() instead"
            )
        best_record = _lineage_run(store, best, f"the best trial of sweep {run_id!r}")
        return Lineage(
            hpo_study_key_hash=study,
            hpo_trial_key_hash=best_record.tags.get(keys["trial_key_hash"]),
            hpo_trial_run_id=best,
            hpo_sweep_run_id=run_id,
        )
    if kind == RunKind.FINAL_TRAINING.value:
        return Lineage(source="final_training", parent_training_run_id=run_id)
    what = f"{article(kind)} {kind}" if kind else "not a trainkit-tracking"
    raise TrackingError(
        f"run {run_id!r} is {what} run; lineage comes from an "
        "hpo_trial, hpo_refit, hpo_sweep or final_training run"
    )


def _lineage_run(store: Store, run_id: str, what: str) -> RunRecord:
    try:
        return store.get_run(run_id)
    except StoreUnavailableError:
        raise  # the store did not answer: that says nothing about the run
    except Exception as exc:
        raise TrackingError(
            f"{what} {run_id!r} is not in the store {redact_value(store.tracking_uri)!r}: "
            f"{redact_value(str(exc))}; check the id (and the tracker's tracking URI)"
        ) from exc


def _trial_of_refit(store: Store, keys: TagKeys, refit: RunRecord) -> RunRecord | None:
    if refit.parent_id is None:
        return None
    number = refit.tags.get(keys["trial_number"])
    if number is None:
        return None
    records = store.search(
        [refit.experiment_id],
        f"tags.`mlflow.parentRunId` = '{refit.parent_id}' and "
        f"tags.`{keys['run_kind']}` = 'hpo_trial' and tags.`{keys['trial_number']}` = '{number}'",
    )
    return records[0] if records else None
