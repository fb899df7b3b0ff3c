"""Sending one journal entry to its store, and what a failure means, by its origin.

- **The store unreachable** (no answer, a refused connection, a busy or restarting
  database): ``StoreDown`` is raised. The entry, and every later entry of that store,
  waits with backoff.
- **The store refusing the entry** (a value it cannot take, a run it deleted): the entry
  (in a batch, only the items it refuses, found by halving) is set aside.
- **This machine failing the entry** (its captured file gone or unreadable, a name clash
  in a local artifact tree): the entry is set aside.

An error that does not say which (the server failed on the request, HTTP 500) is
settled by asking the store something else: when it answers, the entry is what it
refuses.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._journal.ledger import Origin, Record
from trainkit_tracking._store.bounded_client import error_code, is_local_file_error, is_transient
from trainkit_tracking._store.store import Store


class StoreDown(Exception):
    """The store could not be reached for an entry: it waits, with everything after it."""


@dataclass(frozen=True)
class Aside:
    """An entry, or an item of one, set aside: what, why, and the record to try again."""

    what: str
    origin: Origin
    why: str
    record: Record


@dataclass(frozen=True)
class Outcome:
    """A delivered entry: stored, except what is ``aside`` (everything, with ``whole``)."""

    aside: tuple[Aside, ...] = ()
    whole: bool = False


STORED = Outcome()
_CODES_THAT_REFUSE_THE_RUN = frozenset({"RESOURCE_DOES_NOT_EXIST", "INVALID_STATE"})


def describe(record: Record) -> str:
    """How an entry is named in warnings and in ``doctor``."""
    kind = record.get("t")
    if kind == "a":
        name = record.get("name") or os.path.basename(str(record.get("src", "")))
        where = record.get("dst")
        return f"artifact {name!r}" + (f" (in {where!r})" if where else "")
    if kind == "e":
        return f"the end ({record.get('status')})"
    if kind == "b":
        sizes = [
            f"{len(record.get(k) or ())} {word}"
            for k, word in (("m", "points"), ("p", "params"), ("g", "tags"))
            if record.get(k)
        ]
        return "a batch of " + ", ".join(sizes) if sizes else "an empty batch"
    return "a record"


def reason(exc: BaseException) -> str:
    text = " ".join(redact_value(f"{type(exc).__name__}: {exc}").split())
    return text if len(text) <= 300 else text[:297] + "..."


def remove_blob(src: str) -> None:
    """Delete what the journal captured at the call (a file or a tree) once it is stored."""
    path = Path(src)
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(OSError):
            path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()  # the capture's private directory


class _Asker:
    """Settles errors that do not say whose fault they are, asking the store once."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.answers: bool | None = None

    def origin(self, exc: BaseException, *, artifact: bool) -> Origin:
        """The origin of ``exc``; raises ``StoreDown`` when the store is unreachable."""
        if is_transient(exc):
            raise StoreDown(reason(exc)) from exc
        if artifact and is_local_file_error(exc):
            return Origin.LOCAL
        code = error_code(exc)
        if code is not None and code != "INTERNAL_ERROR":
            return Origin.STORE  # MLflow says what it refuses
        if isinstance(exc, (ValueError, TypeError, UnicodeError)) and code is None:
            return Origin.STORE  # a value the client cannot even encode
        if self.answers is None:
            try:
                self.store.ping()
                self.answers = True
            except Exception:
                self.answers = False
        if not self.answers:
            raise StoreDown(reason(exc)) from exc
        return Origin.STORE


def deliver(
    store: Store, run_id: str, record: Record, *, skip_tags: frozenset[str] = frozenset()
) -> Outcome:
    """Send one entry; raises ``StoreDown`` when the store cannot be reached (try later).

    Safe to repeat: a point, a param or a tag sent again is stored once. ``skip_tags``:
    tags a later entry sets again (an entry sent late must not revert them).
    """
    asker = _Asker(store)
    kind = record.get("t")
    if kind == "b":
        items: list[tuple[str, Any]] = [("m", tuple(p)) for p in record.get("m", ())]
        items += [("p", kv) for kv in (record.get("p") or {}).items()]
        items += [("g", kv) for kv in (record.get("g") or {}).items() if kv[0] not in skip_tags]
        if not items:
            return STORED
        aside = _send_items(store, run_id, items, asker)
        refused = sum(count for _, count in aside)
        return Outcome(tuple(a for a, _ in aside), whole=refused == len(items))
    try:
        if kind == "a":
            _upload(store, run_id, record)
        elif kind == "e":
            store.terminate(run_id, str(record["status"]), record.get("end"))
        else:
            raise ValueError(f"unknown journal record type {kind!r}")
    except StoreDown:
        raise
    except Exception as exc:
        origin = asker.origin(exc, artifact=kind == "a")
        return Outcome((Aside(describe(record), origin, reason(exc), record),), whole=True)
    if kind == "a" and record.get("tmp"):
        remove_blob(str(record["src"]))
    return STORED


def _upload(store: Store, run_id: str, record: Record) -> None:
    src = str(record["src"])
    if not os.path.exists(src):
        raise FileNotFoundError(f"{src!r} no longer exists")
    if record.get("dir"):
        store.log_artifacts(run_id, src, record.get("dst"))
    else:
        store.log_artifact(run_id, src, record.get("dst"))


def _send_items(
    store: Store, run_id: str, items: list[tuple[str, Any]], asker: _Asker
) -> list[tuple[Aside, int]]:
    """Send items in one batch; on a refusal, halve until the refused items are found.

    One bad value (a conflicting param, a value the database cannot store) costs only
    itself: ~2 log2(n) extra requests per bad item, and nothing when all is well.
    """
    try:
        store.log_batch(
            run_id,
            metrics=[p for k, p in items if k == "m"],
            params={kv[0]: kv[1] for k, kv in items if k == "p"},
            tags={kv[0]: kv[1] for k, kv in items if k == "g"},
        )
        return []
    except Exception as exc:
        origin = asker.origin(exc, artifact=False)  # StoreDown propagates: all waits
        if error_code(exc) in _CODES_THAT_REFUSE_THE_RUN or "'active' state" in str(exc):
            # The run itself is refused (deleted, or not in this store): every item would be.
            what = f"{_count(items)} (the run itself is refused)"
            return [(Aside(what, origin, reason(exc), _record_of(items)), len(items))]
        if len(items) == 1:
            kind, item = items[0]
            word = {"m": "metric", "p": "param", "g": "tag"}[kind]
            return [(Aside(f"{word} {item[0]!r}", origin, reason(exc), _record_of(items)), 1)]
    middle = len(items) // 2
    return _send_items(store, run_id, items[:middle], asker) + _send_items(
        store, run_id, items[middle:], asker
    )


def _record_of(items: list[tuple[str, Any]]) -> Record:
    """A batch record holding ``items``: what ``sync --retry-set-aside`` sends again."""
    record: Record = {"t": "b"}
    points = [list(p) for k, p in items if k == "m"]
    params: Mapping[str, str] = {kv[0]: kv[1] for k, kv in items if k == "p"}
    tags: Mapping[str, str] = {kv[0]: kv[1] for k, kv in items if k == "g"}
    if points:
        record["m"] = points
    if params:
        record["p"] = dict(params)
    if tags:
        record["g"] = dict(tags)
    return record


def _count(items: list[tuple[str, Any]]) -> str:
    return describe(_record_of(items)).removeprefix("a batch of ")
