"""The tag-key registry (TagKeys) and validated, redacted tag sets (TagSet) of every run.

Pure: no I/O except ``TagKeys.from_yaml``, no mlflow. ``TagSet.for_spec`` is a function of
the spec, the registry and the environment mapping it is given.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from trainkit_tracking import _env
from trainkit_tracking._limits import MAX_TAG_VALUE, check_key, cut
from trainkit_tracking._redact import redact
from trainkit_tracking._version import __version__
from trainkit_tracking.errors import TagKeyError
from trainkit_tracking.models import HPO_KINDS, Lineage, RunKind, RunSpec, parse_training_id

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
    "mlflow_run_name",
    "parent_run_id",
    "mlflow_user",
    "source_name",
    "source_type",
    "git_commit",
)

# User tags (spec.tags) may override any tag except these, which find(), the run tree
# and the naming rules rely on; the Tracker sets the last three itself.
PROTECTED = ("run_key_hash", "run_kind", "mlflow_run_name", "run_name", "parent_run_id")

_RUN_TYPES = {
    RunKind.HPO_SWEEP: "sweep",
    RunKind.HPO_TRIAL: "trial",
    RunKind.HPO_TRIAL_FOLD: "fold",
    RunKind.HPO_REFIT: "refit",
    RunKind.FINAL_TRAINING: "training",
    RunKind.BENCHMARKING: "benchmark",
    RunKind.CONVERSION: "conversion",
}
# String identity fields tagged as they are, each when set (logical name == field name).
_STR_FIELDS = (
    "study_name",
    "study_key_hash",
    "study_family_hash",
    "trial_key_hash",
    "spec_fp",
    "exec_fp",
    "conv_fp",
    "parent_training_id",
    "benchmark_config_hash",
    "refit_protocol_fp",
    "group_id",
    "output_dir",
)
_GROUPING_FIELDS = ("study_key_hash", "study_family_hash", "trial_key_hash")
# A benchmark's parent: the first lineage field that is set, and the kind it names.
_BENCH_PARENTS = (
    ("hpo_trial_run_id", "trial"),
    ("hpo_refit_run_id", "refit"),
    ("hpo_sweep_run_id", "sweep"),
    ("parent_training_run_id", "final_training"),
)
TRUE = "true"


def _clean_value(key: str, value: object) -> str:
    if not isinstance(value, str):
        raise TypeError(
            f"tag {key!r} has a {type(value).__name__} value {value!r}; tag values must be "
            "str: convert it first (booleans as 'true'/'false', integers as plain decimals)"
        )
    return cut("tag", key, redact(key, value), MAX_TAG_VALUE)


class _Frozen:
    __slots__ = ()

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot set {name!r}")

    def __delattr__(self, name: str) -> None:
        raise AttributeError(f"{type(self).__name__} is immutable; cannot delete {name!r}")


class TagKeys(_Frozen, Mapping[str, str]):
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
        from trainkit_tracking._yaml import load_config

        where = f"tag-key file {os.fspath(path)!r}"
        data = load_config(path, where, TagKeyError, "a tag-key file is a flat mapping")
        from trainkit_tracking import _seed

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


class TagSet(_Frozen, Mapping[str, str]):
    """An immutable mapping of tag key -> str value, validated and redacted once.

    Keys follow MLflow's rules (``TagKeyError`` otherwise, ``TypeError`` for a key that is
    not a ``str``), as in ``run.set_tags``; values over 8000 characters are cut to 8000
    ending in ``...`` with a ``TrackingWarning``; secrets are masked (as everywhere in the
    SDK). ``a | b`` merges, ``b`` wins.
    """

    __slots__ = ("_tags",)
    _tags: Mapping[str, str]

    def __init__(self, tags: Mapping[str, str] | None = None) -> None:
        if isinstance(tags, TagSet):
            clean: dict[str, str] = dict(tags._tags)
        else:
            clean = {}
            for key, value in (tags or {}).items():
                check_key(key, "tag")
                clean[key] = _clean_value(key, value)
        object.__setattr__(self, "_tags", MappingProxyType(clean))

    @classmethod
    def _trusted(cls, tags: dict[str, str]) -> TagSet:
        # Merging two TagSets: both sides are validated already.
        tag_set = cls.__new__(cls)
        object.__setattr__(tag_set, "_tags", MappingProxyType(tags))
        return tag_set

    @classmethod
    def for_spec(
        cls,
        spec: RunSpec,
        keys: TagKeys | None = None,
        *,
        project: str | None = None,
        sdk_version: str | None = None,
        environ: Mapping[str, str] | None = None,
    ) -> TagSet:
        """Build the tags of ``spec``, except the creation-time ones.

        ``mlflow.runName``, ``code.run_name`` and ``mlflow.parentRunId`` come from
        :func:`creation_tags`. ``project`` is used when the spec has none (the Tracker
        passes its project, else the experiment name; without either it is
        ``unknown``). ``code.created_by`` is ``$USER``, else ``$USERNAME``, read from
        ``environ`` (default ``os.environ``), else the OS account name, else ``system``. ``spec.tags`` are
        merged last and may override any tag except ``code.run_key_hash``,
        ``code.run_kind`` and the creation-time ones (``TagKeyError`` when they differ).
        """
        keys = _DEFAULT if keys is None else keys
        environ = os.environ if environ is None else environ
        tags = _base_tags(spec, keys, project=project, sdk_version=sdk_version, environ=environ)
        tags.update(_kind_tags(spec, keys))
        if any(keys[name] in tags for name in _GROUPING_FIELDS):
            tags[keys["grouping_schema_version"]] = "1"
        for name in PROTECTED:
            key = keys[name]
            if key in spec.tags and spec.tags[key] != tags.get(key):
                raise TagKeyError(
                    f"spec.tags sets {key!r} to {spec.tags[key]!r}, but the SDK owns that tag "
                    f"(it is {tags.get(key)!r} here); remove it from spec.tags "
                    "(use spec.run_name or parent= for names and parents)"
                )
        tags.update(spec.tags)
        return cls(tags)

    def __getitem__(self, key: str) -> str:
        return self._tags[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._tags)

    def __len__(self) -> int:
        return len(self._tags)

    def __or__(self, other: Mapping[str, str]) -> TagSet:
        if not isinstance(other, Mapping):
            return NotImplemented
        right = other if isinstance(other, TagSet) else TagSet(other)
        return TagSet._trusted({**self._tags, **right._tags})

    def __ror__(self, other: Mapping[str, str]) -> TagSet:
        if not isinstance(other, Mapping):
            return NotImplemented
        return TagSet(other) | self

    def __reduce__(self) -> tuple[Any, ...]:
        return (TagSet, (dict(self._tags),))

    def __repr__(self) -> str:
        return f"TagSet({dict(self._tags)!r})"


def creation_tags(keys: TagKeys, *, run_name: str, parent_run_id: str | None = None) -> TagSet:
    """Tags that exist once a run is created: ``mlflow.runName``, ``code.run_name`` and,
    for a child, ``mlflow.parentRunId``."""
    tags = {keys["mlflow_run_name"]: run_name, keys["run_name"]: run_name}
    if parent_run_id is not None:
        tags[keys["parent_run_id"]] = parent_run_id
    return TagSet(tags)


def _created_by(environ: Mapping[str, str]) -> str:
    """``$USER``, else ``$USERNAME``, else the OS account name, else ``system``."""
    for name in _env.USER_VARS:
        value = environ.get(name)
        if value:
            return value
    return os_account() or "system"


@functools.cache
def os_account() -> str | None:
    """The name of this process's OS account (containers often set no ``$USER``), or None."""
    try:
        import pwd

        return pwd.getpwuid(os.getuid()).pw_name or None
    except (ImportError, KeyError, OSError):  # Windows, or a uid without a passwd entry
        pass
    try:
        return os.getlogin() or None
    except OSError:
        return None


