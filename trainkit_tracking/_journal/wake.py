"""Wake-ups between the writers of a spool dir and the sender of a store: UDP datagrams on
127.0.0.1 that say "look now".

They carry no data and decide nothing: the files and their marks are the truth, and both
sides also look on their own every few hundred milliseconds, so a lost datagram (or a
platform without them) costs latency, never data. What they buy: a ``flush()`` that
returns as soon as the store has its data, instead of after the next poll.

Messages: ``w <file> <port>`` (a writer appended to ``file``; marks of it are announced
to ``port``), ``r`` (``sync``: the store may be back, retry now), ``a <file>`` (the sender
wrote marks of ``file``).
"""

from __future__ import annotations

import contextlib
import select
import socket
import time

from trainkit_tracking._core.redact import get_logger

log = get_logger(__name__)

_HOST = "127.0.0.1"
_MAX = 4096


class Waker:
    """One UDP socket bound to 127.0.0.1: wakes others, and is woken."""

    def __init__(self) -> None:
        self.sock: socket.socket | None = None
        self.port = 0
        try:
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            sock.bind((_HOST, 0))
            sock.setblocking(False)
        except OSError as exc:  # no loopback (a sandbox): everyone polls instead
            log.debug("no wake-up socket: %s", exc)
            return
        self.sock, self.port = sock, int(sock.getsockname()[1])

    def send(self, port: int | None, message: str) -> None:
        """Wake whoever listens on ``port`` (nothing when there is no port)."""
        if self.sock is None or not port:
            return
        with contextlib.suppress(OSError):  # nobody listens any more: they poll
            self.sock.sendto(message.encode("utf-8")[:_MAX], (_HOST, int(port)))

    def wait(self, timeout: float) -> list[str]:
        """The messages received within ``timeout`` seconds (all that are waiting)."""
        if self.sock is None:
            time.sleep(max(timeout, 0.0))
            return []
        try:
            ready, _, _ = select.select([self.sock], [], [], max(timeout, 0.0))
        except (OSError, ValueError):  # closed meanwhile
            return []
        messages = []
        while ready:
            try:
                data = self.sock.recv(_MAX)
            except (BlockingIOError, OSError):
                break
            messages.append(data.decode("utf-8", "replace"))
        return messages

    def close(self) -> None:
        if self.sock is not None:
            with contextlib.suppress(OSError):
                self.sock.close()
            self.sock = None
