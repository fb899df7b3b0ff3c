"""The identity of a run: RunKind, Lineage and RunSpec (frozen pydantic models).

The public home of these names; they are defined in ``trainkit_tracking._core.spec``.
"""

from trainkit_tracking._core.spec import (
    HPO_KINDS,
    IDENTITY_FIELDS,
    INHERITED_FIELDS,
    Lineage,
    RunKind,
    RunSpec,
    parse_training_id,
    training_id,
    validate_run_id,
)

__all__ = [
    "HPO_KINDS",
    "IDENTITY_FIELDS",
    "INHERITED_FIELDS",
    "Lineage",
    "RunKind",
    "RunSpec",
    "parse_training_id",
    "training_id",
    "validate_run_id",
]