def _base_tags(
    spec: RunSpec,
    keys: TagKeys,
    *,
    project: str | None,
    sdk_version: str | None,
    environ: Mapping[str, str],
) -> dict[str, str]:
    kind = spec.kind
    tags = {
        keys["stage"]: "hpo" if kind in HPO_KINDS else kind.value,
        keys["run_kind"]: kind.value,
        keys["run_type"]: _RUN_TYPES[kind],
        keys["model"]: spec.model,
        keys["env"]: spec.environment,
        keys["storage_env"]: spec.storage_env,
        keys["execution_platform"]: spec.environment,
        keys["created_by"]: _created_by(environ),
        keys["project"]: spec.project or project or "unknown",
        keys["run_key_hash"]: spec.run_key_hash,
        keys["sdk_version"]: sdk_version or __version__,
    }
    for name in _STR_FIELDS:
        value = getattr(spec, name)
        if value is not None:
            tags[keys[name]] = value
    if spec.trial_number is not None:
        tags[keys["trial_number"]] = str(spec.trial_number)
    if spec.fold_idx is not None:
        tags[keys["fold_idx"]] = str(spec.fold_idx)
    if kind is RunKind.FINAL_TRAINING:
        tags[keys["variant"]] = str(spec.variant)
    return tags


def _kind_tags(spec: RunSpec, keys: TagKeys) -> dict[str, str]:
    kind = spec.kind
    tags: dict[str, str] = {}
    azure = spec.environment == "azureml"
    if kind is RunKind.HPO_SWEEP and azure:
        tags[keys["azureml_run_type"]] = "sweep"
        tags[keys["azureml_sweep"]] = TRUE
    elif kind in (RunKind.HPO_TRIAL, RunKind.HPO_TRIAL_FOLD) and azure:
        tags[keys["azureml_run_type"]] = "trial"
        tags[keys["azureml_trial"]] = TRUE
    elif kind is RunKind.HPO_REFIT:
        tags[keys["code_run_type"]] = "refit"
        tags[keys["refit"]] = TRUE
    elif kind is RunKind.FINAL_TRAINING:
        tags[keys["training_type"]] = "final"
        tags[keys["trained_on_full_data"]] = TRUE
        if spec.lineage is not None:
            tags.update(_training_lineage(spec, spec.lineage, keys))
    elif kind is RunKind.BENCHMARKING:
        if spec.lineage is not None:
            tags.update(_benchmark_lineage(spec.lineage, keys))
    elif kind is RunKind.CONVERSION:
        tags.update(_conversion_tags(spec, keys))
    return tags


