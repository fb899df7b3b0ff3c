"""Store calls for push on two daemon lanes: bounded waits, and histories read ahead.

The waits are ``_timeout``'s (``Pending.wait``, as under ``Store._call``); a lane only
replaces its thread per call by one long-lived thread per push, which keeps the calls in
order and reads the next metric history while the batches before it are sent.
"""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

from trainkit_tracking._process.bounded import Pending, bounded

T = TypeVar("T")


class Lane:
    """One daemon thread that runs store calls in order, so that the caller's wait is
    bounded (MLflow's HTTP client retries for minutes) without a thread per call; a
    daemon, so that a call that never returns cannot hold up interpreter exit."""

    def __init__(self, name: str) -> None:
        self.queue: queue.SimpleQueue[Pending[Any] | None] = queue.SimpleQueue()
        self.thread = threading.Thread(target=self._work, name=name, daemon=True)
        self.thread.start()

    def _work(self) -> None:
        while (item := self.queue.get()) is not None:
            item.run()

    def submit(self, call: Callable[[], T]) -> Pending[T]:
        pending = Pending(call)
        self.queue.put(pending)
        return pending

    def close(self) -> None:
        self.queue.put(None)


@dataclass
class Lanes:
    calls: Lane  # every call the push waits for
    reads: Lane  # metric histories read ahead while the batches before them are sent

    def close(self) -> None:
        self.calls.close()
        self.reads.close()


_CURRENT: contextvars.ContextVar[Lanes | None] = contextvars.ContextVar(
    "trainkit_push_lanes", default=None
)


@contextlib.contextmanager
def lanes() -> Iterator[Lanes]:
    lanes = Lanes(Lane("trainkit-push"), Lane("trainkit-push-reads"))
    token = _CURRENT.set(lanes)
    try:
        yield lanes
    finally:
        _CURRENT.reset(token)
        lanes.close()


def call(call: Callable[[], T], timeout: float, what: str) -> T:
    lanes = _CURRENT.get()
    if lanes is None:
        return bounded(call, timeout=timeout, what=what)
    return lanes.calls.submit(call).wait(timeout, what)


def read_ahead(call: Callable[[], T]) -> Pending[T]:
    lanes = _CURRENT.get()
    if lanes is None:
        pending = Pending(call)
        try:  # in this thread: an interrupt is not kept for later, as a lane would
            pending.result.append(call())
        except Exception as exc:
            pending.error.append(exc)
        pending.done.set()
        return pending
    return lanes.reads.submit(call)
