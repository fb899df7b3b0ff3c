"""Claims in the store: numbers exactly one caller wins (run-name versions, race-free
get-or-create), with one store call per claim, in every backend (docs/versions.md).

A claim is a param of a claims run: ``log_param(run, key, token)``. MLflow keeps one
value per (run, key) and refuses a second, different one, so the store itself decides
who wrote first; a refused caller reads the run back, and owns the key only if it holds
its token (a retried call whose first try committed still wins).

The claims runs of a user experiment live in one experiment per store,
``.trainkit-claims``, tagged with the user experiment's id: nothing is left in the user's
experiments, no experiment is made per claim, no name holds a ``/`` (Azure ML cannot read
those back). Normally an experiment has one claims run. Several appear when processes
make the first one at the same moment, or when a store caps params per run (Azure ML:
200) and every run is full. Exactness does not rest on there being one: a caller wins a
key only when every claims run it knows that can still take keys accepted it. Runs are
never removed by us and a full run refuses every new key, so the views of any two
callers that can win share a run, whose (run, key) row lets only one of them in.

When the claims runs of an experiment are gone (a user deleted them, ``mlflow gc``) the
new claims run is made with ``trainkit.claims_rederive=true`` if the experiment already
has versioned runs: numbers are then also checked against live runs.
"""

from __future__ import annotations

import hashlib
import secrets
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from trainkit_tracking._core.redact import get_logger
from trainkit_tracking._store import legacy_claims as _legacy
from trainkit_tracking._store.bounded_client import error_code, is_transient
from trainkit_tracking._store.store import RunRecord, Store
from trainkit_tracking.errors import TrackingError

log = get_logger(__name__)

CLAIMS_EXPERIMENT = ".trainkit-claims"
TAG_FOR = "trainkit.claims_for"  # the user experiment's id
TAG_REDERIVE = "trainkit.claims_rederive"  # made after claims were lost: check live runs
# Waiting for the process that took the right to make a claims run, before making one.
MAKER_WAIT = 5.0
MAKER_SETTLE = 0.2

WON, TAKEN, GONE, FULL = "won", "taken", "gone", "full"


def digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()[:32]


def version_prefix(base: str) -> str:
    return f"v.{digest(base)}"


def creation_key(what: str, number: int) -> str:
    return f"c.{digest(what)}.{number}"


@dataclass
class View:
    """What this process knows of one experiment's claims: the claims runs that can still
    take keys, and every key seen in any of its claims runs (with its value)."""

    open: list[str]
    keys: dict[str, str] = field(default_factory=dict)
    made: int = 0  # claims runs of the experiment found, full ones included
    rederive: bool = False
    legacy: bool = False  # 0.1's claims are in use in this experiment: claim both ways
    checked: set[str] = field(default_factory=set)  # prefixes checked against live runs


