"""Pytest plugin with isolated MLflow stores and servers for tests of code that tracks runs.

Loaded in every pytest session of anyone who installs the package (entry point pytest11),
so it holds only what a consumer's tests use (this repo's own test machinery is in tests/)
and importing it stays cheap: mlflow, sqlite3 and http.client are imported inside functions.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from trainkit_tracking._core import env as _env
from trainkit_tracking._testing_servers import MlflowServer as MlflowServer
from trainkit_tracking._testing_servers import free_port as free_port
from trainkit_tracking._testing_servers import silent_server as silent_server

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


_CLEARED_MLFLOW_VARS = (
    _env.MLFLOW_EXPERIMENT_NAME,
    _env.MLFLOW_EXPERIMENT_ID,
    *_env.STALE_HANDOVER,
)
_TEMPLATE_NAME = "mlflow-template.db"


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
    from trainkit_tracking._store.store import Store

    partial = path.with_suffix(".partial")
    partial.unlink(missing_ok=True)
    # The Default experiment records cwd/mlruns as its artifact root; keep that out of the
    # caller's cwd (each copy rewrites it anyway).
    with _env_set({"MLFLOW_DISABLE_TELEMETRY": "true"}), _chdir(path.parent):
        Store(_sqlite_uri(partial), timeout=300.0).ping()
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
