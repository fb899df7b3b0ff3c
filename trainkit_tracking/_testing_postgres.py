"""A throwaway PostgreSQL cluster for tests, run as the postgres user when root (public
through ``trainkit_tracking.testing``)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from types import TracebackType

from trainkit_tracking._testing_servers import free_port, tail_of
from trainkit_tracking.errors import TrackingError

logger = logging.getLogger("trainkit_tracking.testing")

_PG_BIN_NAMES = ("initdb", "pg_ctl", "postgres", "createdb")


def _is_root() -> bool:
    return hasattr(os, "geteuid") and os.geteuid() == 0


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
        self.port: int = free_port() if port is None else port
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
            log = tail_of(self.base_dir / "postgres.log") if self.base_dir else ""
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
