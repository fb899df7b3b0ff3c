"""What a spool record holds and how one is sent: batches within MLflow's per-request
limits, artifact checksums, and sending one record (halving a refused batch)."""

from __future__ import annotations

import contextlib
import hashlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from trainkit_tracking._core.limits import (
    MAX_BATCH_BYTES,
    MAX_ITEMS,
    MAX_METRICS,
    MAX_PARAMS,
    MAX_TAGS,
)
from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._store.store import Store, is_transient

Record = dict[str, Any]
Point = tuple[str, float, int, int]


# Batching ----------------------------------------------------------------------


def make_batches(
    points: Sequence[Point], params: Mapping[str, str], tags: Mapping[str, str]
) -> list[Record]:
    """Split data into log-batch records within MLflow's per-request limits (``n`` unset)."""
    if not params and not tags:  # points only: 1000 points with keys <= 250 chars fit
        return [
            {"t": "b", "m": points[i : i + MAX_METRICS]} for i in range(0, len(points), MAX_METRICS)
        ]
    batcher = _Batcher()
    for key, value in params.items():
        batcher.add("p", MAX_PARAMS, key, value)
    for key, value in tags.items():
        batcher.add("g", MAX_TAGS, key, value)
    for point in points:
        batcher.add_point(point)
    batcher.close()
    return batcher.batches


class _Batcher:
    def __init__(self) -> None:
        self.batches: list[Record] = []
        self.m: list[Point] = []
        self.kv: dict[str, dict[str, str]] = {"p": {}, "g": {}}
        self.size = 0

    def _make_room(self, count: int, limit: int, cost: int) -> None:
        items = len(self.m) + len(self.kv["p"]) + len(self.kv["g"])
        if count >= limit or items >= MAX_ITEMS or self.size + cost > MAX_BATCH_BYTES:
            self.close()

    def add(self, kind: str, limit: int, key: str, value: str) -> None:
        # Non-ASCII text may be sent as \uXXXX escapes: count it at the worst case.
        cost = len(key) + len(value) * (1 if value.isascii() else 6) + 40
        self._make_room(len(self.kv[kind]), limit, cost)
        self.kv[kind][key] = value
        self.size += cost

    def add_point(self, point: Point) -> None:
        cost = len(point[0]) + 80
        self._make_room(len(self.m), MAX_METRICS, cost)
        self.m.append(point)
        self.size += cost

    def close(self) -> None:
        if self.m or self.kv["p"] or self.kv["g"]:
            record: Record = {"t": "b"}
            if self.m:
                record["m"] = self.m
            for kind in ("p", "g"):
                if self.kv[kind]:
                    record[kind] = self.kv[kind]
            self.batches.append(record)
        self.m, self.kv, self.size = [], {"p": {}, "g": {}}, 0


# Artifacts ---------------------------------------------------------------------


def checksum(path: Path) -> str:
    """SHA-256 of a file, or of a directory tree (relative paths and file digests)."""
    if path.is_dir():
        tree = hashlib.sha256()
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            rel = file.relative_to(path).as_posix()
            tree.update(f"{rel}\0{checksum(file)}\n".encode())
        return tree.hexdigest()
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def remove_blob(src: str) -> None:
    """Delete a file the SDK wrote itself (``log_dict``) and its private directory."""
    path = Path(src)
    with contextlib.suppress(OSError):
        path.unlink()
    with contextlib.suppress(OSError):
        path.parent.rmdir()


# Sending -----------------------------------------------------------------------


def send_record(
    store: Store, run_id: str, record: Record, *, skip_tags: frozenset[str] = frozenset()
) -> list[str]:
    """Send one spooled record; returns what the store refused for good (empty: all stored).

    Raises what the store raised when it is transient (retry later). Safe to repeat.
    ``skip_tags``: tags a later record sets again (a re-sent one must not revert them).
    """
    kind = record["t"]
    if kind == "b":
        items: list[tuple[str, Any]] = [("m", tuple(p)) for p in record.get("m", ())]
        items += [("p", kv) for kv in (record.get("p") or {}).items()]
        items += [("g", kv) for kv in (record.get("g") or {}).items() if kv[0] not in skip_tags]
        return _send_items(store, run_id, items) if items else []
    if kind == "a":
        if record.get("dir"):
            store.log_artifacts(run_id, record["src"], record.get("dst"))
        else:
            store.log_artifact(run_id, record["src"], record.get("dst"))
        if record.get("tmp"):
            remove_blob(record["src"])
    elif kind == "e":
        store.terminate(run_id, record["status"], record.get("end"))
    else:
        raise ValueError(f"unknown spool record type {kind!r}")
    return []


def _send_items(store: Store, run_id: str, items: list[tuple[str, Any]]) -> list[str]:
    """Send items in one batch; on a permanent refusal, halve until the bad items are found.

    One bad value (a conflicting param, a key the server refuses) costs only itself:
    ~2 log2(n) extra requests per bad item, and nothing when all is well.
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
        if is_transient(exc) or _about_the_run(exc):
            raise  # the whole record waits (for the store, or for the run to be restored)
        if len(items) == 1:
            kind, item = items[0]
            what = {"m": "metric", "p": "param", "g": "tag"}[kind]
            return [f"{what} {item[0]!r} ({_reason(exc)})"]
    middle = len(items) // 2
    return _send_items(store, run_id, items[:middle]) + _send_items(store, run_id, items[middle:])


def _about_the_run(exc: BaseException) -> bool:
    """Whether ``exc`` refuses the run itself (deleted, missing), not one of the items."""
    text = str(exc)
    return (
        getattr(exc, "error_code", None) == "RESOURCE_DOES_NOT_EXIST"
        or "'active' state" in text
        or "not found" in text.lower()
    )


def _reason(exc: BaseException) -> str:
    text = " ".join(redact_value(str(exc)).split())
    return text if len(text) <= 300 else text[:297] + "..."
