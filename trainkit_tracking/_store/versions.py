"""Version numbers of run names (``_1``, ``_2``...): assigned once, at creation, race-free.

A version is claimed by creating a hidden experiment whose name is unique to (experiment,
base name, version): every MLflow backend keeps experiment names unique, so exactly one
creator wins each number, across processes and machines (docs/tracker.md).
"""

from __future__ import annotations

from trainkit_tracking._store import claims as _claims
from trainkit_tracking._store.store import Store


class Versions:
    """The claims of one Tracker: a hint of the next free number, and the `mlflow gc` check."""

    def __init__(self, base_name_tag: str, version_tag: str) -> None:
        self._base_name_tag = base_name_tag
        self._version_tag = version_tag
        self._next: dict[tuple[str, str, str], int] = {}  # a hint only: claims decide
        self._intact: dict[tuple[str, str], bool] = {}  # per store and experiment

    def assign(self, store: Store, experiment_id: str, base: str) -> int:
        """Claim the next version of ``base`` in the experiment."""
        key = (store.tracking_uri, experiment_id, base)
        cached = self._next.get(key)
        intact = cached is not None or self._claims_intact(store, experiment_id)  # before claiming
        version = _claims.claim_version(store, experiment_id, base, cached or 1)
        if not intact:
            # Claims alone decide, unless an admin ran `mlflow gc`, which purges
            # soft-deleted experiments, claims included. Then, the first time this
            # process names a base, check that no live run already carries the number.
            highest = self._highest(store, experiment_id, base)
            if highest >= version:
                version = _claims.claim_version(store, experiment_id, base, highest + 1)
        self._next[key] = version + 1
        return version

    def _claims_intact(self, store: Store, experiment_id: str) -> bool:
        key = (store.tracking_uri, experiment_id)
        intact = self._intact.get(key)
        if intact is None:
            intact = _claims.claims_intact(store, experiment_id, self._version_tag)
            self._intact[key] = intact
        return intact

    def _highest(self, store: Store, experiment_id: str, base: str) -> int:
        if "'" in base or "\\" in base:
            return 0  # not expressible in a filter string; claims still hold
        records = store.search([experiment_id], f"tags.`{self._base_name_tag}` = '{base}'")
        numbers = [r.tags.get(self._version_tag, "") for r in records]
        return max((int(n) for n in numbers if n.isdigit()), default=0)
