"""Validated, redacted tag sets (TagSet): the tags of every run, built from its spec.

Pure: no I/O, no mlflow. ``TagSet.for_spec`` is a function of the spec, the registry
(``_tag_keys.TagKeys``) and the environment mapping it is given.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Iterator, Mapping
from types import MappingProxyType
from typing import Any

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.limits import MAX_TAG_VALUE, check_key, cut
from trainkit_tracking._core.redact import redact
from trainkit_tracking._core.spec import HPO_KINDS, Lineage, RunKind, RunSpec, parse_training_id
from trainkit_tracking._core.tag_keys import Frozen, TagKeys
from trainkit_tracking._version import __version__
from trainkit_tracking.errors import TagKeyError

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


class TagSet(Frozen, Mapping[str, str]):
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
        keys = TagKeys.default() if keys is None else keys
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
            if field == "parent_training_run_id" and lineage.source == "conversion":
                parent_kind = "conversion"  # tracker.lineage() of a conversion run
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
