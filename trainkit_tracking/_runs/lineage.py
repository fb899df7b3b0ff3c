"""Lineage: what a final training, benchmark or conversion run carries of the runs it comes
from (``tracker.lineage``), and its description with links to them."""

from __future__ import annotations

from collections.abc import Callable, Mapping

from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._core.spec import Lineage, RunKind, article, validate_run_id
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._store.store import RunRecord, Store
from trainkit_tracking.errors import StoreUnavailableError, TrackingError


def lineage_of(store: Store, keys: TagKeys, run_id: str) -> Lineage:
    """The lineage a run made from ``run_id`` should carry: a final training trained from
    an HPO trial, refit or sweep (its best trial); a benchmark measuring any of these, a
    final training or a conversion; a conversion of a final training."""
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
    if kind in (RunKind.FINAL_TRAINING.value, RunKind.CONVERSION.value):
        # What a benchmark of it (or a conversion of a final training) carries; the HPO
        # study and trial it comes from name a benchmark and group it.
        if kind == RunKind.CONVERSION.value and (study is None or trial_key is None):
            parent = tags.get(keys["lineage_parent_training_run_id"])
            trained = reader(store)(parent) if parent else None
            if trained is not None:
                study = study or trained.tags.get(keys["study_key_hash"])
                trial_key = trial_key or trained.tags.get(keys["trial_key_hash"])
        return Lineage(
            source=kind,
            parent_training_run_id=run_id,
            hpo_study_key_hash=study,
            hpo_trial_key_hash=trial_key,
        )
    what = f"{article(kind)} {kind}" if kind else "not a trainkit-tracking"
    raise TrackingError(
        f"run {run_id!r} is {what} run; lineage comes from an hpo_trial, hpo_refit, "
        "hpo_sweep, final_training or conversion run (the run a final training is trained "
        "from, or the run a benchmark measures or a conversion converts)"
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


# The description of a final, benchmark or conversion run (MLflow's mlflow.note.content,
# Markdown) starts with this line; push rewrites such a note for the target's runs.
NOTE_HEAD = "Lineage:"
_LINK_ROLES = (
    ("lineage_hpo_trial_run_id", "trial"),
    ("lineage_hpo_refit_run_id", "refit"),
    ("lineage_hpo_sweep_run_id", "sweep"),
    ("lineage_parent_training_run_id", ""),  # named by the run's kind or the parent kind
)
_PARENT_ROLES = {  # code.lineage.parent_kind (or the lineage's source) -> how it is named
    "final_training": "final training",
    "conversion": "conversion",
    "trial": "trial",
    "refit": "refit",
    "sweep": "sweep",
}
LINKED_KINDS = frozenset(
    {RunKind.FINAL_TRAINING.value, RunKind.BENCHMARKING.value, RunKind.CONVERSION.value}
)


def lineage_links(tags: Mapping[str, str], keys: TagKeys) -> list[tuple[str, str]]:
    """(role, run id) of each run the lineage tags of a final, benchmark or conversion run
    name, once each: ``trial``, ``refit``, ``sweep``, ``final training``, ``conversion``."""
    kind = tags.get(keys["run_kind"], "")
    if kind not in LINKED_KINDS:
        return []
    links: dict[str, str] = {}
    for name, role in _LINK_ROLES:
        run_id = tags.get(keys[name])
        if not run_id or run_id in links:
            continue
        if not role:
            parent = tags.get(keys["lineage_parent_kind"]) or tags.get(keys["lineage_source"])
            if kind == RunKind.CONVERSION.value:
                role = "final training"  # a conversion converts a final training
            else:
                role = _PARENT_ROLES.get(parent or "", "training run")
        links[run_id] = role
    return [(role, run_id) for run_id, role in links.items()]


def lineage_note(
    links: list[tuple[str, str]],
    read: Callable[[str], RunRecord | None],
    url_of: Callable[[RunRecord], str | None],
) -> str | None:
    """The Markdown description naming each linked run: a link to its page where the store
    has a web UI, else its run id (and a line that says so). None without links."""
    if not links:
        return None
    lines = [NOTE_HEAD, ""]
    unlinked = False
    for role, run_id in links:
        record = read(run_id)
        if record is None:
            lines.append(f"- {role}: run id `{run_id}` (not in this store)")
            continue
        name = _markdown(record.name or run_id)
        url = url_of(record)
        if url is None:
            unlinked = True
            lines.append(f"- {role}: `{record.name or run_id}`, run id `{run_id}`")
        else:
            lines.append(f"- {role}: [{name}]({url})")
    if unlinked:
        lines += [
            "",
            "Run ids, not links: this tracking store has no web UI address "
            "(`trainkit-tracking tree --run ID` shows a run and what came of it).",
        ]
    return "\n".join(lines)


def _markdown(text: str) -> str:
    """Link text with Markdown's brackets escaped."""
    return text.replace("[", "\\[").replace("]", "\\]")


def reader(store: Store) -> Callable[[str], RunRecord | None]:
    """``store.get_run``, None for a run it does not have (a broken link costs only itself)."""

    def read(run_id: str) -> RunRecord | None:
        try:
            return store.get_run(run_id)
        except StoreUnavailableError:
            raise
        except Exception:
            return None

    return read
