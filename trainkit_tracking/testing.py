"""Pytest plugin with isolated MLflow stores and servers for tests of code that tracks runs.

Loaded in every pytest session of anyone who installs the package (entry point pytest11),
so it holds only what a consumer's tests use (this repo's own test machinery is in tests/)
and importing it stays cheap: mlflow, sqlite3 and http.client are imported inside functions.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

import pytest

from trainkit_tracking import _env
from trainkit_tracking.errors import TrackingError

__all__ = [
    "MlflowServer",
    "TrainkitStore",
    "free_port",
    "migrated_sqlite_template",
    "silent_server",
    "trainkit_server",
    "trainkit_sqlite_template",
    "trainkit_store",
]

logger = logging.getLogger(__name__)

# What every mlflow process started here gets: one worker and no job runner (otherwise
# `mlflow server` forks ~15 processes), and no telemetry.
SERVER_ENV = {
    "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
_CLEARED_MLFLOW_VARS = (
    _env.MLFLOW_EXPERIMENT_NAME,
    _env.MLFLOW_EXPERIMENT_ID,
    *_env.STALE_HANDOVER,
)
_TEMPLATE_NAME = "mlflow-template.db"


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


def _tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _sqlite_uri(path: Path) -> str:
    return f"sqlite:///{path.resolve()}"


@contextlib.contextmanager
def _env_set(values: dict[str, str]) -> Iterator[None]:
    saved = {name: os.environ.get(name) for name in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for name, old in saved.items():
            if old is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = old


@contextlib.contextmanager
def _chdir(path: Path) -> Iterator[None]:
    # contextlib.chdir is 3.11+; we support 3.10.
    old = Path.cwd()
    os.chdir(path)
    try:
        yield
    finally:
        os.chdir(old)


def migrated_sqlite_template(directory: str | os.PathLike[str]) -> Path:
    """Create (once) a fully migrated MLflow sqlite database in `directory`; return its path.

    Migrating a fresh store takes seconds, copying the file takes milliseconds: migrate
    one template per session and copy it per test (see `trainkit_store`).
    """
    path = Path(directory) / _TEMPLATE_NAME
    if path.exists():
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    from mlflow import MlflowClient

    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    # The Default experiment records cwd/mlruns as its artifact root; keep that out of the
    # caller's cwd (each copy rewrites it anyway).
    with _env_set({"MLFLOW_DISABLE_TELEMETRY": "true"}), _chdir(path.parent):
        MlflowClient(_sqlite_uri(partial)).search_experiments()
    partial.replace(path)
    return path


def _copy_store(template: Path, db_path: Path, default_artifact_location: str) -> Path:
    """Copy the template to `db_path` and point the Default experiment at its own artifacts."""
    import sqlite3

    db_path.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(template, db_path)
    # The template's Default experiment (id 0) names the template's directory; a store
    # shared by every test is what this fixture exists to avoid.
    with contextlib.closing(sqlite3.connect(db_path)) as conn, conn:
        conn.execute(
            "UPDATE experiments SET artifact_location = ? WHERE experiment_id = 0",
            (default_artifact_location,),
        )
    return db_path


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
            if attempt + 1 < attempts and "address already in use" in _tail(self.log_path).lower():
                self.port = free_port(self.host)
                continue
            break
        tail = _tail(self.log_path)
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
        return _tail(self.log_path, lines)

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


@dataclass(frozen=True)
class TrainkitStore:
    """The isolated local store of one test: `uri` is also in MLFLOW_TRACKING_URI."""

    uri: str
    db_path: Path
    root: Path


def _clear_env(monkeypatch: pytest.MonkeyPatch, name: str) -> None:
    # setenv first so that undo also removes a value the test (or mlflow's
    # set_experiment / set_tracking_uri, which write os.environ) sets later.
    monkeypatch.setenv(name, "")
    monkeypatch.delenv(name)


def _reset_mlflow_globals(uri: str | None) -> None:
    """Point mlflow's fluent API at `uri` (None: back to the env var) if mlflow is loaded."""
    mlflow = sys.modules.get("mlflow")
    if mlflow is None:
        return
    while mlflow.active_run() is not None:
        mlflow.end_run()
    mlflow.set_tracking_uri(uri)
    fluent: Any = sys.modules.get("mlflow.tracking.fluent")
    # mlflow has no public way to forget set_experiment().
    if fluent is not None and hasattr(fluent, "_active_experiment_id"):
        fluent._active_experiment_id = None


@pytest.fixture(scope="session")
def trainkit_sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated MLflow sqlite database, made once per session; copy it, never write it."""
    return migrated_sqlite_template(tmp_path_factory.mktemp("trainkit-template"))


@pytest.fixture
def trainkit_store(
    trainkit_sqlite_template: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[TrainkitStore]:
    """A fresh sqlite store per test, with the environment pointing at it and nothing else.

    Sets MLFLOW_TRACKING_URI, TRAINKIT_SPOOL_DIR (tmp_path/"spool") and
    MLFLOW_DISABLE_TELEMETRY; clears the run/experiment handover variables and every
    TRAINKIT_* variable (and sets TRAINKIT_SENDER=thread, so that no sender process
    outlives the test); chdir's to tmp_path so default artifact roots (./mlruns) land
    there. If mlflow is imported, its fluent API is pointed at the store and its active
    run/experiment reset after. A suite that needs one of its own TRAINKIT_* switches
    kept overrides this fixture in its conftest and sets it again.
    """
    db_path = _copy_store(
        trainkit_sqlite_template,
        tmp_path / "mlruns" / "mlflow.db",
        str(tmp_path / "mlruns" / "0"),
    )
    store = TrainkitStore(uri=_sqlite_uri(db_path), db_path=db_path, root=tmp_path)
    for name in sorted(os.environ):
        if name.startswith(_env.TRAINKIT_PREFIX):
            monkeypatch.delenv(name)
    for name in _CLEARED_MLFLOW_VARS:
        _clear_env(monkeypatch, name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(_env.MLFLOW_TRACKING_URI, store.uri)
    monkeypatch.setenv(_env.TRAINKIT_SPOOL_DIR, str(tmp_path / "spool"))
    # The test's own process sends its runs: no sender process outlives the test.
    monkeypatch.setenv(_env.TRAINKIT_SENDER, "thread")
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    _reset_mlflow_globals(store.uri)
    yield store
    _reset_mlflow_globals(None)


@pytest.fixture(scope="session")
def trainkit_server(
    trainkit_sqlite_template: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[MlflowServer]:
    """One `mlflow server` for the session, on its own copy of the template store."""
    root = tmp_path_factory.mktemp("trainkit-server")
    db_path = _copy_store(trainkit_sqlite_template, root / "mlflow.db", "mlflow-artifacts:/0")
    server = MlflowServer(_sqlite_uri(db_path), root / "artifacts")
    server.start()
    try:
        yield server
    finally:
        server.stop()
