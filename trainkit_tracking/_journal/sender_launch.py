"""Starting a sender: the training process's side of the one sender of a store.

``Link.ensure()`` starts ``python -m trainkit_tracking._journal.sender`` when no sender holds the
store's lock (or a thread, with ``TRAINKIT_SENDER=thread``); ``senders()`` lists the
running ones for ``doctor``.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from trainkit_tracking._core.redact import get_logger, warn
from trainkit_tracking._journal.sender import SpoolSender
from trainkit_tracking._journal.sender_lock import read_status, sender_running
from trainkit_tracking._journal.spool import uri_id

log = get_logger(__name__)


def senders(spool_dir: Path) -> list[dict[str, Any]]:
    """The sender processes running for ``spool_dir``: their last status (pid, uri, down)."""
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
    """A training process's side of the sender of one store and spool directory.

    ``ensure()`` starts a sender when none holds the lock: a process of its own (the
    default), else (``TRAINKIT_SENDER=thread``, or when no process could be started) a
    thread of this process.
    """

    def __init__(
        self,
        spool_dir: Path,
        tracking_uri: str,
        *,
        timeout: float,
        linger: float,
        mode: str,
        own_paths: Callable[[], set[Path]],
    ) -> None:
        self.own_paths = own_paths
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
        self.procs: list[Any] = []  # subprocess.Popen handles, polled so none is a zombie
        self.thread: SpoolSender | None = None
        self._status: tuple[float, dict[str, Any]] = (0.0, {})

    def ensure(self, *, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        with self.lock:
            if now - self.checked < 1.0:
                return
            self.checked = now
            self.procs = [p for p in self.procs if p.poll() is None]
            if self.thread is not None and not self.thread._stop.is_set():
                return
            if self.mode == "thread":
                self._start_thread()
                return
            if sender_running(self.spool_dir, self.uid):
                self.spawned, self.failures = None, 0
                return
            if self.spawned is not None:
                if now - self.spawned < 5.0:
                    return  # still starting
                self.failures += 1
            if self.failures >= 2:
                warn(
                    "trainkit-tracking could not start its sender process (see "
                    f"{self.spool_dir / f'sender-{self.uid}.log'}); this process sends "
                    "its runs' data itself, in a background thread"
                )
                self.mode = "thread"
                self._start_thread()
            else:
                self._spawn(now)

    def _start_thread(self) -> None:
        sender = SpoolSender(
            self.spool_dir,
            self.uri,
            timeout=self.timeout,
            standalone=False,
            own_paths=self.own_paths,
        )
        self.thread = sender
        threading.Thread(target=sender.run, name="trainkit-sender", daemon=True).start()

    def _spawn(self, now: float) -> None:
        import subprocess

        env = dict(os.environ)
        here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, env.get("PYTHONPATH")) if p)
        kwargs: dict[str, Any] = {}
        if sys.platform == "win32":  # pragma: no cover - exercised on Windows only
            kwargs["creationflags"] = 0x00000200 | 0x08000000  # new group, no window
        else:
            kwargs["start_new_session"] = True  # not in the terminal's Ctrl-C group
        logfile = self.spool_dir / f"sender-{self.uid}.log"
        try:
            if logfile.exists() and logfile.stat().st_size > 1 << 20:
                logfile.unlink()
            with open(logfile, "ab") as err:
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
        self.procs.append(proc)
        self.spawned = now

    def status(self) -> dict[str, Any]:
        """The sender's last status (``down``: the store does not answer), read at most
        twice a second."""
        if self.thread is not None:
            return {"down": self.thread.down_since is not None}
        at, status = self._status
        if time.monotonic() - at > 0.5:
            status = read_status(self.spool_dir, self.uid)
            self._status = (time.monotonic(), status)
        return status

    def stop(self) -> None:
        if self.thread is not None:
            self.thread.stop()
