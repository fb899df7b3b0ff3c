"""The tag-key registry (TagKeys): the logical name of every tag the SDK writes -> its key.

Pure: no I/O except ``TagKeys.from_yaml``, no mlflow; keys follow MLflow's rules (``_limits``).
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from trainkit_tracking._core import seed_policy as _seed
from trainkit_tracking._core.limits import check_key
from trainkit_tracking.errors import TagKeyError

# Logical name -> tag key: every key of SPEC section 5, plus the ones the Tracker writes
# later (run names, parent id, interruption, heartbeat, version bookkeeping).
_DEFAULT_KEYS: dict[str, str] = {
    # Every run.
    "stage": "code.stage",
    "run_kind": "code.run_kind",
    "model": "code.model",
    "env": "code.env",
    "storage_env": "code.storage_env",
    "execution_platform": "code.execution_platform",
    "created_by": "code.created_by",
    "project": "code.project",
    "run_key_hash": "code.run_key_hash",
    "sdk_version": "code.sdk_version",
    "run_type": "mlflow.runType",
    # Set by the Tracker when the run is created.
    "run_name": "code.run_name",
    "mlflow_run_name": "mlflow.runName",
    "parent_run_id": "mlflow.parentRunId",
    "base_name": "code.base_name",
    "version": "code.version",
    # Identity fields, each when set.
    "study_name": "code.study_name",
    "study_key_hash": "code.study_key_hash",
    "study_family_hash": "code.study_family_hash",
    "trial_key_hash": "code.trial_key_hash",
    "spec_fp": "code.spec_fp",
    "exec_fp": "code.exec_fp",
    "variant": "code.variant",
    "conv_fp": "code.conv_fp",
    "parent_training_id": "code.parent_training_id",
    "benchmark_config_hash": "code.benchmark_config_hash",
    "refit_protocol_fp": "code.refit_protocol_fp",
    "group_id": "code.group_id",
    "output_dir": "code.output_dir",
    "trial_number": "code.hpo.trial_number",
    "fold_idx": "code.hpo.fold_idx",
    "grouping_schema_version": "code.grouping_schema_version",
    # Per kind.
    "azureml_run_type": "azureml.runType",
    "azureml_sweep": "azureml.sweep",
    "azureml_trial": "azureml.trial",
    "code_run_type": "code.run_type",
    "refit": "code.refit",
    "training_type": "training_type",
    "trained_on_full_data": "code.trained_on_full_data",
    # Lineage.
    "lineage_source": "code.lineage.source",
    "lineage_hpo_study_key_hash": "code.lineage.hpo_study_key_hash",
    "lineage_hpo_trial_key_hash": "code.lineage.hpo_trial_key_hash",
    "lineage_hpo_trial_run_id": "code.lineage.hpo_trial_run_id",
    "lineage_hpo_refit_run_id": "code.lineage.hpo_refit_run_id",
    "lineage_hpo_sweep_run_id": "code.lineage.hpo_sweep_run_id",
    "lineage_parent_training_run_id": "code.lineage.parent_training_run_id",
    "lineage_parent_kind": "code.lineage.parent_kind",
    "lineage_parent_spec_fp": "code.lineage.parent_spec_fp",
    "lineage_parent_exec_fp": "code.lineage.parent_exec_fp",
    # Run state.
    "interrupted": "code.interrupted",
    "heartbeat": "code.heartbeat",
    # A random id set at creation: a retried or late create_run finds the run it made
    # (a key no secret rule masks: a masked value could not be searched for).
    "creation_id": "code.creation_id",
    # The identity fields of the RunSpec as JSON (set by the Tracker at creation), so a
    # joined run rebuilds exactly the spec it was created with.
    "run_spec": "code.run_spec",
    # Offline runs (created in the local store while the tracking store was unreachable).
    "push_to": "code.push_to",
    # Optuna: a trial that retries another (RetryFailedTrialCallback).
    "retry_of": "code.hpo.retry_of",
    "retry_of_run_id": "code.hpo.retry_of_run_id",
    # A run several processes hold (resume=True): one tag per holder, its heartbeat.
    "holder_prefix": "code.holder",
    "remote_parent_id": "code.remote_parent_id",
    # A pushed run whose name got a version claimed in the target: the name it had offline.
    "offline_name": "code.offline_name",
    # MLflow's run description (Markdown): the lineage links of final, benchmark and
    # conversion runs.
    "description": "mlflow.note.content",
    # Run context (set by the Tracker at creation; docs/context.md): what mlflow.start_run
    # would set, so MLflow's UI shows who and what made the run.
    "mlflow_user": "mlflow.user",
    "source_name": "mlflow.source.name",
    "source_type": "mlflow.source.type",
    "git_commit": "mlflow.source.git.commit",
    "git_branch": "code.git.branch",
    "git_dirty": "code.git.dirty",
    "python_version": "code.python_version",
    "versions_mlflow": "code.versions.mlflow",
    "versions_torch": "code.versions.torch",
    "versions_transformers": "code.versions.transformers",
    "versions_optuna": "code.versions.optuna",
    # Where the run ran.
    "host": "code.host",
    "pid": "code.pid",
    "slurm_job_id": "code.slurm.job_id",
    "slurm_array_job_id": "code.slurm.array_job_id",
    "slurm_array_task_id": "code.slurm.array_task_id",
    "node_rank": "code.node_rank",
    "world_size": "code.world_size",
}

# MLflow's own tags keep their meaning: these logical names cannot be mapped elsewhere.
FIXED = (
    "description",
    "mlflow_run_name",
    "parent_run_id",
    "mlflow_user",
    "source_name",
    "source_type",
    "git_commit",
)


class Frozen:
    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot delete {name!r}")


class TagKeys(Frozen, Mapping[str, str]):
    """The tag-key registry: logical name -> tag key. Immutable.

    ``TagKeys.default()`` holds every key the SDK writes (docs/tags.md); ``from_dict`` and
    ``from_yaml`` merge overrides over the defaults. ``keys["stage"]`` gives the key; an
    unknown logical name raises ``TagKeyError`` (a ``KeyError``).
    """

    __slots__ = ("_keys",)
    _keys: Mapping[str, str]

    def __init__(self, overrides: Mapping[str, str] | None = None) -> None:
        merged = dict(_DEFAULT_KEYS)
        if overrides:
            if not isinstance(overrides, Mapping):
                raise TagKeyError(
                    f"tag-key overrides must be a mapping of logical name -> tag key, "
                    f"got {type(overrides).__name__} {overrides!r}"
                )
            unknown = sorted(str(name) for name in overrides if name not in _DEFAULT_KEYS)
            if unknown:
                raise TagKeyError(
                    f"unknown logical tag name(s) {', '.join(map(repr, unknown))}; "
                    f"known names are: {', '.join(sorted(_DEFAULT_KEYS))}"
                )
            for name, key in overrides.items():
                if name in _RESERVED and key != _DEFAULT_KEYS[name]:
                    raise TagKeyError(
                        f"logical tag name {name!r} maps to MLflow's own tag "
                        f"{_DEFAULT_KEYS[name]!r}, which cannot be remapped (got {key!r}): MLflow's "
                        "UI and API read it there; remove it from the overrides"
                    )
                try:
                    merged[name] = check_key(key, "tag")
                except (TagKeyError, TypeError) as e:
                    raise TagKeyError(f"logical tag name {name!r}: {e}") from e
                if name in FIXED and key != _DEFAULT_KEYS[name]:
                    raise TagKeyError(
                        f"logical tag name {name!r} cannot be mapped to {key!r}: "
                        f"{_DEFAULT_KEYS[name]!r} is MLflow's own tag; remove the override"
                    )
        _check_unique(merged)
        object.__setattr__(self, "_keys", MappingProxyType(merged))

    @classmethod
    def default(cls) -> TagKeys:
        """The default registry: every key the SDK writes."""
        return _DEFAULT

    @classmethod
    def from_dict(cls, overrides: Mapping[str, str]) -> TagKeys:
        """Merge ``overrides`` (logical name -> tag key) over the defaults."""
        return cls(overrides)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> TagKeys:
        """Load overrides from a YAML file holding a mapping of logical name -> tag key.

        The seed repo's ``config/tags.yaml`` (sections of name -> tag key) is read too:
        its names are mapped to ours, and the ones this SDK does not write are ignored.
        """
        from trainkit_tracking._core.yaml_files import load_config

        where = f"tag-key file {os.fspath(path)!r}"
        data = load_config(path, where, TagKeyError, "a tag-key file is a flat mapping")

        if _seed.is_seed_tags(data):
            try:
                data = _seed.tag_key_overrides(data)
            except TagKeyError as e:
                raise TagKeyError(f"{where}: {e}") from e
        if data is None:
            return cls()
        if not isinstance(data, Mapping):
            raise TagKeyError(
                f"tag-key file {os.fspath(path)!r} must hold a mapping of logical name -> "
                f"tag key, got {type(data).__name__}"
            )
        try:
            return cls(data)
        except TagKeyError as e:
            raise TagKeyError(f"tag-key file {os.fspath(path)!r}: {e}") from e

    def __getitem__(self, name: str) -> str:
        try:
            return self._keys[name]
        except KeyError:
            raise TagKeyError(
                f"unknown logical tag name {name!r}; known names are: "
                f"{', '.join(sorted(self._keys))}"
            ) from None

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __hash__(self) -> int:
        return hash(frozenset(self._keys.items()))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, TagKeys):
            return dict(self._keys) == dict(other._keys)
        return super().__eq__(other)

    def __reduce__(self) -> tuple[Any, ...]:
        changed = {n: k for n, k in self._keys.items() if _DEFAULT_KEYS[n] != k}
        return (TagKeys, (changed,))

    def __repr__(self) -> str:
        changed = {n: k for n, k in self._keys.items() if _DEFAULT_KEYS[n] != k}
        return f"TagKeys.from_dict({changed!r})" if changed else "TagKeys.default()"


# MLflow's own tags keep their meaning: the UI nests runs by mlflow.parentRunId, names them
# by mlflow.runName, and shows mlflow.user / mlflow.source.* as "Created by" and "Source".
_RESERVED = frozenset(
    name
    for name, key in _DEFAULT_KEYS.items()
    if key in ("mlflow.parentRunId", "mlflow.runName", "mlflow.user")
    or key.startswith("mlflow.source.")
)


def _check_unique(keys: Mapping[str, str]) -> None:
    seen: dict[str, str] = {}
    for name, key in keys.items():
        if key in seen:
            raise TagKeyError(
                f"logical tag names {seen[key]!r} and {name!r} both map to tag key {key!r}; "
                "give each its own key"
            )
        seen[key] = name


_DEFAULT = TagKeys()
