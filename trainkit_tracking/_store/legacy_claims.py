"""0.1's claims: one hidden experiment per claim, named ``.trainkit-claims/<experiment
id>/<sha of the base>/<N>``, whose unique name lets exactly one creator win a number.

Kept for the transition (docs/versions.md): where 0.1 has claimed in an experiment (its
sentinel is there), 0.2 claims both ways, so processes of both releases never share a
number. The functions 0.1 used stay here unchanged: the tests and ``bench/`` run them
as the old release would.
"""

from __future__ import annotations

import atexit
import hashlib
import queue
import threading

from trainkit_tracking._core.redact import get_logger
from trainkit_tracking._store.bounded_client import is_already_exists
from trainkit_tracking._store.store import Store

log = get_logger(__name__)

CLAIM_PREFIX = ".trainkit-claims"


def claim_experiment_name(experiment_id: str, base_name: str, version: int) -> str:
    """The hidden experiment name whose creation claims ``version`` of ``base_name``."""
    digest = hashlib.sha256(base_name.encode("utf-8")).hexdigest()[:32]
    return f"{CLAIM_PREFIX}/{experiment_id}/{digest}/{version}"


def in_use(store: Store, experiment_id: str) -> bool:
    """Whether 0.1 has claimed in the experiment (its sentinel exists): one read.

    Not asked of Azure ML, which cannot read names with ``/`` back (0.1's claims never
    worked there, docs/versions.md).
    """
    if store.flavor == "azureml":
        return False
    name = f"{CLAIM_PREFIX}/{experiment_id}/sentinel"
    found = store._call(lambda: store.client.get_experiment_by_name(name), what="read claim")
    return found is not None


def try_create(store: Store, name: str) -> bool:
    """0.1's claim ``name`` for this process: True when we made it (hidden later)."""
    try:
        claim_id = store._call(lambda: store.client.create_experiment(name), what="claim")
    except Exception as exc:
        if is_already_exists(exc):
            return False
        raise
    _hide_later(store, str(claim_id))
    return True


def claim_version(store: Store, experiment_id: str, base_name: str, start: int = 1) -> int:
    """Claim the first free version >= ``start`` of ``base_name`` in the experiment.

    A claim is the creation of a hidden experiment with a name unique to
    (experiment, base name, version): experiment names are unique in every MLflow
    backend, so exactly one creator wins each version, whatever the number of
    processes or machines. The claim is then soft-deleted in the background (hidden
    from the UI; its name stays reserved). Claims are never released, so the taken
    versions form a prefix: when ``start`` is taken, reads gallop to the end of it.
    """
    version = max(1, start)
    while True:
        name = claim_experiment_name(experiment_id, base_name, version)
        try:
            claim_id = store._call(
                lambda n=name: store.client.create_experiment(n),  # type: ignore[misc]
                what="claim version",
            )
        except Exception as exc:
            if is_already_exists(exc):
                version = _first_free(store, experiment_id, base_name, version + 1)
                continue
            raise
        _hide_later(store, str(claim_id))
        return version


def try_claim(store: Store, experiment_id: str, what: str, number: int) -> bool:
    """Claim ``number`` of ``what`` in the experiment: True for exactly one caller.

    The primitive of the version claims (a hidden experiment whose name is unique),
    used for race-free get-or-create: every caller that saw the same state claims the
    same number, and only the one whose creation succeeded goes on to create.
    """
    name = claim_experiment_name(experiment_id, what, number)
    try:
        claim_id = store._call(lambda: store.client.create_experiment(name), what="claim")
    except Exception as exc:
        if is_already_exists(exc):
            return False
        raise
    _hide_later(store, str(claim_id))
    return True


def claims_intact(store: Store, experiment_id: str, version_tag: str) -> bool:
    """Whether every version claim of the experiment is still in the store.

    ``mlflow gc`` purges soft-deleted experiments, claims included. A sentinel claim,
    made before the first version of the experiment was claimed, tells: when it is
    gone but runs carry a version tag, claims were purged and the numbers of live
    runs must be checked. One read per experiment and process.
    """
    name = f"{CLAIM_PREFIX}/{experiment_id}/sentinel"
    try:
        sentinel = store._call(lambda: store.client.create_experiment(name), what="claim")
    except Exception as exc:
        if is_already_exists(exc):
            return True  # made earlier (by us or a racing process): claims intact
        raise
    _hide_later(store, str(sentinel))
    # We made the sentinel: versioned runs that already exist mean claims were purged.
    versioned = store.search(
        [experiment_id], f"tags.`{version_tag}` LIKE '%'", max_results=1, include_deleted=True
    )
    return not versioned


def _claimed(store: Store, experiment_id: str, base_name: str, version: int) -> bool:
    name = claim_experiment_name(experiment_id, base_name, version)
    found = store._call(lambda: store.client.get_experiment_by_name(name), what="read claim")
    return found is not None


def _first_free(store: Store, experiment_id: str, base_name: str, low: int) -> int:
    """The lowest version >= ``low`` not claimed yet, in O(log n) reads."""
    if not _claimed(store, experiment_id, base_name, low):
        return low
    step = 1
    taken, high = low, low + 1
    while _claimed(store, experiment_id, base_name, high):
        taken, step = high, step * 2
        high = taken + step
    while high - taken > 1:
        middle = (taken + high) // 2
        if _claimed(store, experiment_id, base_name, middle):
            taken = middle
        else:
            high = middle
    return high


def hide_claim(store: Store, claim_id: str) -> None:
    try:
        store._call(lambda: store.client.delete_experiment(claim_id), what="hide claim")
    except Exception as exc:  # a visible claim is cosmetic, never fatal
        log.debug("could not hide version claim %s: %s", claim_id, exc)


_hide_queue: queue.SimpleQueue[tuple[Store, str] | None] = queue.SimpleQueue()
_hide_thread: threading.Thread | None = None
_hide_lock = threading.Lock()


def _hide_worker() -> None:
    while (item := _hide_queue.get()) is not None:
        store, claim_id = item
        hide_claim(store, claim_id)


def _drain_hides() -> None:
    if _hide_thread is not None and _hide_thread.is_alive():
        _hide_queue.put(None)
        _hide_thread.join(timeout=5.0)


def _hide_later(store: Store, claim_id: str) -> None:
    """Soft-delete a claim off the run-creation path (a daemon thread, drained at exit)."""
    global _hide_thread
    with _hide_lock:
        if _hide_thread is None or not _hide_thread.is_alive():
            _hide_thread = threading.Thread(
                target=_hide_worker, name="trainkit-claims", daemon=True
            )
            _hide_thread.start()
            atexit.register(_drain_hides)
    _hide_queue.put((store, claim_id))
