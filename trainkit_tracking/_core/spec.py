"""The identity of a run: RunKind, Lineage and RunSpec (frozen pydantic models)."""

from __future__ import annotations

import enum
import re
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from trainkit_tracking._core.fingerprint import fingerprint
from trainkit_tracking._core.platform import detect_platform
from trainkit_tracking._core.suggest import did_you_mean

_ENV_RE = re.compile(r"^[A-Za-z0-9_-]+$")
_RUN_ID_RE = re.compile(r"^[0-9a-f]{32}$")
_UUID_RE = re.compile(
    r"^[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}$"
)
# The seed's forms too: `spec-81710c33-exec-30fd8453/v2`, and no `/v<n>` (variant 1).
_TRAINING_ID_RE = re.compile(
    r"^spec[_-](?P<spec>[0-9a-fA-F]+)[_-]exec[_-](?P<exec>[0-9a-fA-F]+)(?:/v(?P<variant>\d+))?$"
)


class RunKind(str, enum.Enum):
    """The kinds of run in a training pipeline's run tree."""

    HPO_SWEEP = "hpo_sweep"
    HPO_TRIAL = "hpo_trial"
    HPO_TRIAL_FOLD = "hpo_trial_fold"
    HPO_REFIT = "hpo_refit"
    FINAL_TRAINING = "final_training"
    BENCHMARKING = "benchmarking"
    CONVERSION = "conversion"

    def __str__(self) -> str:
        return self.value


HPO_KINDS = frozenset({RunKind.HPO_SWEEP, RunKind.HPO_TRIAL, RunKind.HPO_TRIAL_FOLD})

REQUIRED_FIELDS: dict[RunKind, tuple[str, ...]] = {
    RunKind.HPO_TRIAL: ("study_key_hash", "trial_number"),
    RunKind.HPO_TRIAL_FOLD: ("study_key_hash", "trial_number", "fold_idx"),
    RunKind.HPO_REFIT: ("study_key_hash", "trial_number"),
    RunKind.CONVERSION: ("conv_fp", "parent_training_id"),
}

# Fields that make up a run's identity (hashed into code.run_key_hash).
IDENTITY_FIELDS = (
    "kind",
    "project",
    "model",
    "storage_env",
    "study_name",
    "study_key_hash",
    "study_family_hash",
    "trial_key_hash",
    "trial_number",
    "fold_idx",
    "spec_fp",
    "exec_fp",
    "variant",
    "conv_fp",
    "parent_training_id",
    "benchmark_config_hash",
    "refit_protocol_fp",
    "group_id",
)

# Fields a child spec inherits from its parent.
INHERITED_FIELDS = (
    "model",
    "project",
    "environment",
    "storage_env",
    "study_name",
    "study_key_hash",
    "study_family_hash",
    "trial_key_hash",
    "trial_number",
)


def article(word: str) -> str:
    """``an`` before a kind read with a vowel sound (``an hpo_trial``), else ``a``."""
    return "an" if word[:1] in "aeiou" or word.startswith("hpo") else "a"


def validate_run_id(value: str, field: str = "run id") -> str:
    """Return ``value`` when it is an MLflow run id (32 lower-case hex) or a dashed UUID."""
    if _RUN_ID_RE.match(value) or _UUID_RE.match(value):
        return value
    raise ValueError(
        f"{field} must be an MLflow run id (32 lower-case hex characters) or a dashed UUID, got {value!r}"
    )


def parse_training_id(parent_training_id: str) -> tuple[str, str, int]:
    """Split ``spec_<fp>_exec_<fp>/v<n>`` into lower-case spec fp, exec fp and variant.

    ``_`` or ``-`` separate the parts; without ``/v<n>`` the variant is 1.
    """
    match = _TRAINING_ID_RE.match(parent_training_id)
    if match is None:
        raise ValueError(
            "parent_training_id must look like 'spec_<hex>_exec_<hex>/v<n>' ('-' instead of "
            f"'_' and no '/v<n>' are accepted too), got {parent_training_id!r}"
        )
    return match["spec"].lower(), match["exec"].lower(), int(match["variant"] or 1)


def training_id(spec_fp: str, exec_fp: str, variant: int = 1) -> str:
    """The ``spec_<fp>_exec_<fp>/v<n>`` id of a final training: a conversion's ``parent_training_id``.

    ``spec_fp`` and ``exec_fp`` are the training spec's hex fingerprints (either case);
    raises ValueError for anything that would not parse back.
    """
    if isinstance(variant, bool) or not isinstance(variant, int) or variant < 1:
        raise ValueError(f"variant must be an int >= 1, got {variant!r}")
    value = f"spec_{spec_fp}_exec_{exec_fp}/v{variant}"
    parse_training_id(value)
    return value


