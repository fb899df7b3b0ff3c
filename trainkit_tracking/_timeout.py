"""Run a blocking call with an upper bound on how long the caller waits for it."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class Abandoned(TimeoutError):
    """The call did not return within its bound; it goes on in a daemon thread."""


def bounded(call: Callable[[], T], *, timeout: float, what: str) -> T:
    """Run ``call`` in a daemon thread; raise ``Abandoned`` when it takes longer than ``timeout``.

    MLflow's HTTP client retries for minutes when a server is down, and Azure's
    credential chain waits about a minute on a network that drops packets; the
    abandoned thread is a daemon, so it never holds up interpreter exit.
    """
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(call())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"trainkit-bounded-{what}", daemon=True)
    try:
        thread.start()
    except RuntimeError:
        # No new threads once the interpreter is shutting down: call in this thread (the
        # callers there, the background sender and the exit drain, have their own bound).
        return call()
    thread.join(max(timeout, 0.0))
    if thread.is_alive():
        raise Abandoned(f"{what} did not answer within {timeout:g} s")
    if error:
        raise error[0]
    return result[0]