class Claims:
    """The claims of one store, per experiment, as one Tracker knows them."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.token = secrets.token_hex(8)
        self._views: dict[str, View] = {}
        self._lock = threading.RLock()
        self._container: str | None = None
        # Params a claims run holds when full: the store's known cap (Azure ML: 200), or
        # what a refusal for size showed (a service may lower its cap).
        self.full_at: int | None = store.params_per_run
        self.version_tag = "code.version"  # the Tracker's TagKeys may rename it

    # Claiming ----------------------------------------------------------------------

    def claim(self, experiment_id: str, key: str, legacy_name: str | None = None) -> bool:
        """Claim ``key`` in the experiment: True for exactly one caller, whatever the race.

        ``legacy_name``: 0.1's hidden-experiment claim of the same number, also made where
        0.1 claims are in use (the transition of docs/versions.md); taken if either is.
        """
        for _ in range(10):
            view = self.view(experiment_id)
            if key in view.keys:
                return False
            outcome = WON
            for run_id in sorted(view.open):
                outcome = self._cas(view, run_id, key)
                if outcome != WON:
                    break
            if outcome == TAKEN:
                return False
            if outcome == WON:
                if view.legacy and legacy_name is not None:
                    return _legacy.try_create(self.store, legacy_name)
                return True
            self._forget(experiment_id)  # GONE (deleted by a user) or FULL: look again
        raise TrackingError(
            f"could not claim {key!r} in experiment {experiment_id}: its claims runs in "
            f"{CLAIMS_EXPERIMENT!r} keep changing; try again"
        )

    def first_free(self, experiment_id: str, prefix: str, start: int) -> int:
        """The lowest number >= ``start`` whose ``prefix.N`` key this process has not seen."""
        keys = self.view(experiment_id).keys
        number = max(1, start)
        while f"{prefix}.{number}" in keys:
            number += 1
        return number

    def refresh(self, experiment_id: str) -> None:
        """Read the open claims runs again (after a refused claim): one call per run."""
        view = self.view(experiment_id)
        for run_id in view.open:
            record = self._read(run_id)
            if record is not None:
                view.keys.update(record.params)

    def _cas(self, view: View, run_id: str, key: str) -> str:
        try:
            self.store._call(
                lambda: self.store.client.log_param(run_id, key, self.token), what="claim"
            )
            view.keys[key] = self.token
            return WON
        except Exception as exc:
            if is_transient(exc):
                raise
            refusal = exc
        record = self._read(run_id)  # who holds it? (or: is the run gone, or full?)
        if record is None or record.deleted:
            return GONE
        value = record.params.get(key)
        view.keys.update(record.params)
        if value == self.token:
            return WON
        if value is not None:
            return TAKEN
        if _refused_for_size(refusal):
            held = len(record.params)
            self.full_at = held if self.full_at is None else min(self.full_at, held)
        if self._full(record):
            return FULL
        raise refusal  # neither taken nor full: the store refuses the claim itself

    def _read(self, run_id: str) -> RunRecord | None:
        try:
            return self.store.get_run(run_id)
        except Exception as exc:
            if error_code(exc) == "RESOURCE_DOES_NOT_EXIST" or "not found" in str(exc).lower():
                return None
            raise

    # Finding (and making) the claims runs of an experiment ------------------------

    def view(self, experiment_id: str) -> View:
        """The experiment's claims as this process knows them: one search the first time."""
        with self._lock:
            view = self._views.get(experiment_id)
            if view is None:
                view = self._views[experiment_id] = self._resolve(experiment_id, None)
            return view

    def _forget(self, experiment_id: str) -> None:
        with self._lock:
            old = self._views.pop(experiment_id, None)
            self._views[experiment_id] = self._resolve(experiment_id, old)

    def _search(self, container: str, experiment_id: str) -> list[RunRecord]:
        return self.store.search([container], f"tags.`{TAG_FOR}` = '{experiment_id}'", order_by=())

    def _resolve(self, experiment_id: str, old: View | None) -> View:
        container = self.container()
        legacy = old.legacy if old is not None else _legacy.in_use(self.store, experiment_id)
        runs = self._search(container, experiment_id)
        if not [r for r in runs if not self._full(r)]:
            runs = self._make(container, experiment_id, runs)
        view = View(
            open=[r.run_id for r in runs if not self._full(r)],
            made=len(runs),
            rederive=any(r.tags.get(TAG_REDERIVE) == "true" for r in runs),
            legacy=legacy,
        )
        for record in runs:
            view.keys.update(record.params)
        return view

    def _make(self, container: str, experiment_id: str, known: list[RunRecord]) -> list[RunRecord]:
        """Make a claims run for the experiment, unless another process is making one.

        One process per experiment (and per round, when all runs are full) takes the right
        to make it: a tag on the claims experiment, last writer wins, read back after a
        moment; the others wait for its run. Two makers are harmless, only costlier.
        """
        right = f"trainkit.maker.{experiment_id}.{len(known)}"
        try:
            self.store._call(
                lambda: self.store.client.set_experiment_tag(container, right, self.token),
                what="claims maker",
            )
        except Exception as exc:  # a racing maker inserted the tag first (sqlite's merge)
            if is_transient(exc):
                raise
            log.debug("claims maker tag not set: %s", exc)
        time.sleep(MAKER_SETTLE)  # racing makers write theirs: the last one makes the run
        experiment = self.store._call(
            lambda: self.store.client.get_experiment(container), what="claims maker"
        )
        if experiment.tags.get(right) != self.token:
            deadline = time.monotonic() + MAKER_WAIT
            while time.monotonic() < deadline:
                runs = self._search(container, experiment_id)
                if [r for r in runs if not self._full(r)]:
                    return runs
                time.sleep(0.1)
        tags = {TAG_FOR: experiment_id}
        if not known and _has_versioned_runs(self.store, experiment_id, self.version_tag):
            tags[TAG_REDERIVE] = "true"  # claims were lost: numbers are checked live too
        self.store.create_run(container, f"claims of experiment {experiment_id}", tags)
        return self._search(container, experiment_id)

    def _full(self, record: RunRecord) -> bool:
        """Whether a claims run can take no more keys (on stores that cap params per run)."""
        return self.full_at is not None and len(record.params) >= self.full_at

    def container(self) -> str:
        """The id of ``.trainkit-claims``: made once per store, restored if deleted."""
        if self._container is None:
            found = self.store.find_experiment(CLAIMS_EXPERIMENT)
            if found is not None and found.deleted:
                self.store._call(
                    lambda: self.store.client.restore_experiment(found.experiment_id),
                    what="restore the claims experiment",
                )
            self._container = (
                found.experiment_id
                if found is not None
                else self.store.get_or_create_experiment(CLAIMS_EXPERIMENT)
            )
        return self._container