def unknown_fields(model: type[BaseModel], data: Any) -> Any:
    """``data`` unchanged; a ValueError (pydantic makes it a ValidationError) naming each key
    that is not a field of ``model``, with the field it resembles (``fold`` -> ``fold_idx``)."""
    if not isinstance(data, dict):
        return data
    fields = model.model_fields
    unknown = [key for key in data if key not in fields]
    if not unknown:
        return data
    parts = []
    for key in unknown:
        hint = did_you_mean(str(key), fields, n=1)
        parts.append(f"{key!r}" + (f" ({hint})" if hint else ""))
    raise ValueError(
        f"{model.__name__} has no field {' or '.join(parts)}; its fields are {', '.join(fields)}"
    )


class Lineage(BaseModel):
    """Where a run comes from: the HPO sweep/trial/refit or the training it was built from."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    source: str | None = None
    hpo_study_key_hash: str | None = None
    hpo_trial_key_hash: str | None = None
    hpo_trial_run_id: str | None = None
    hpo_refit_run_id: str | None = None
    hpo_sweep_run_id: str | None = None
    parent_training_run_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return unknown_fields(cls, data)

    @field_validator(
        "hpo_trial_run_id", "hpo_refit_run_id", "hpo_sweep_run_id", "parent_training_run_id"
    )
    @classmethod
    def _check_run_id(cls, value: str | None, info: Any) -> str | None:
        return None if value is None else validate_run_id(value, info.field_name)

    @model_validator(mode="after")
    def _default_source(self) -> Lineage:
        if self.source is None and any(
            getattr(self, name) is not None
            for name in (
                "hpo_study_key_hash",
                "hpo_trial_key_hash",
                "hpo_trial_run_id",
                "hpo_refit_run_id",
                "hpo_sweep_run_id",
            )
        ):
            object.__setattr__(self, "source", "hpo_best_selected")
        return self


class RunSpec(BaseModel):
    """The identity of one run. Frozen; validated once, at construction."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: RunKind
    model: str = Field(min_length=1)
    project: str | None = None
    environment: str = Field(default_factory=lambda: detect_platform())
    storage_env: str = ""
    study_name: str | None = None
    study_key_hash: str | None = None
    study_family_hash: str | None = None
    trial_key_hash: str | None = None
    trial_number: int | None = Field(default=None, ge=0)
    fold_idx: int | None = Field(default=None, ge=0)
    spec_fp: str | None = None
    exec_fp: str | None = None
    variant: int = Field(default=1, ge=1)
    conv_fp: str | None = None
    parent_training_id: str | None = None
    benchmark_config_hash: str | None = None
    refit_protocol_fp: str | None = None
    group_id: str | None = None
    output_dir: str | None = None
    lineage: Lineage | None = None
    tags: dict[str, str] = Field(default_factory=dict)
    run_name: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _known_fields(cls, data: Any) -> Any:
        return unknown_fields(cls, data)

    @model_validator(mode="before")
    @classmethod
    def _default_storage_env(cls, data: Any) -> Any:
        if isinstance(data, dict) and not data.get("storage_env"):
            environment = data.get("environment") or detect_platform()
            data = {**data, "environment": environment, "storage_env": environment}
        return data

    @field_validator("environment", "storage_env")
    @classmethod
    def _check_env(cls, value: str, info: Any) -> str:
        if not _ENV_RE.match(value):
            raise ValueError(
                f"{info.field_name} must be letters, digits, '_' or '-' only, got {value!r}"
            )
        return value

    @field_validator("run_name")
    @classmethod
    def _check_run_name(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("run_name must not be empty; leave it unset to use the naming policy")
        return value

    @model_validator(mode="after")
    def _check_required(self) -> RunSpec:
        missing = [
            name for name in REQUIRED_FIELDS.get(self.kind, ()) if getattr(self, name) is None
        ]
        if missing:
            raise ValueError(
                f"{article(self.kind.value)} {self.kind.value} RunSpec needs {', '.join(missing)}: "
                f"set {' and '.join(repr(m) for m in missing)} for kind {self.kind.value!r}"
            )
        if self.parent_training_id is not None and self.kind is RunKind.CONVERSION:
            parse_training_id(self.parent_training_id)
        if self.kind is RunKind.BENCHMARKING and self.lineage is not None:
            # A benchmark is named and grouped by the HPO study and trial it measures:
            # tracker.lineage() carries them, so that they need not be copied by hand.
            for field, source in (
                ("study_key_hash", "hpo_study_key_hash"),
                ("trial_key_hash", "hpo_trial_key_hash"),
            ):
                if getattr(self, field) is None and getattr(self.lineage, source) is not None:
                    object.__setattr__(self, field, getattr(self.lineage, source))
        return self

    def child(self, kind: RunKind | str, **changes: Any) -> RunSpec:
        """Derive a child spec that inherits the parent's identity fields (not its name or tags)."""
        data: dict[str, Any] = {name: getattr(self, name) for name in INHERITED_FIELDS}
        data.update(changes)
        data["kind"] = kind
        return RunSpec(**data)

    def identity(self) -> dict[str, Any]:
        """The fields that make up this run's identity."""
        return {name: getattr(self, name) for name in IDENTITY_FIELDS}

    @property
    def run_key_hash(self) -> str:
        """SHA-256 of the identity: the same logical run always gets the same hash."""
        return fingerprint(self.identity())
