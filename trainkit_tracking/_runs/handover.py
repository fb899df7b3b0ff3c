"""Handing a run to a subprocess and taking it over there: the variables, and what they mean.

``subprocess_env`` writes them (ours and MLflow's); ``read_handover`` reads them back in
the child, the seed pipeline's forms included, and says whether to join a run or create
a child of one. A run's spec is rebuilt from its tags when it is joined.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.redact import get_logger
from trainkit_tracking._core.spec import IDENTITY_FIELDS, RunKind, RunSpec
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking.errors import TrackingError

log = get_logger(__name__)

# Run ids are MLflow's 32-hex ids on most stores, but an Azure ML job's run id is its job
# name, so only the character set is checked for ids handed over.
HANDED_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,128}$")

# Logical tag name -> RunSpec field, for a child the seed's variables describe.
_SEED_INHERITED_TAGS = {
    "model": "model",
    "study_key_hash": "study_key_hash",
    "study_family_hash": "study_family_hash",
    "trial_key_hash": "trial_key_hash",
    "storage_env": "storage_env",
    "env": "environment",
    "project": "project",
}
# Logical tag name -> RunSpec field, for rebuilding a spec from a run's tags.
_SPEC_TAGS = {
    "run_kind": "kind",
    "model": "model",
    "project": "project",
    "env": "environment",
    "storage_env": "storage_env",
    "study_name": "study_name",
    "study_key_hash": "study_key_hash",
    "study_family_hash": "study_family_hash",
    "trial_key_hash": "trial_key_hash",
    "trial_number": "trial_number",
    "variant": "variant",
    "fold_idx": "fold_idx",
    "spec_fp": "spec_fp",
    "exec_fp": "exec_fp",
    "conv_fp": "conv_fp",
    "parent_training_id": "parent_training_id",
    "benchmark_config_hash": "benchmark_config_hash",
    "refit_protocol_fp": "refit_protocol_fp",
    "group_id": "group_id",
}


def clean_env(base: Mapping[str, str]) -> dict[str, str]:
    """``base`` without stale run handover variables (ours and the seed pipeline's)."""
    return {
        key: value
        for key, value in base.items()
        if key not in _env.STALE_HANDOVER and not key.startswith(_env.TRAINKIT_PREFIX)
    }


def spec_identity_json(spec: RunSpec) -> str:
    """The identity fields of ``spec`` (and its environment) as compact JSON."""
    return spec.model_dump_json(include={*IDENTITY_FIELDS, "environment"}, exclude_none=True)


def check_run_id(run_id: object, source: str) -> str:
    if not isinstance(run_id, str) or not HANDED_RUN_ID.match(run_id):
        raise TrackingError(f"{source} must be a run id, got {run_id!r}")
    return run_id


@dataclass(frozen=True)
class Handover:
    """What the environment asks ``attach`` to do: join ``run_id``, or create a child of
    ``parent_id`` (from ``spec``, or from the seed's variables when ``spec`` is None)."""

    run_id: str | None = None
    parent_id: str | None = None
    spec: RunSpec | None = None
    name: str | None = None
    source: str = ""


def read_handover(environ: Mapping[str, str], *, fell_back: bool) -> Handover:
    """Decide what ``Tracker.attach()`` does from the environment; TrackingError if nothing."""
    run_id = environ.get(_env.TRAINKIT_RUN_ID)
    spec_json = environ.get(_env.TRAINKIT_RUN_SPEC)
    parent_id = environ.get(_env.TRAINKIT_PARENT_RUN_ID)
    name = environ.get(_env.MLFLOW_RUN_NAME) or None
    mlflow_run = environ.get(_env.MLFLOW_RUN_ID)
    seed_parent = environ.get(_env.MLFLOW_PARENT_RUN_ID)
    if run_id:
        return Handover(
            run_id=check_run_id(run_id, _env.TRAINKIT_RUN_ID), source=_env.TRAINKIT_RUN_ID
        )
    if parent_id and spec_json:
        try:
            spec = RunSpec.model_validate_json(spec_json)
        except ValueError as exc:
            raise TrackingError(
                f"{_env.TRAINKIT_RUN_SPEC} is not a valid RunSpec ({exc}); hand the child over "
                "with run.subprocess_env(child=spec)"
            ) from exc
        parent = check_run_id(parent_id, _env.TRAINKIT_PARENT_RUN_ID)
        return Handover(parent_id=parent, spec=spec, name=name, source=_env.TRAINKIT_PARENT_RUN_ID)
    if mlflow_run and seed_parent and not fell_back:
        # The seed's refit handover: the refit run exists already, under that parent.
        return Handover(
            run_id=check_run_id(mlflow_run, _env.MLFLOW_RUN_ID), source=_env.MLFLOW_RUN_ID
        )
    if seed_parent:
        parent = check_run_id(seed_parent, _env.MLFLOW_PARENT_RUN_ID)
        return Handover(parent_id=parent, name=name, source=_env.MLFLOW_PARENT_RUN_ID)
    if mlflow_run and not fell_back:
        return Handover(
            run_id=check_run_id(mlflow_run, _env.MLFLOW_RUN_ID), source=_env.MLFLOW_RUN_ID
        )
    raise TrackingError(
        "nothing to attach to: the parent process must hand over a run with "
        "run.subprocess_env() (TRAINKIT_RUN_ID, or TRAINKIT_PARENT_RUN_ID and "
        "TRAINKIT_RUN_SPEC), or set MLFLOW_RUN_ID / MLFLOW_PARENT_RUN_ID"
    )


def seed_child_spec(
    parent_id: str, parent_tags: Mapping[str, str], environ: Mapping[str, str], keys: TagKeys
) -> RunSpec:
    """The spec of the child the seed's variables describe: an ``hpo_trial_fold`` when
    ``MLFLOW_FOLD_IDX`` is set, else an ``hpo_trial``; model and hashes from the parent."""
    fields: dict[str, Any] = {}
    for logical, field in _SEED_INHERITED_TAGS.items():
        value = parent_tags.get(keys[logical])
        if value:
            fields[field] = value
    if "model" not in fields:
        raise TrackingError(
            f"parent run {parent_id!r} has no {keys['model']!r} tag; create it with "
            "trainkit_tracking or hand the child over with run.subprocess_env(child=spec)"
        )
    trial = _env.read_int(environ, _env.MLFLOW_TRIAL_NUMBER)
    if trial is None:
        tagged = parent_tags.get(keys["trial_number"])
        trial = int(tagged) if tagged and tagged.isdigit() else None
    fold = _env.read_int(environ, _env.MLFLOW_FOLD_IDX)
    fields["kind"] = RunKind.HPO_TRIAL_FOLD if fold is not None else RunKind.HPO_TRIAL
    if trial is None:
        raise TrackingError(
            f"{_env.MLFLOW_PARENT_RUN_ID}={parent_id} asks for an {fields['kind'].value} child, "
            f"which needs a trial number: set {_env.MLFLOW_TRIAL_NUMBER}, or set "
            f"{_env.MLFLOW_RUN_ID} too to join an existing run (the refit handover)"
        )
    fields["trial_number"] = trial
    if fold is not None:
        fields["fold_idx"] = fold
    return RunSpec(**fields)


def spec_from_tags(tags: Mapping[str, str], keys: TagKeys) -> tuple[RunSpec | None, str | None]:
    """Rebuild the RunSpec of a run from its tags (for joined runs): (spec, None), or
    (None, why not) when the tags do not describe one."""
    stored = tags.get(keys["run_spec"])
    problem: str | None = None
    if stored:
        try:
            return RunSpec.model_validate_json(stored), None
        except ValueError as exc:
            # Written by another version of the SDK: the individual tags may still do.
            problem = f"its {keys['run_spec']} tag is not a RunSpec of this version ({exc})"
            log.debug("run spec tag unreadable: %s", exc)
    fields: dict[str, Any] = {}
    for logical, field in _SPEC_TAGS.items():
        value = tags.get(keys[logical])
        if value:
            fields[field] = value
    if "kind" not in fields or "model" not in fields:
        return None, problem or f"it has no {keys['run_kind']!r} and {keys['model']!r} tags"
    try:
        return RunSpec(**fields), None
    except ValueError as exc:  # pydantic's ValidationError is a ValueError
        return None, problem or f"its tags do not make a valid RunSpec ({exc})"