def _refused_for_size(exc: BaseException) -> bool:
    """Whether the store refused a param because the run holds too many (Azure ML says
    ``A field of the entity is over the size limit. FieldName=Parameters``)."""
    text = str(exc)
    return "FieldName=Parameters" in text or "over the size limit" in text


def _has_versioned_runs(store: Store, experiment_id: str, version_tag: str) -> bool:
    found = store.search(
        [experiment_id], f"tags.`{version_tag}` LIKE '%'", max_results=1, include_deleted=True
    )
    return bool(found)


def claims_of(store: Store) -> Claims:
    """The claims of ``store`` as this Store object (one per Tracker) knows them."""
    claims = getattr(store, "_trainkit_claims", None)
    if claims is None:
        claims = Claims(store)
        store._trainkit_claims = claims  # type: ignore[attr-defined]
    assert isinstance(claims, Claims)
    return claims


def claim_version(
    store: Store,
    experiment_id: str,
    base_name: str,
    start: int = 1,
    *,
    floor: Callable[[], int] | None = None,
) -> int:
    """Claim the first free version >= ``start`` of ``base_name`` in the experiment.

    One store call when the number is free; a refused one reads the claims run again
    and tries the next free number. ``floor``: the highest version live runs carry,
    asked once per base and claims run when the claims were re-derived.
    """
    claims = claims_of(store)
    prefix = version_prefix(base_name)
    version = max(1, start)
    while True:
        view = claims.view(experiment_id)
        if view.rederive and floor is not None and prefix not in view.checked:
            version = max(version, floor() + 1)
            view.checked.add(prefix)
        version = claims.first_free(experiment_id, prefix, version)
        legacy = _legacy.claim_experiment_name(experiment_id, base_name, version)
        if claims.claim(experiment_id, f"{prefix}.{version}", legacy):
            return version
        claims.refresh(experiment_id)
        version += 1


def try_claim(store: Store, experiment_id: str, what: str, number: int) -> bool:
    """Claim ``number`` of ``what`` in the experiment: True for exactly one caller.

    Used for race-free get-or-create: every caller that saw the same state claims the
    same number, and only the one whose claim succeeded goes on to create.
    """
    legacy = _legacy.claim_experiment_name(experiment_id, what, number)
    return claims_of(store).claim(experiment_id, creation_key(what, number), legacy)
