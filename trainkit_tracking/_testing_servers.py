"""Throwaway servers for tests: free ports, a port that accepts and never answers, and an
`mlflow server` subprocess on 127.0.0.1 (public through ``trainkit_tracking.testing``)."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType

from trainkit_tracking.errors import TrackingError

logger = logging.getLogger("trainkit_tracking.testing")

# What every mlflow process started here gets: one worker and no job runner (otherwise
# `mlflow server` forks ~15 processes), and no telemetry.
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on (yet): a store that refuses connections."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def silent_server(host: str = "127.0.0.1") -> Iterator[str]:
    """The URI of a port that accepts connections and never answers a byte: the store
    that hangs, for testing that tracking calls stay bounded."""
    listener = socket.socket()
    listener.bind((host, 0))
    listener.listen(64)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        listener.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(listener.accept()[0])

    thread = threading.Thread(target=accept, name="trainkit-silent-server", daemon=True)
    thread.start()
    try:
        yield f"http://{host}:{listener.getsockname()[1]}"
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        listener.close()


def tail_of(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


class MlflowServer:
    """An `mlflow server` subprocess on 127.0.0.1 that serves artifacts from a local dir."""

    def __init__(
        self,
        backend_store_uri: str,
        artifacts_dir: str | os.PathLike[str],
        *,
        port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | os.PathLike[str] | None = None,
    ) -> None:
        self.backend_store_uri = backend_store_uri
        self.artifacts_dir = Path(artifacts_dir).resolve()
        self.host = host
        self._auto_port = port is None
        self.port: int = free_port(host) if port is None else port
        self.log_path = (
            Path(log_path) if log_path is not None else self.artifacts_dir.parent / "server.log"
        )
        self._proc: subprocess.Popen[bytes] | None = None

    @property
    def uri(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    @property
    def pid(self) -> int | None:
        """The server's process id, or None when it is not running."""
        if self._proc is None or self._proc.poll() is not None:
            return None
        return self._proc.pid

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "mlflow",
            "server",
            "--host",
            self.host,
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            self.backend_store_uri,
            "--serve-artifacts",
            "--artifacts-destination",
            str(self.artifacts_dir),
        ]

    def start(self, timeout: float = 60) -> MlflowServer:
        """Start the server and wait until GET /health answers; raise with the log tail if not."""
        if self.pid is not None:
            return self
        # Only a port we picked ourselves may be swapped when another process grabbed it.
        attempts = 3 if self._auto_port else 1
        problem = ""
        for attempt in range(attempts):
            problem = self._launch_and_wait(timeout)
            if not problem:
                logger.debug("mlflow server up at %s (pid %s)", self.uri, self.pid)
                return self
            if (
                attempt + 1 < attempts
                and "address already in use" in tail_of(self.log_path).lower()
            ):
                self.port = free_port(self.host)
                continue
            break
        tail = tail_of(self.log_path)
        self.stop()
        raise TrackingError(
            f"mlflow server for {self.backend_store_uri!r} on {self.uri} {problem}; "
            f"see {str(self.log_path)!r}, last lines:\n{tail}"
        )

    def _launch_and_wait(self, timeout: float) -> str:
        """Launch the process; return "" once healthy, else what went wrong."""
        self.artifacts_dir.mkdir(parents=True, exist_ok=True)
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        env = {**os.environ, **SERVER_ENV}
        with open(self.log_path, "ab") as log:
            log.write(f"\n--- {' '.join(self.command())}\n".encode())
            log.flush()
            # Its own session, so stop() can end the uvicorn worker with it.
            self._proc = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.artifacts_dir.parent,
                env=env,
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                return f"exited with code {code} before answering GET /health"
            if self._healthy():
                return ""
            time.sleep(0.2)
        return f"did not answer GET /health within {timeout}s"

    def _healthy(self) -> bool:
        import http.client

        # http.client, not urllib: no proxy from the environment may sit in between.
        conn = http.client.HTTPConnection(self.host, self.port, timeout=2)
        try:
            conn.request("GET", "/health")
            return conn.getresponse().status == 200
        except OSError:
            return False
        finally:
            conn.close()

    def stop(self, timeout: float = 15) -> None:
        """Terminate the server (its process group), then kill it if it does not exit."""
        proc, self._proc = self._proc, None
        if proc is None:
            return
        if not hasattr(os, "killpg"):  # Windows: no process groups to signal
            proc.terminate()
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
            return
        for sig in (signal.SIGTERM, signal.SIGKILL):
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, sig)
            try:
                proc.wait(timeout=timeout)
                break
            except subprocess.TimeoutExpired:
                continue
        # A worker can outlive a leader that exited on SIGTERM; end the rest of the group.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    def restart(self, timeout: float = 60) -> MlflowServer:
        """Stop and start again on the same port and backend store."""
        self.stop()
        self._auto_port = False
        return self.start(timeout=timeout)

    def log_tail(self, lines: int = 40) -> str:
        return tail_of(self.log_path, lines)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def __repr__(self) -> str:
        return f"MlflowServer(uri={self.uri!r}, pid={self.pid!r})"
