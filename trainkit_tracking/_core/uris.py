"""Whether a tracking URI is one MLflow can open, checked before MLflow is asked.

MLflow's own words for a mistyped URI mislead: ``htp://host`` says "Model registry
functionality is unavailable", ``127.0.0.1:5000`` talks of a "filesystem tracking backend
... maintenance mode". Here a URI with an unknown scheme, or without one, gets an error
that names the forms that work (and the closest one).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._core.suggest import did_you_mean
from trainkit_tracking.errors import TrackingError

# The schemes MLflow opens without plugins (mlflow/tracking/_tracking_service/utils.py),
# with azureml (registered by azureml-mlflow). SQL schemes may carry a driver: mysql+pymysql.
SQL_SCHEMES = ("sqlite", "postgresql", "mysql", "mssql")
KNOWN_SCHEMES = (
    "http",
    "https",
    *SQL_SCHEMES,
    "file",
    "azureml",
    "databricks",
    "databricks-uc",
    "uc",
)
FILE_STORE_VAR = "MLFLOW_ALLOW_FILE_STORE"  # MLflow 3 refuses its file store without it

FORMS = (
    "http://HOST:PORT (an `mlflow server`), sqlite:////abs/path/mlflow.db, "
    "postgresql://HOST:PORT/DB (or mysql://, mssql://), azureml://... (pip install "
    '"trainkit-tracking[azure]"), databricks, file:///abs/path (MLflow\'s file store, '
    f"with {FILE_STORE_VAR}=true), or no URI for the embedded local store"
)
_SCHEME_RE = re.compile(r"^(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*):")
_HOST_PORT_RE = re.compile(
    r"^(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:]+\]):(?P<port>\d{1,5})(?:/.*)?$"
)
_TRUE = ("1", "true", "yes")


def scheme_of(uri: str) -> str | None:
    """The URI's scheme, lower-case; None for a plain path (a Windows drive letter too)."""
    match = _SCHEME_RE.match(uri)
    if match is None or len(match["scheme"]) == 1:
        return None
    return match["scheme"].lower()


def check_tracking_uri(
    uri: str,
    source: str,
    environ: Mapping[str, str],
    plugin_schemes: Callable[[], Iterable[str]] = tuple,
) -> None:
    """Raise TrackingError, naming the forms that work, unless MLflow can open ``uri``.

    ``source`` says where the URI came from (``MLFLOW_TRACKING_URI``; '' for an argument);
    ``plugin_schemes()`` gives the schemes installed MLflow plugins register (asked only
    for a scheme MLflow does not know itself).
    """
    shown = redact_value(uri)
    where = f"the tracking URI {shown!r}" + (f" (from {source})" if source else "")
    host_port = _HOST_PORT_RE.match(uri)
    if host_port is not None:
        # 'localhost:5000' parses as scheme 'localhost': a host and port, not a scheme.
        raise TrackingError(
            f"{where} has no scheme: did you mean 'http://{uri}'? Tracking URIs: {FORMS}"
        )
    scheme = scheme_of(uri)
    if scheme is None:
        if _allowed_file_store(environ):
            return
        raise TrackingError(
            f"{where} has no scheme, so MLflow would read it as a folder of its file store, "
            f"which MLflow 3 refuses unless {FILE_STORE_VAR}=true; tracking URIs: {FORMS}"
        )
    base = scheme.split("+", 1)[0]
    plugins = () if base in KNOWN_SCHEMES else tuple(plugin_schemes())
    if base in KNOWN_SCHEMES or scheme in plugins:
        if base == "file" and not _allowed_file_store(environ):
            raise TrackingError(
                f"{where} is MLflow's file store, which MLflow 3 refuses unless "
                f"{FILE_STORE_VAR}=true: set it, or use sqlite:////absolute/path/mlflow.db "
                "(faster, and what the SDK uses locally)"
            )
        return
    hint = did_you_mean(base, [*KNOWN_SCHEMES, *plugins], n=2)
    raise TrackingError(
        f"{where} has the unknown scheme {scheme + ':'!r}"
        + (f" ({hint})" if hint else "")
        + f"; tracking URIs: {FORMS}"
    )


def _allowed_file_store(environ: Mapping[str, str]) -> bool:
    return environ.get(FILE_STORE_VAR, "").strip().lower() in _TRUE
