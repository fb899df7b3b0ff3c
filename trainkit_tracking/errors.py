"""The error tree of trainkit_tracking and its warning class.

TrackingError
├── PolicyError (also a ValueError)
├── TagKeyError (also a KeyError and a ValueError)
├── ParamConflictError (also a ValueError)
└── StoreUnavailableError
TrackingWarning (a UserWarning)
"""

from __future__ import annotations


class TrackingError(Exception):
    """Base class of every error raised by trainkit_tracking."""


class PolicyError(TrackingError, ValueError):
    """A naming policy or a rendered run name is invalid."""


class TagKeyError(TrackingError, KeyError, ValueError):
    """A metric, param or tag key MLflow refuses, or a logical tag name not in the registry.

    Raised for a bad key by every API (``run.log_metrics``, ``log_params``, ``set_tags``,
    ``TagSet``, ``TagKeys``); a ``ValueError`` too, so ``except ValueError`` catches it.
    """

    def __str__(self) -> str:
        # KeyError quotes its message; a plain sentence reads better.
        return str(self.args[0]) if self.args else ""


class ParamConflictError(TrackingError, ValueError):
    """A param was logged again with a different value.

    ``key``, ``old``, ``new`` and ``run_id`` say which param of which run, and both values.
    """

    def __init__(self, message: str, *, key: str, old: str, new: str, run_id: str) -> None:
        super().__init__(message)
        self.key, self.old, self.new, self.run_id = key, old, new, run_id

    def __reduce__(self) -> tuple[object, ...]:
        # Keyword-only fields: pickle (multiprocessing) must rebuild them explicitly.
        return (_param_conflict, (str(self), self.key, self.old, self.new, self.run_id))


def _param_conflict(message: str, key: str, old: str, new: str, run_id: str) -> ParamConflictError:
    return ParamConflictError(message, key=key, old=old, new=new, run_id=run_id)


class StoreUnavailableError(TrackingError):
    """The tracking store did not answer within the Tracker's ``timeout``.

    ``uri`` (credentials masked), ``operation`` and ``waited`` (seconds) say what was tried.
    Raised only with ``fallback_to_local=False``; otherwise the run goes to the local store.
    """

    def __init__(self, message: str, *, uri: str, operation: str, waited: float) -> None:
        super().__init__(message)
        self.uri, self.operation, self.waited = uri, operation, waited

    def __reduce__(self) -> tuple[object, ...]:
        return (_unavailable, (str(self), self.uri, self.operation, self.waited))


def _unavailable(message: str, uri: str, operation: str, waited: float) -> StoreUnavailableError:
    return StoreUnavailableError(message, uri=uri, operation=operation, waited=waited)


class TrackingWarning(UserWarning):
    """Warnings of trainkit_tracking: cut values, fallbacks, spooled data."""
