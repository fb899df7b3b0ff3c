"""Starting the sender of a store: the training process's side of it.

``Link.ensure()`` starts ``python -m trainkit_tracking._journal.sender`` when nobody holds
the store's sender lock (or, with ``TRAINKIT_SENDER=thread`` or when no process can be
started, a sender thread here: it takes the same lock, so that two senders never send one
store). ``Link.wake()`` tells the sender a file has new entries. ``senders()`` lists the
running ones for ``doctor``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from pathlib import Path
from typing import Any

from trainkit_tracking._core.redact import get_logger, warn
from trainkit_tracking._journal.sender import Sender
from trainkit_tracking._journal.sender_lock import hold_lock, read_status, sender_running
from trainkit_tracking._journal.spool import uri_id
from trainkit_tracking._journal.wake import Waker

log = get_logger(__name__)

_PACKAGE_PARENT = str(Path(__file__).resolve().parents[2])


def senders(spool_dir: Path) -> list[dict[str, Any]]:
    """The senders running for ``spool_dir``: their last status (pid, uri, down...)."""
    found = []
    try:
        names = sorted(os.listdir(spool_dir))
    except OSError:
        return []
    for name in names:
        if name.startswith("sender-") and name.endswith(".lock"):
            uid = name[len("sender-") : -len(".lock")]
            if sender_running(spool_dir, uid):
                found.append({"uid": uid, **read_status(spool_dir, uid)})
    return found


class Link:
    """A training process's side of the sender of one store and spool directory."""

    def __init__(
        self, spool_dir: Path, tracking_uri: str, *, timeout: float, linger: float, mode: str
    ) -> None:
        self.spool_dir = spool_dir
        self.uri = tracking_uri
        self.uid = uri_id(tracking_uri)
        self.timeout = timeout
        self.linger = linger
        self.mode = mode
        self.lock = threading.Lock()
        self.checked = 0.0
        self.spawned: float | None = None  # a process started and not seen running yet
        self.failures = 0
        self.thread: Sender | None = None
        self._port: tuple[float, int] = (0.0, 0)

    def ensure(self, *, now: float | None = None) -> None:
        """Make sure a sender runs for the store (checked at most once a second)."""
        now = time.monotonic() if now is None else now
        with self.lock:
            if now - self.checked < 1.0:
                return
            self.checked = now
            if self.thread is not None and not self.thread.stopped:
                return
            if sender_running(self.spool_dir, self.uid):
                self.spawned, self.failures = None, 0
                return
            if self.mode == "thread":
                self._start_thread()
                return
            if self.spawned is not None:
                if now - self.spawned < 10.0:
                    return  # still starting (importing mlflow takes seconds)
                self.failures += 1
            if self.failures >= 2:
                warn(
                    "trainkit-tracking could not start its sender process (see "
                    f"{self.spool_dir / f'sender-{self.uid}.log'}); this process sends "
                    "its store's data itself, in a background thread"
                )
                self.mode = "thread"
                self._start_thread()
            else:
                self._spawn(now)

    def _start_thread(self) -> None:
        fd = None
        for _ in range(20):  # someone may be testing the lock for a moment
            fd = hold_lock(self.spool_dir, self.uid)
            if fd is not None:
                break
            time.sleep(0.005)
        if fd is None:
            return  # another sender has the store: it sends our files too
        try:
            sender = Sender(
                self.spool_dir, self.uri, timeout=self.timeout, mode="thread", lock_fd=fd
            )
        except BaseException:
            os.close(fd)
            raise
        self.thread = sender
        self._port = (time.monotonic(), sender.waker.port)
        # The sender releases the lock when it ends.
        threading.Thread(target=sender.run, name="trainkit-sender", daemon=True).start()

    def _spawn(self, now: float) -> None:
        import subprocess

        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p
        )
        # The sender has its own backoff: MLflow's HTTP retries would only hide, for minutes,
        # whether the store is down or refusing one request.
        env["MLFLOW_HTTP_REQUEST_MAX_RETRIES"] = "0"
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            kwargs["creationflags"] = 0x00000200 | 0x08000000  # new group, no window
        else:
            kwargs["start_new_session"] = True  # not in the terminal's Ctrl-C group
        logfile = self.spool_dir / f"sender-{self.uid}.log"
        try:
            if logfile.exists() and logfile.stat().st_size > 1 << 20:
                logfile.unlink()
            fd = os.open(logfile, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            with os.fdopen(fd, "ab") as err:
                command = [sys.executable, "-m", "trainkit_tracking._journal.sender"]
                command += [str(self.spool_dir), str(self.timeout), str(self.linger)]
                proc = subprocess.Popen(
                    command,
                    stdin=subprocess.PIPE,
                    stdout=subprocess.DEVNULL,
                    stderr=err,
                    env=env,
                    close_fds=True,
                    **kwargs,
                )
            assert proc.stdin is not None
            proc.stdin.write((self.uri + "\n").encode("utf-8"))  # never on the command line
            proc.stdin.close()
        except (OSError, ValueError) as exc:
            log.debug("could not start the sender process: %s", exc)
            self.failures += 1
            self.checked = 0.0
            return
        # Reaped by a daemon thread as soon as it ends: it outlives most of our checks.
        threading.Thread(target=proc.wait, name="trainkit-sender-reaper", daemon=True).start()
        self.spawned = now

    def port(self) -> int:
        """Where the sender listens for wake-ups (read from its status, at most twice a second)."""
        if self.thread is not None and not self.thread.stopped:
            return self.thread.waker.port
        at, port = self._port
        if time.monotonic() - at > 0.5:
            value = read_status(self.spool_dir, self.uid).get("port")
            port = value if isinstance(value, int) else 0
            self._port = (time.monotonic(), port)
        return port

    def wake(self, waker: Waker, file_name: str) -> None:
        """Tell the sender ``file_name`` has new entries; its marks come to ``waker``."""
        waker.send(self.port(), f"w {file_name} {waker.port}")

    def status(self) -> dict[str, Any]:
        """The sender's last status (``down``: the store does not answer)."""
        if self.thread is not None and not self.thread.stopped:
            return {"down": self.thread.down}
        return read_status(self.spool_dir, self.uid)

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
