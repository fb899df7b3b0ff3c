"""Suite-wide setup: the loopback-only network guard, in this process and in every child;
the suite's own switches; the PostgreSQL-backed server fixture (tests/pg.py)."""

from __future__ import annotations

import importlib.util
import os
import socket
import sys
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from pg import PostgresCluster, postgres_unavailable_reason

from trainkit_tracking.testing import MlflowServer, TrainkitStore

NETGUARD_DIR = Path(__file__).resolve().parent / "netguard"
_MONKEYPATCH = pytest.StashKey[pytest.MonkeyPatch]()
_SWITCHES = pytest.StashKey[dict[str, str]]()
_LOOPBACK = "127.0.0.1,localhost,::1"
REQUIRE_POSTGRES_VAR = "TRAINKIT_REQUIRE_POSTGRES"  # set by .ci/run: a skip is a failure


def _load_netguard() -> ModuleType:
    # Loaded under its own name: importing it as `sitecustomize` would shadow the real one.
    spec = importlib.util.spec_from_file_location(
        "trainkit_netguard", NETGUARD_DIR / "sitecustomize.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    sys.modules[spec.name] = module  # tests reach it as sys.modules["trainkit_netguard"]
    return module


netguard = _load_netguard()


def _keep_guard_under_pytest_socket() -> None:
    """Make pytest-socket restore our guarded functions, not the raw ones, after each test.

    pytest-socket saves socket.socket.connect & co. when it is imported (before this
    conftest) and puts those back at every teardown, which would drop our guard from
    the pytest process after the first test.
    """
    import socket

    try:
        import pytest_socket
    except ImportError:  # not installed: our guard is the only layer, nothing to keep
        return
    for saved, current in (
        ("_true_connect", socket.socket.connect),
        ("_true_getaddrinfo", socket.getaddrinfo),
        ("_true_gethostbyname", socket.gethostbyname),
    ):
        if hasattr(pytest_socket, saved):
            setattr(pytest_socket, saved, current)


def pytest_configure(config: pytest.Config) -> None:
    mp = pytest.MonkeyPatch()
    config.stash[_MONKEYPATCH] = mp
    old = os.environ.get("PYTHONPATH")
    # First on PYTHONPATH: every child Python runs netguard/sitecustomize.py at start-up.
    mp.setenv("PYTHONPATH", f"{NETGUARD_DIR}{os.pathsep}{old}" if old else str(NETGUARD_DIR))
    mp.setenv(netguard.ENV_VAR, "1")
    mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    # A sender process per test store costs ~2 s of CPU (importing mlflow): most tests send
    # from a thread. The journal's own tests (logging, failures, integrity: marked
    # `default_sender`) run the default users get, a sender process; TRAINKIT_SENDER=process
    # runs every test file that way.
    mp.setenv("TRAINKIT_SENDER", os.environ.get("TRAINKIT_SENDER") or "thread")
    mp.setenv("TRAINKIT_SENDER_LINGER", os.environ.get("TRAINKIT_SENDER_LINGER") or "30")
    # Hugging Face reads this when it is imported, at collection: set it before any test
    # module loads. Online mode could not work anyway (the guard allows only loopback).
    mp.setenv("HF_HUB_OFFLINE", "1")
    for name in ("NO_PROXY", "no_proxy"):
        # A developer's HTTP proxy must not sit between the tests and their local servers.
        current = os.environ.get(name)
        mp.setenv(name, f"{current},{_LOOPBACK}" if current else _LOOPBACK)
    config.stash[_SWITCHES] = {
        name: os.environ[name]
        for name in (
            netguard.ENV_VAR,
            REQUIRE_POSTGRES_VAR,
            "TRAINKIT_SENDER",
            "TRAINKIT_SENDER_LINGER",
        )
        if name in os.environ
    }
    netguard.install()
    _keep_guard_under_pytest_socket()
    # Without entry-point autoload (PYTEST_DISABLE_PLUGIN_AUTOLOAD) our fixtures still load.
    if not config.pluginmanager.has_plugin("trainkit_tracking"):
        import trainkit_tracking.testing

        config.pluginmanager.register(trainkit_tracking.testing, "trainkit_tracking")


def pytest_unconfigure(config: pytest.Config) -> None:
    mp = config.stash.get(_MONKEYPATCH, None)
    if mp is not None:
        mp.undo()


@pytest.fixture(scope="session", autouse=True)
def _session_spool_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """Spooled batches of any test without its own store land in the pytest tmp dir."""
    spool = tmp_path_factory.mktemp("spool")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TRAINKIT_SPOOL_DIR", str(spool))
        yield spool


@pytest.fixture(autouse=True)
def _default_sender(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Tests marked `default_sender` run with the sender users get: a process of its own."""
    if request.node.get_closest_marker("default_sender") is not None:
        monkeypatch.setenv("TRAINKIT_SENDER", "process")


@pytest.fixture
def closed_port() -> int:
    """A port nothing listens on: a store that refuses connections."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


@pytest.fixture
def silent_port() -> Iterator[int]:
    """A port that accepts TCP connections but never answers a request."""
    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)
        yield srv.getsockname()[1]


@pytest.fixture
def trainkit_store(
    trainkit_store: TrainkitStore,
    monkeypatch: pytest.MonkeyPatch,
    pytestconfig: pytest.Config,
    request: pytest.FixtureRequest,
) -> TrainkitStore:
    """The plugin's store, with the suite's switches set again (it clears every TRAINKIT_*)."""
    for name, value in pytestconfig.stash[_SWITCHES].items():
        monkeypatch.setenv(name, value)
    if request.node.get_closest_marker("default_sender") is not None:
        monkeypatch.setenv("TRAINKIT_SENDER", "process")
    return trainkit_store


@pytest.fixture(scope="session")
def trainkit_postgres_server(
    tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config
) -> Iterator[MlflowServer]:
    """An `mlflow server` backed by a throwaway PostgreSQL cluster, for the session.

    Skips when PostgreSQL is not installed, unless TRAINKIT_REQUIRE_POSTGRES=1.
    """
    reason = postgres_unavailable_reason()
    if reason is not None:
        if pytestconfig.stash[_SWITCHES].get(REQUIRE_POSTGRES_VAR) == "1":
            pytest.fail(f"{reason}, and {REQUIRE_POSTGRES_VAR}=1 requires PostgreSQL")
        pytest.skip(reason)
    root = tmp_path_factory.mktemp("trainkit-postgres")
    with PostgresCluster() as cluster:
        # A fresh database: the server migrates it on start, so allow longer than sqlite.
        server = MlflowServer(cluster.uri, root / "artifacts").start(timeout=120)
        try:
            yield server
        finally:
            server.stop()
