"""Pytest plugin with isolated MLflow stores and servers for tests of code that tracks runs.

Loaded in every pytest session of anyone who installs the package (entry point pytest11),
so importing it stays cheap: mlflow, sqlite3 and http.client are imported inside functions.
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
import tempfile
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
    "PostgresCluster",
    "TrainkitStore",
    "find_postgres_bin",
    "free_port",
    "migrated_sqlite_template",
    "silent_server",
    "trainkit_postgres_server",
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
REQUIRE_POSTGRES_VAR = "TRAINKIT_REQUIRE_POSTGRES"
# Test-session switches that trainkit_store must not clear with the other TRAINKIT_* vars.
# Kept: how this machine's processes send (a session-wide choice, not a leaked handover).
_KEPT_TRAINKIT_VARS = frozenset(
    {"TRAINKIT_NETGUARD", REQUIRE_POSTGRES_VAR, _env.TRAINKIT_SENDER, _env.TRAINKIT_SENDER_LINGER}
)
_CLEARED_MLFLOW_VARS = (
    _env.MLFLOW_EXPERIMENT_NAME,
    _env.MLFLOW_EXPERIMENT_ID,
    *_env.STALE_HANDOVER,
)
_TEMPLATE_NAME = "mlflow-template.db"
_PG_BIN_NAMES = ("initdb", "pg_ctl", "postgres", "createdb")


def _free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on (yet): a store that refuses connections."""
    return _free_port(host)


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


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


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
        self.port: int = _free_port(host) if port is None else port
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
                self.port = _free_port(self.host)
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


def find_postgres_bin() -> Path | None:
    """The directory holding initdb, pg_ctl and postgres, or None when PostgreSQL is absent."""
    candidates: list[Path] = []
    on_path = shutil.which("pg_ctl")
    if on_path:
        candidates.append(Path(on_path).resolve().parent)

    def version(path: Path) -> tuple[int, ...]:
        return tuple(int(p) for p in path.parent.name.split(".") if p.isdigit())

    candidates += sorted(Path("/usr/lib/postgresql").glob("*/bin"), key=version, reverse=True)
    for directory in candidates:
        if all((directory / name).is_file() for name in _PG_BIN_NAMES):
            return directory
    return None


def postgres_unavailable_reason() -> str | None:
    """Why PostgreSQL tests cannot run here, or None when they can."""
    if find_postgres_bin() is None:
        return "PostgreSQL binaries (initdb, pg_ctl, postgres) not found"
    import importlib.util

    if importlib.util.find_spec("psycopg2") is None:
        return "psycopg2 is not installed (mlflow server needs it): pip install psycopg2-binary"
    if _is_root():
        import pwd

        try:
            pwd.getpwnam("postgres")
        except KeyError:
            return "running as root and there is no 'postgres' user to run PostgreSQL as"
        if shutil.which("runuser") is None:
            return "running as root and runuser is missing (needed to run as 'postgres')"
    return None


