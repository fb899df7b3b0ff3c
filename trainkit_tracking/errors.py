"""The error tree of trainkit_tracking and its warning class."""

from __future__ import annotations


class TrackingError(Exception):
    """Base class of every error raised by trainkit_tracking."""


class PolicyError(TrackingError, ValueError):
    """A naming policy or a rendered run name is invalid."""


class TagKeyError(TrackingError, KeyError):
    """A logical tag name is not in the tag-key registry, or a tag key is invalid."""

    def __str__(self) -> str:
        # KeyError quotes its message; a plain sentence reads better.
        return str(self.args[0]) if self.args else ""


class ParamConflictError(TrackingError, ValueError):
    """A param was logged again with a different value."""


class TrackingWarning(UserWarning):
    """Warnings of trainkit_tracking: cut values, fallbacks, spooled data."""
