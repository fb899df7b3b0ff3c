"""What a store's error means: the network or server did not answer (``is_network_error``),
this machine failed a file (``is_local_file_error``), or retrying the same call may succeed
(``is_transient``). The door retries by the last; the journal classifies by all three."""

from __future__ import annotations

import errno
import socket

from trainkit_tracking.errors import StoreUnavailableError

_TRANSIENT_CODES = frozenset(
    {"TEMPORARILY_UNAVAILABLE", "REQUEST_LIMIT_EXCEEDED", "DEADLINE_EXCEEDED"}
)
_TRANSIENT_TEXT = (
    "database is locked",
    "connection",
    "timed out",
    "timeout",
    "temporarily",
    "max retries",
    "too many requests",
    "service unavailable",
    "bad gateway",
    "502 error responses",
    "503 error responses",
    "504 error responses",
    "429 error responses",
    "unable to open database",
    "disk i/o error",
)
# Azure's SDK errors that mean "the network or service did not answer" (azure.core.exceptions).
_AZURE_TRANSIENT = frozenset(
    {"ServiceRequestError", "ServiceResponseError", "ServiceRequestTimeoutError"}
)


def error_code(exc: BaseException) -> str | None:
    """The MLflow error code of ``exc`` (e.g. ``RESOURCE_ALREADY_EXISTS``), if it has one."""
    code = getattr(exc, "error_code", None)
    return code if isinstance(code, str) else None


# errno values of a network that is down or refusing: anything else an OSError carries
# (ENOENT, EACCES, EISDIR, EEXIST, ENOSPC...) is this machine failing one file.
_NETWORK_ERRNOS = frozenset(
    getattr(errno, name)
    for name in (
        "ECONNREFUSED",
        "ECONNRESET",
        "ECONNABORTED",
        "EHOSTUNREACH",
        "ENETUNREACH",
        "ENETDOWN",
        "ETIMEDOUT",
        "EPIPE",
        "EADDRNOTAVAIL",
    )
    if hasattr(errno, name)
)
_NETWORK_MODULES = ("requests.", "urllib3.", "http.client", "ssl", "socket")


def is_network_error(exc: BaseException) -> bool:
    """Whether ``exc`` says the network or the server did not answer (not what it answered)."""
    if isinstance(exc, (ConnectionError, TimeoutError, socket.gaierror, socket.herror)):
        return True
    if isinstance(exc, OSError) and exc.errno in _NETWORK_ERRNOS:
        return True
    return any(
        cls.__module__.startswith(_NETWORK_MODULES) and cls.__name__ != "HTTPError"
        for cls in type(exc).__mro__
        if cls not in (OSError, Exception, BaseException, object)
    )


def is_local_file_error(exc: BaseException) -> bool:
    """Whether ``exc`` is this machine failing a file (missing, unreadable, a name clash)."""
    return isinstance(exc, OSError) and not is_network_error(exc)


def is_transient(exc: BaseException) -> bool:
    """Whether retrying the call that raised ``exc`` may succeed (store busy, down or slow).

    Everything else is a permanent refusal (a bad or conflicting value, a missing run, a
    value the database cannot encode, a local file that is missing): retrying it would
    only delay the error.
    """
    if isinstance(exc, StoreUnavailableError):
        return True
    if isinstance(exc, (UnicodeError, ValueError, TypeError)) and error_code(exc) is None:
        return False
    if is_network_error(exc):
        return True
    if isinstance(exc, OSError):
        return False  # a local file error: another try finds the same file
    if {cls.__name__ for cls in type(exc).__mro__} & _AZURE_TRANSIENT:
        return True
    code = error_code(exc)
    if code in _TRANSIENT_CODES:
        return True
    if code is not None and code != "INTERNAL_ERROR":
        return False
    text = str(exc).lower()
    if "500 error responses" in text:
        # The server failed on this very request every time it was asked (MLflow's own
        # retries): it answers, so retrying the same request will not help.
        return False
    # INTERNAL_ERROR (or no code): a database that is locked or gone is worth a retry; a
    # value it cannot encode ("surrogates not allowed", a NUL on PostgreSQL) is not.
    return any(fragment in text for fragment in _TRANSIENT_TEXT)


def is_already_exists(exc: BaseException) -> bool:
    return error_code(exc) == "RESOURCE_ALREADY_EXISTS" or "already exists" in str(exc)
