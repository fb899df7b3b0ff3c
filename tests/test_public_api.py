"""The public surface: __all__ is pinned, and importing the package stays cheap."""

from __future__ import annotations

import json
import subprocess
import sys

import trainkit_tracking

EXPECTED_ALL = [
    "Lineage",
    "NamingPolicy",
    "ParamConflictError",
    "PolicyError",
    "PushReport",
    "Run",
    "RunKind",
    "RunSpec",
    "StoreUnavailableError",
    "TagKeyError",
    "TagKeys",
    "TagSet",
    "Tracker",
    "TrackingError",
    "TrackingWarning",
    "__version__",
    "detect_platform",
    "fingerprint",
    "pending",
    "push",
    "study_key",
    "sync",
    "training_id",
    "trial_key",
]


def test_all_is_pinned_and_sorted() -> None:
    assert trainkit_tracking.__all__ == EXPECTED_ALL
    assert sorted(EXPECTED_ALL) == EXPECTED_ALL
    for name in EXPECTED_ALL:
        assert hasattr(trainkit_tracking, name), name


def test_error_tree() -> None:
    from trainkit_tracking import (
        ParamConflictError,
        PolicyError,
        TagKeyError,
        TrackingError,
        TrackingWarning,
    )

    assert issubclass(PolicyError, TrackingError)
    assert issubclass(ParamConflictError, TrackingError)
    assert issubclass(TagKeyError, TrackingError) and issubclass(TagKeyError, KeyError)
    assert issubclass(TrackingWarning, UserWarning)


def test_import_loads_nothing_heavy() -> None:
    code = (
        "import json, sys, time; t = time.perf_counter(); import trainkit_tracking;"
        "elapsed = time.perf_counter() - t;"
        "heavy = [m for m in sys.modules if m.split('.')[0] in "
        "('mlflow', 'torch', 'transformers', 'azure', 'azureml', 'optuna', 'sqlalchemy', 'numpy')];"
        "print(json.dumps({'heavy': heavy, 'elapsed': elapsed}))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout)
    assert result["heavy"] == []  # bench/ measures the import time itself
