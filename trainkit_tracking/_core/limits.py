"""MLflow's rules for keys, values and batches (``mlflow/utils/validation.py``), in one place.

Every metric, param and tag key is checked by ``check_key`` and every value too long for
MLflow is cut by ``cut``, which warns once per cut, whichever API it came through.
"""

from __future__ import annotations

import operator
import posixpath
import re
from collections.abc import Mapping
from typing import Any

from trainkit_tracking._core.redact import warn
from trainkit_tracking.errors import TagKeyError

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
# Results per search page MLflow serves (SEARCH_MAX_RESULTS_DEFAULT).
MAX_PAGE = 1000

# Azure ML's tracking service is stricter (SPEC section 19): 250 metric values per request
# (mlflow#11462), 200 params per run (Azure/azure-sdk-for-python#35685), search pages
# under 1000 results (mlflow#10694).
AZURE_MAX_METRICS = 250
AZURE_MAX_PARAMS_PER_RUN = 200
AZURE_PAGE = 500

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


# Values ------------------------------------------------------------------------

MAX_STEP = 2**63 - 1
# Deeper nesting than this in log_params is a mistake (a cycle, a model object), not config.
MAX_PARAM_DEPTH = 64


def to_float(key: str, value: Any) -> float:
    """``float(value)`` for anything ``float()`` accepts except bools and text."""
    dtype = str(getattr(value, "dtype", ""))
    if not isinstance(value, (bool, str, bytes, bytearray)) and dtype not in ("bool", "torch.bool"):
        try:
            return float(value)
        except (TypeError, ValueError, OverflowError):
            pass
    raise TypeError(
        f"metric {key!r}: value {value!r} ({type(value).__name__}) is not a number; log an "
        "int, a float or a numpy/torch scalar (NaN and inf are fine)"
    )


def check_step(step: Any) -> int:
    """Return ``step`` as an int >= 0, else raise ValueError."""
    if not isinstance(step, bool) and hasattr(type(step), "__index__"):
        value = operator.index(step)
        if 0 <= value <= MAX_STEP:
            return value
    raise ValueError(f"step must be an int >= 0, got {step!r}")


def flatten(params: Mapping[Any, Any]) -> dict[str, Any]:
    """``{"opt": {"lr": 1}}`` -> ``{"opt.lr": 1}``; an empty nested mapping is kept as ``{}``.

    Iterative, with a depth limit: a mapping nested deeper than ``MAX_PARAM_DEPTH`` (or
    one that contains itself) is a ValueError, never a RecursionError.
    """
    flat: dict[str, Any] = {}
    stack: list[tuple[str, Mapping[Any, Any], int]] = [("", params, 1)]
    while stack:
        prefix, mapping, depth = stack.pop()
        if depth > MAX_PARAM_DEPTH:
            raise ValueError(
                f"params nested more than {MAX_PARAM_DEPTH} levels deep under {prefix[:200]!r} "
                "(a mapping that contains itself?); log a flatter dict, or the object with log_dict"
            )
        nested = []
        for key, value in mapping.items():
            name = f"{prefix}{key}"
            if isinstance(value, Mapping) and value:
                nested.append((name + ".", value, depth + 1))
            else:
                flat[name] = value
        stack.extend(reversed(nested))
    return flat


def storable(what: str, key: str, text: str) -> str:
    """``text`` as the store can keep it: lone surrogates (``os.fsdecode`` of bytes that are
    not UTF-8) would be refused by every backend, so they are escaped, with a warning."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        try:
            escaped = text.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
        except UnicodeEncodeError:
            escaped = text.encode("utf-8", "backslashreplace").decode("utf-8")
        warn(
            f"{what} {key!r}: the value is not valid text (undecodable bytes, e.g. from a file "
            f"name); it is stored as {escaped[:200]!r}"
        )
        return escaped
    return text


def artifact_dir(path: Any, what: str) -> str | None:
    if path is None:
        return None
    if not isinstance(path, str):
        raise TypeError(f"{what} must be a str or None, got {path!r}")
    parts = path.replace("\\", "/").split("/")
    if path.startswith(("/", "\\")) or ".." in parts or re.match(r"^[A-Za-z]:", path):
        raise ValueError(f"{what} {path!r} must be a relative path inside the run's artifacts")
    return path.replace("\\", "/").strip("/") or None
