"""trainkit_tracking: track ML training pipelines in MLflow, named, tagged and durable."""

from typing import TYPE_CHECKING, Any

from trainkit_tracking._core.fingerprint import fingerprint, study_key, trial_key
from trainkit_tracking._core.naming import NamingPolicy
from trainkit_tracking._core.platform import detect_platform
from trainkit_tracking._core.spec import Lineage, RunKind, RunSpec, training_id
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._core.tags import TagSet
from trainkit_tracking._runs.run import Run
from trainkit_tracking._runs.tracker import Tracker
from trainkit_tracking._version import __version__
from trainkit_tracking.errors import (
    ParamConflictError,
    PolicyError,
    StoreUnavailableError,
    TagKeyError,
    TrackingError,
    TrackingWarning,
)

if TYPE_CHECKING:
    from trainkit_tracking._journal.run_logger import pending, sync
    from trainkit_tracking._push.push import PushReport, push

# Loaded on first use: the spool machinery is not needed to import the package.
# Loaded on first use: importing the package stays cheap (no spool or push machinery).
_LAZY = {
    "pending": "trainkit_tracking._journal.run_logger",
    "sync": "trainkit_tracking._journal.run_logger",
    "push": "trainkit_tracking._push.push",
    "PushReport": "trainkit_tracking._push.push",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'trainkit_tracking' has no attribute {name!r}")


__all__ = [
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