def _training_lineage(spec: RunSpec, lineage: Lineage, keys: TagKeys) -> dict[str, str]:
    tags: dict[str, str] = {}
    if lineage.source is not None:
        tags[keys["lineage_source"]] = lineage.source
    # The primary grouping tags point back to the HPO study and trial; the spec wins.
    if spec.study_key_hash is None and lineage.hpo_study_key_hash is not None:
        tags[keys["study_key_hash"]] = lineage.hpo_study_key_hash
    if spec.trial_key_hash is None and lineage.hpo_trial_key_hash is not None:
        tags[keys["trial_key_hash"]] = lineage.hpo_trial_key_hash
    for field in Lineage.model_fields:
        value = getattr(lineage, field)
        if field == "source":
            continue
        if value is not None:
            tags[keys[f"lineage_{field}"]] = value
    return tags


def _benchmark_lineage(lineage: Lineage, keys: TagKeys) -> dict[str, str]:
    tags: dict[str, str] = {}
    for field in ("hpo_trial_run_id", "hpo_refit_run_id", "hpo_sweep_run_id"):
        value = getattr(lineage, field)
        if value is not None:
            tags[keys[f"lineage_{field}"]] = value
    for field, parent_kind in _BENCH_PARENTS:
        value = getattr(lineage, field)
        if value is not None:
            tags[keys["lineage_parent_training_run_id"]] = value
            tags[keys["lineage_parent_kind"]] = parent_kind
            break
    return tags


def _conversion_tags(spec: RunSpec, keys: TagKeys) -> dict[str, str]:
    # RunSpec guarantees a parseable parent_training_id for conversion specs.
    assert spec.parent_training_id is not None
    spec_fp, exec_fp, variant = parse_training_id(spec.parent_training_id)
    tags = {
        keys["variant"]: str(variant),
        keys["lineage_source"]: "final_training",
        keys["lineage_parent_spec_fp"]: spec_fp,
        keys["lineage_parent_exec_fp"]: exec_fp,
    }
    if spec.lineage is not None and spec.lineage.parent_training_run_id is not None:
        tags[keys["lineage_parent_training_run_id"]] = spec.lineage.parent_training_run_id
    return tags