class PostgresCluster:
    """A throwaway PostgreSQL cluster on 127.0.0.1, run as the postgres user when root."""

    def __init__(
        self,
        *,
        port: int | None = None,
        dbname: str = "mlflow",
        bin_dir: str | os.PathLike[str] | None = None,
        driver: str | None = "psycopg2",
    ) -> None:
        found = Path(bin_dir) if bin_dir is not None else find_postgres_bin()
        if found is None:
            raise TrackingError(
                "PostgreSQL binaries not found; install postgresql or pass bin_dir=..."
            )
        self.bin_dir = found
        self.port: int = _free_port() if port is None else port
        self.dbname = dbname
        self.driver = driver
        self.user = "postgres"
        self.base_dir: Path | None = None

    @property
    def uri(self) -> str:
        """The SQLAlchemy URI for mlflow, with the driver named.

        SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; we ship psycopg2-binary.
        """
        scheme = f"postgresql+{self.driver}" if self.driver else "postgresql"
        return f"{scheme}://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    @property
    def libpq_uri(self) -> str:
        """The same database as a plain libpq URI (psql, psycopg2.connect)."""
        return f"postgresql://{self.user}@127.0.0.1:{self.port}/{self.dbname}"

    @property
    def data_dir(self) -> Path:
        if self.base_dir is None:
            raise TrackingError("PostgresCluster is not started; call start() first")
        return self.base_dir / "data"

    def _run(self, args: list[str], timeout: float) -> None:
        # PostgreSQL refuses to run as root: drop to the postgres user.
        cmd = ["runuser", "-u", self.user, "--", *args] if _is_root() else args
        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
        )
        if done.returncode != 0:
            log = _tail(self.base_dir / "postgres.log") if self.base_dir else ""
            raise TrackingError(
                f"{' '.join(cmd)!r} exited {done.returncode}:\n"
                f"{done.stdout}{done.stderr}\n{log}".rstrip()
            )

    def start(self, timeout: float = 60) -> PostgresCluster:
        """initdb in a fresh temp dir, start the server and create the database."""
        if self.base_dir is not None:
            return self
        reason = postgres_unavailable_reason()
        if reason is not None:
            raise TrackingError(f"cannot start PostgreSQL: {reason}")
        # A dir of its own under the system temp dir: pytest's tmp dirs are 0700 root.
        base = Path(tempfile.mkdtemp(prefix="trainkit-pg-"))
        self.base_dir = base
        (base / "sock").mkdir()
        if _is_root():
            import pwd

            entry = pwd.getpwnam(self.user)
            for path in (base, base / "sock"):
                os.chown(path, entry.pw_uid, entry.pw_gid)
        else:
            import getpass

            self.user = getpass.getuser()
        b = self.bin_dir
        try:
            self._run(
                [
                    *(str(b / "initdb"), "-D", str(self.data_dir), "-U", self.user),
                    *("-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync"),
                ],
                timeout,
            )
            options = (
                f"-h 127.0.0.1 -p {self.port} -k {base / 'sock'} "
                "-c fsync=off -c full_page_writes=off -c synchronous_commit=off"
            )
            self._run(
                [
                    *(str(b / "pg_ctl"), "-D", str(self.data_dir)),
                    *("-l", str(base / "postgres.log"), "-w", "-t", str(int(timeout))),
                    *("-o", options, "start"),
                ],
                timeout + 5,
            )
            self._run(
                [
                    *(str(b / "createdb"), "-h", "127.0.0.1", "-p", str(self.port)),
                    *("-U", self.user, self.dbname),
                ],
                timeout,
            )
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        """Stop the server (fast shutdown) and delete its data directory."""
        base, self.base_dir = self.base_dir, None
        if base is None:
            return
        data = base / "data"
        if (data / "postmaster.pid").exists():
            cmd = [str(self.bin_dir / "pg_ctl"), "-D", str(data), "-m", "fast", "-w", "stop"]
            if _is_root():
                cmd = ["runuser", "-u", self.user, "--", *cmd]
            done = subprocess.run(cmd, capture_output=True, text=True, timeout=60)
            if done.returncode != 0:
                logger.warning("pg_ctl stop failed: %s%s", done.stdout, done.stderr)
        shutil.rmtree(base, ignore_errors=True)

    def __enter__(self) -> PostgresCluster:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


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
    MLFLOW_DISABLE_TELEMETRY; clears the run/experiment handover variables and TRAINKIT_*
    (except the test switches TRAINKIT_NETGUARD and TRAINKIT_REQUIRE_POSTGRES); chdir's
    to tmp_path so default artifact roots (./mlruns) land there. If mlflow is imported,
    its fluent API is pointed at the store and its active run/experiment reset after.
    """
    db_path = _copy_store(
        trainkit_sqlite_template,
        tmp_path / "mlruns" / "mlflow.db",
        str(tmp_path / "mlruns" / "0"),
    )
    store = TrainkitStore(uri=_sqlite_uri(db_path), db_path=db_path, root=tmp_path)
    for name in sorted(os.environ):
        if name.startswith(_env.TRAINKIT_PREFIX) and name not in _KEPT_TRAINKIT_VARS:
            monkeypatch.delenv(name)
    for name in _CLEARED_MLFLOW_VARS:
        _clear_env(monkeypatch, name)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv(_env.MLFLOW_TRACKING_URI, store.uri)
    monkeypatch.setenv(_env.TRAINKIT_SPOOL_DIR, str(tmp_path / "spool"))
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


@pytest.fixture(scope="session")
def trainkit_postgres_server(
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MlflowServer]:
    """An `mlflow server` backed by a throwaway PostgreSQL cluster, for the session.

    Skips when PostgreSQL is not installed, unless TRAINKIT_REQUIRE_POSTGRES=1.
    """
    reason = postgres_unavailable_reason()
    if reason is not None:
        if os.environ.get(REQUIRE_POSTGRES_VAR) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_POSTGRES_VAR}=1 requires PostgreSQL")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("trainkit-postgres")
    cluster = PostgresCluster().start()
    try:
        # A fresh database: the server migrates it on start, so allow longer than sqlite.
        server = MlflowServer(cluster.uri, root / "artifacts")
        server.start(timeout=120)
        try:
            yield server
        finally:
            server.stop()
    finally:
        cluster.stop()
