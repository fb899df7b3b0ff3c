"""Run a blocking call with an upper bound on how long the caller waits for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Abandoned(TimeoutError):
    """The call did not return within its bound; it goes on in a daemon thread."""


class Pending(Generic[T]):
    """A call run on another thread, and the bounded wait for its result."""

    def __init__(self, call: Callable[[], T]) -> None:
        self.call = call
        self.done = threading.Event()
        self.result: list[T] = []
        self.error: list[BaseException] = []

    def run(self) -> None:
        """Run the call (on whichever thread runs it) and keep its result or error."""
        try:
            self.result.append(self.call())
        except BaseException as exc:
            self.error.append(exc)
        self.done.set()

    def wait(self, timeout: float, what: str) -> T:
        """The call's result; ``Abandoned`` when it takes longer than ``timeout``."""
        if not self.done.wait(max(timeout, 0.0)):
            raise Abandoned(f"{what} did not answer within {timeout:g} s")
        if self.error:
            raise self.error[0]
        return self.result[0]


def bounded(call: Callable[[], T], *, timeout: float, what: str) -> T:
    """Run ``call`` in a daemon thread; raise ``Abandoned`` when it takes longer than ``timeout``.

    MLflow's HTTP client retries for minutes when a server is down, and Azure's
    credential chain waits about a minute on a network that drops packets; the
    abandoned thread is a daemon, so it never holds up interpreter exit.
    """
    pending = Pending(call)
    thread = threading.Thread(target=pending.run, name=f"trainkit-bounded-{what}", daemon=True)
    try:
        thread.start()
    except RuntimeError:
        # No new threads once the interpreter is shutting down: call in this thread (the
        # callers there, the background sender and the exit drain, have their own bound).
        return call()
    return pending.wait(timeout, what)
