"""What a journal entry holds: batches within MLflow's per-request limits."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from trainkit_tracking._core.limits import (
    MAX_BATCH_BYTES,
    MAX_ITEMS,
    MAX_METRICS,
    MAX_PARAMS,
    MAX_TAGS,
)

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
