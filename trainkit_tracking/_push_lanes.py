"""Store calls for push on daemon threads: bounded waits, and histories read ahead."""

from __future__ import annotations

import contextlib
import contextvars
import queue
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from trainkit_tracking._timeout import bounded

T = TypeVar("T")


class Pending(Generic[T]):
    """The result of a call handed to a lane, once it is there."""

    def __init__(self, call: Callable[[], T]) -> None:
        self.call = call
        self.done = threading.Event()
        self.result: list[T] = []
        self.error: list[BaseException] = []

    def wait(self, timeout: float, what: str) -> T:
        if not self.done.wait(max(timeout, 0.0)):
            raise TimeoutError(f"{what} did not answer within {timeout:g} s")
        if self.error:
            raise self.error[0]
        return self.result[0]


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
            try:
                item.result.append(item.call())
            except BaseException as exc:
                item.error.append(exc)
            item.done.set()

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
        try:
            pending.result.append(call())
        except Exception as exc:
            pending.error.append(exc)
        pending.done.set()
        return pending
    return lanes.reads.submit(call)
