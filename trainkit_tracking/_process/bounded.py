"""Run a blocking call with an upper bound on how long the caller waits for it."""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Abandoned(TimeoutError):
    """The call did not return within its bound; it goes on in a daemon thread."""


class Pending(Generic[T]):
    """A call run on another thread, and the bounded wait for its result.

    ``on_late``: called (on that thread) with the result of a call that returned after
    its caller gave up, so that what it did can be undone (an orphan run deleted).
    """

    def __init__(self, call: Callable[[], T], on_late: Callable[[T], None] | None = None) -> None:
        self.call = call
        self.on_late = on_late
        self.done = threading.Event()
        self.abandoned = False
        self.result: list[T] = []
        self.error: list[BaseException] = []
        self._lock = threading.Lock()

    def run(self) -> None:
        """Run the call (on whichever thread runs it) and keep its result or error."""
        try:
            result = self.call()
        except BaseException as exc:
            self.error.append(exc)
            self.done.set()
            return
        with self._lock:
            self.result.append(result)
            self.done.set()
            late = self.abandoned
        if late and self.on_late is not None:
            with contextlib.suppress(Exception):  # best effort: `reap` ends what it leaves
                self.on_late(result)

    def abandon(self) -> bool:
        """Give up on the call; False when it returned meanwhile (its result stands)."""
        with self._lock:
            if self.done.is_set():
                return False
            self.abandoned = True
            return True

    def wait(
        self,
        timeout: float,
        what: str,
        *,
        watch: Callable[[float], None] | None = None,
        every: float = 1.0,
    ) -> T:
        """The call's result; ``Abandoned`` when it takes longer than ``timeout``.

        ``watch(waited)``, called every ``every`` seconds while the call is out, may raise
        to give up early (a port that refuses connections).
        """
        started = time.monotonic()
        deadline = started + max(timeout, 0.0)
        while not self.done.wait(max(0.0, min(deadline - time.monotonic(), every))):
            now = time.monotonic()
            if now >= deadline:
                if self.abandon():
                    raise Abandoned(f"{what} did not answer within {timeout:g} s")
                break
            if watch is not None:
                try:
                    watch(now - started)
                except BaseException:
                    if self.abandon():
                        raise
                    break
        if self.error:
            raise self.error[0]
        return self.result[0]


def bounded(
    call: Callable[[], T],
    *,
    timeout: float,
    what: str,
    watch: Callable[[float], None] | None = None,
    on_late: Callable[[T], None] | None = None,
) -> T:
    """Run ``call`` in a daemon thread; raise ``Abandoned`` when it takes longer than ``timeout``.

    MLflow's HTTP client retries for minutes when a server is down, and Azure's
    credential chain waits about a minute on a network that drops packets; the
    abandoned thread is a daemon, so it never holds up interpreter exit.
    """
    pending = Pending(call, on_late)
    thread = threading.Thread(target=pending.run, name=f"trainkit-bounded-{what}", daemon=True)
    try:
        thread.start()
    except RuntimeError:
        # No new threads once the interpreter is shutting down: call in this thread (the
        # callers there, the background sender and the exit drain, have their own bound).
        return call()
    return pending.wait(timeout, what, watch=watch)
