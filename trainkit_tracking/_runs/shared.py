"""Runs shared by many processes: race-free get-or-create, and holders that end it last.

``start_run(spec, resume=True)`` from many processes (HPO workers on one study) gets one
run: callers that find none claim the next creation number of that identity, and only
the winner creates. Each process holding the run keeps a ``code.holder.<id>`` tag beating
with its heartbeat; ``end()`` removes it, and only a release that finds no other live
holder sets the status (docs/distributed.md).
"""

from __future__ import annotations

import itertools
import os
import re
import secrets
import socket
import time
from collections.abc import Callable

from trainkit_tracking._core.redact import get_logger
from trainkit_tracking._core.spec import RunSpec
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._process import hooks
from trainkit_tracking._store import claims as _claims
from trainkit_tracking._store.store import RunRecord, Store

log = get_logger(__name__)

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]+")
_TOKEN = f"{_UNSAFE.sub('-', socket.gethostname())[:60]}-{os.getpid()}-{secrets.token_hex(3)}"


_HOLDS = itertools.count(1)


def holder_key(keys: TagKeys) -> str:
    """A new holder tag: host, pid, a random part (unique across machines) and a number
    (two Run objects of one process that hold the same run are two holders)."""
    return f"{keys['holder_prefix']}.{_TOKEN}-{next(_HOLDS)}"


def _after_fork_in_child() -> None:
    global _TOKEN
    _TOKEN = f"{_UNSAFE.sub('-', socket.gethostname())[:60]}-{os.getpid()}-{secrets.token_hex(3)}"


hooks.on_fork(_after_fork_in_child)


def get_or_create(
    store: Store,
    spec: RunSpec,
    experiment_id: str,
    find: Callable[[], list[RunRecord]],
    create: Callable[[], RunRecord],
    *,
    timeout: float,
) -> RunRecord:
    """The unfinished run of ``spec``'s identity, created by exactly one caller when none.

    ``find`` returns the identity's runs, deleted ones included. Callers that see ``n``
    runs of the identity (none unfinished and live) claim creation ``n + 1``; the others
    wait for the winner's run to appear. Deleted runs count, so they cost nothing (their
    creators claimed their numbers). A winner that died before creating is given
    ``timeout`` seconds, then the next number is claimed.
    """
    what = f"run:{spec.run_key_hash}"
    waiting_since: float | None = None
    skip = 0
    while True:
        records = find()
        for record in records:
            if record.status != "FINISHED" and not record.deleted:
                if record.status != "RUNNING":
                    store.set_status(record.run_id, "RUNNING")
                return record
        number = len(records) + 1 + skip
        if _claims.try_claim(store, experiment_id, what, number):
            return create()
        now = time.monotonic()
        waiting_since = now if waiting_since is None else waiting_since
        if now - waiting_since > timeout:
            log.info("the creator of run %s did not create it; claiming the next one", what)
            skip, waiting_since = skip + 1, None
        time.sleep(0.05)


def take_hold(store: Store, run_id: str, keys: TagKeys) -> str:
    """Record this process as a holder of the run; returns its tag.

    A holder that released at the moment this one joined may have ended the run without
    seeing it: read back after the hold, such a run is set running again (its last
    holder ends it, after this one).
    """
    key = holder_key(keys)
    store.set_tags(run_id, {key: str(int(time.time()))})
    if store.get_run(run_id).status != "RUNNING":
        store.set_status(run_id, "RUNNING")
    return key


def released_key(key: str) -> str:
    """The tag that marks holder ``key`` released: the heartbeat never writes it, so a beat
    that was in flight while the holder released cannot bring the holder back."""
    return f"{key}{RELEASED}"


RELEASED = ".released"


def release(
    store: Store,
    run_id: str,
    key: str,
    keys: TagKeys,
    *,
    stale_after: float,
    answered_since: float = 0.0,
) -> bool:
    """Drop this process's hold: whether no other live holder is left (this one then
    ends the run with ``finish``).

    Each holder marks itself released (and deletes its tag) before it reads the others,
    so of holders releasing at the same moment at least the last to read finds none
    left. A holder counts as dead only when its heartbeat is older than ``stale_after``
    seconds of time in which the store answered: time before ``answered_since`` (when
    this process's heartbeats last came back after misses) is not counted, so an outage
    never ends a run whose holders live.
    """
    store.set_tags(run_id, {released_key(key): "true"})
    store.delete_tag(run_id, key)
    record = store.get_run(run_id)
    now = time.time()
    prefix = keys["holder_prefix"] + "."
    holders = [t for t in record.tags if t.startswith(prefix) and not t.endswith(RELEASED)]
    for tag in holders:
        if tag == key or released_key(tag) in record.tags:
            continue
        try:
            alive = now - max(float(record.tags[tag]), answered_since) < stale_after
        except ValueError:  # not ours to judge: counted as alive
            alive = True
        if alive:
            return False
    return True


def finish(store: Store, run_id: str, keys: TagKeys, status: str) -> None:
    """The last live holder ends the run (again, if a release that missed a joiner already
    did: the end is then this one's) and clears the holders' tags."""
    store.terminate(run_id, status)
    prefix = keys["holder_prefix"] + "."
    for tag in store.get_run(run_id).tags:
        if tag.startswith(prefix):
            store.delete_tag(run_id, tag)
