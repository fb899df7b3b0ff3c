"""MLflow's rules for keys, values and batches (``mlflow/utils/validation.py``), in one place.

Every metric, param and tag key is checked by ``check_key`` and every value too long for
MLflow is cut by ``cut``, which warns once per cut, whichever API it came through.
"""

from __future__ import annotations

import posixpath
import re
from typing import Any

from trainkit_tracking.errors import TagKeyError, warn

# MLflow's MAX_ENTITY_KEY_LENGTH, MAX_PARAM_VAL_LENGTH and MAX_TAG_VAL_LENGTH.
MAX_KEY = 250
MAX_PARAM_VALUE = 6000
MAX_TAG_VALUE = 8000

# MLflow's per-request limits (MAX_METRICS_PER_BATCH, MAX_PARAMS_TAGS_PER_BATCH,
# MAX_ENTITIES_PER_BATCH); the server also rejects a log-batch request body over 1e6
# bytes, so batches stay well under that estimate.
MAX_METRICS = 1000
MAX_PARAMS = 100
MAX_TAGS = 100
MAX_ITEMS = 1000
MAX_BATCH_BYTES = 800_000

# validate_param_and_metric_name on POSIX (Windows servers also refuse ':').
_KEY_RE = re.compile(r"^[/\w.\- :]*$")
_ELLIPSIS = "..."
# Keys seen valid, so the logging hot path pays one set lookup; bounded for keys made
# per step.
GOOD_KEYS: set[str] = set()
_GOOD_KEYS_MAX = 100_000


def key_problem(key: str) -> str | None:
    """Why MLflow refuses ``key`` as a metric, param or tag key, or None when it accepts it.

    MLflow's rule (``_validate_tag_name``, ``path_not_unique``): 1-250 characters of
    letters, digits, ``_``, ``-``, ``.``, ``/``, ``:`` and spaces, and unchanged by
    ``posixpath.normpath`` without becoming ``.`` or starting with ``..`` or ``/``: so
    ``a..b`` is a valid key, ``a/../b``, ``..a``, ``a//b`` and ``a/`` are not.
    """
    if not key:
        return "it is empty"
    if len(key) > MAX_KEY:
        return f"it has {len(key)} characters, MLflow allows at most {MAX_KEY}"
    if not _KEY_RE.match(key):
        return "MLflow allows only letters, digits, '_', '-', '.', ' ', ':' and '/' in keys"
    normal = posixpath.normpath(key)
    if normal != key or normal == "." or normal.startswith(("..", "/")):
        return (
            "MLflow treats keys as paths, so a key must not be '.', start with '/' or '..', "
            "or change when normalised ('//', '/./', '/../', a trailing '/')"
        )
    return None


def check_key(key: Any, what: str) -> str:
    """Return ``key`` if MLflow accepts it as a ``what`` (metric, param, tag) key, else raise.

    A key that is not a ``str`` is a ``TypeError``; a ``str`` MLflow refuses is a
    ``TagKeyError`` (a ``KeyError`` and a ``ValueError``) naming the key and the rule.
    """
    if not isinstance(key, str):
        raise TypeError(f"{what} key must be a str, got {key!r} ({type(key).__name__})")
    problem = key_problem(key)
    if problem is not None:
        shown = key if len(key) <= MAX_KEY else key[:MAX_KEY] + _ELLIPSIS
        raise TagKeyError(f"invalid {what} key {shown!r}: {problem}; rename it")
    if len(GOOD_KEYS) < _GOOD_KEYS_MAX:
        GOOD_KEYS.add(key)
    return key


def cut(what: str, key: str, value: str, limit: int) -> str:
    """``value``, or its first ``limit`` characters ending in ``...`` with a warning."""
    if len(value) <= limit:
        return value
    warn(
        f"{what} {key!r} is {len(value)} characters long; MLflow keeps at most {limit}, so it "
        f"is cut to {limit} (ending in {_ELLIPSIS!r}). Log long text with log_dict or "
        "log_artifact."
    )
    return value[: limit - len(_ELLIPSIS)] + _ELLIPSIS
