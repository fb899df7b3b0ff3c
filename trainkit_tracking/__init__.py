"""trainkit_tracking: track ML training pipelines in MLflow, named, tagged and durable."""

from trainkit_tracking._keys import fingerprint
from trainkit_tracking._naming import NamingPolicy
from trainkit_tracking._platform import detect_platform
from trainkit_tracking._push import PushReport, push
from trainkit_tracking._runs import Run
from trainkit_tracking._tags import TagKeys, TagSet
from trainkit_tracking._tracker import Tracker
from trainkit_tracking._version import __version__
from trainkit_tracking.errors import (
    ParamConflictError,
    PolicyError,
    TagKeyError,
    TrackingError,
    TrackingWarning,
)
from trainkit_tracking.models import Lineage, RunKind, RunSpec

__all__ = [
    "Lineage",
    "NamingPolicy",
    "ParamConflictError",
    "PolicyError",
    "PushReport",
    "Run",
    "RunKind",
    "RunSpec",
    "TagKeyError",
    "TagKeys",
    "TagSet",
    "Tracker",
    "TrackingError",
    "TrackingWarning",
    "__version__",
    "detect_platform",
    "fingerprint",
    "push",
]
