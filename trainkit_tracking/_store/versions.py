"""Version numbers of run names (``_1``, ``_2``...): assigned once, at creation, race-free.

A version is claimed in the store (``claims``): exactly one creator wins each number,
across processes and machines (docs/versions.md).
"""

from __future__ import annotations

from trainkit_tracking._store import claims as _claims
from trainkit_tracking._store.store import Store


class Versions:
    """The claims of one Tracker: a hint of the next free number, and the live-run check
    of claims that were re-derived (after a user or ``mlflow gc`` removed them)."""

    def __init__(self, base_name_tag: str, version_tag: str) -> None:
        self._base_name_tag = base_name_tag
        self._version_tag = version_tag
        self._next: dict[tuple[str, str, str], int] = {}  # a hint only: claims decide

    def assign(self, store: Store, experiment_id: str, base: str) -> int:
        """Claim the next version of ``base`` in the experiment."""
        key = (store.tracking_uri, experiment_id, base)
        _claims.claims_of(store).version_tag = self._version_tag
        # Claims that were lost and re-derived are checked against live runs, once per
        # base by every process (the numbers live runs carry were never claimed anew).
        version = _claims.claim_version(
            store,
            experiment_id,
            base,
            self._next.get(key, 1),
            floor=lambda: self._highest(store, experiment_id, base),
        )
        self._next[key] = version + 1
        return version

    def _highest(self, store: Store, experiment_id: str, base: str) -> int:
        if "'" in base or "\\" in base:
            return 0  # not expressible in a filter string; claims still hold
        records = store.search(
            [experiment_id], f"tags.`{self._base_name_tag}` = '{base}'", include_deleted=True
        )
        numbers = [r.tags.get(self._version_tag, "") for r in records]
        return max((int(n) for n in numbers if n.isdigit()), default=0)
