"""The pytest plugin's fixtures and servers, and the suite's loopback-only network guard."""

from __future__ import annotations

import ast
import http.client
import os
import socket
import sqlite3
import subprocess
import sys
import textwrap
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
from mlflow import MlflowClient
from pg import find_postgres_bin

import trainkit_tracking.testing
from trainkit_tracking.errors import TrackingError
from trainkit_tracking.testing import MlflowServer, TrainkitStore, migrated_sqlite_template

GUARD_MESSAGE = "trainkit test guard: connection to"


@pytest.fixture
def netguard() -> ModuleType:
    return sys.modules["trainkit_netguard"]


def _experiment_names(uri: str) -> set[str]:
    return {e.name for e in MlflowClient(uri).search_experiments()}


def _run_python(code: str, *args: str, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def listener() -> Iterator[int]:
    """A listening TCP socket on 127.0.0.1; yields its port."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(8)
        yield srv.getsockname()[1]


# --- the plugin ---------------------------------------------------------------------


def test_plugin_is_registered(pytestconfig: pytest.Config) -> None:
    plugin = pytestconfig.pluginmanager.get_plugin("trainkit_tracking")
    assert plugin is not None
    assert plugin.__name__ == "trainkit_tracking.testing"


def test_the_plugin_ships_only_what_a_consumer_needs() -> None:
    # The PostgreSQL cluster manager (runuser, chown as root) and the suite's switches
    # are tests/ machinery: they must not load into every user's pytest session.
    assert trainkit_tracking.testing.__all__ == [
        "MlflowServer",
        "TrainkitStore",
        "free_port",
        "migrated_sqlite_template",
        "silent_server",
        "trainkit_server",
        "trainkit_sqlite_template",
        "trainkit_store",
    ]
    source = Path(trainkit_tracking.testing.__file__).read_text(encoding="utf-8")
    for word in ("runuser", "chown", "NETGUARD", "REQUIRE_POSTGRES", "postgres"):
        assert word not in source, word


@pytest.mark.slow
def test_plugin_store_clears_every_trainkit_variable(tmp_path: Path) -> None:
    # A consumer's session: the plugin alone, without this suite's conftest override.
    (tmp_path / "test_consumer_env.py").write_text(
        textwrap.dedent(
            """
            import os

            def test_env(trainkit_store):
                left = sorted(n for n in os.environ if n.startswith("TRAINKIT_"))
                assert left == ["TRAINKIT_SENDER", "TRAINKIT_SPOOL_DIR"], left
                assert os.environ["TRAINKIT_SPOOL_DIR"] == str(trainkit_store.root / "spool")
                assert os.environ["TRAINKIT_SENDER"] == "thread"
            """
        )
    )
    env = {**os.environ, "TRAINKIT_PROJECT": "from-the-shell", "TRAINKIT_ANYTHING": "x"}
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "1 passed" in done.stdout


def test_importing_the_plugin_loads_no_mlflow() -> None:
    done = _run_python(
        """
        import sys
        import trainkit_tracking.testing
        heavy = ("mlflow", "sqlalchemy", "sqlite3", "http.client", "psycopg2")
        print(",".join(m for m in heavy if m in sys.modules))
        """
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == ""


def test_template_is_migrated_and_reused(trainkit_sqlite_template: Path) -> None:
    assert trainkit_sqlite_template.is_file()
    assert migrated_sqlite_template(trainkit_sqlite_template.parent) == trainkit_sqlite_template
    with sqlite3.connect(trainkit_sqlite_template) as conn:
        tables = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        version = conn.execute("SELECT version_num FROM alembic_version").fetchone()
    assert {"experiments", "runs", "metrics", "params", "tags"} <= tables
    assert version is not None


def test_store_is_usable_and_points_everything_at_tmp(
    trainkit_store: TrainkitStore, tmp_path: Path
) -> None:
    assert trainkit_store.root == tmp_path
    assert trainkit_store.db_path == tmp_path / "mlruns" / "mlflow.db"
    assert trainkit_store.db_path.is_file()
    assert trainkit_store.uri == f"sqlite:///{trainkit_store.db_path}"
    assert os.environ["MLFLOW_TRACKING_URI"] == trainkit_store.uri
    assert os.environ["TRAINKIT_SPOOL_DIR"] == str(tmp_path / "spool")
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert Path.cwd() == tmp_path

    client = MlflowClient()  # from MLFLOW_TRACKING_URI
    exp_id = client.create_experiment("fixture-check")
    run = client.create_run(exp_id, run_name="r1")
    client.log_param(run.info.run_id, "lr", "0.1")
    client.log_metric(run.info.run_id, "loss", 0.5, step=1)
    (tmp_path / "a.txt").write_text("hello")
    client.log_artifact(run.info.run_id, str(tmp_path / "a.txt"))
    client.set_terminated(run.info.run_id)

    got = MlflowClient(trainkit_store.uri).get_run(run.info.run_id)
    assert got.data.params == {"lr": "0.1"}
    assert got.data.metrics == {"loss": 0.5}
    assert got.info.status == "FINISHED"
    artifacts = list((tmp_path / "mlruns").rglob("a.txt"))
    assert len(artifacts) == 1
    default = client.get_experiment("0")
    assert default.artifact_location == str(tmp_path / "mlruns" / "0")


@pytest.mark.parametrize("attempt", [1, 2])
def test_each_test_gets_a_fresh_store(trainkit_store: TrainkitStore, attempt: int) -> None:
    # The second attempt fails if the first one's experiment leaked into its store.
    assert _experiment_names(trainkit_store.uri) == {"Default"}
    MlflowClient(trainkit_store.uri).create_experiment("isolation-check")
    assert _experiment_names(trainkit_store.uri) == {"Default", "isolation-check"}


def test_template_is_never_written(
    trainkit_sqlite_template: Path, trainkit_store: TrainkitStore
) -> None:
    MlflowClient(trainkit_store.uri).create_experiment("only-in-the-copy")
    with sqlite3.connect(trainkit_sqlite_template) as conn:
        rows = conn.execute("SELECT name FROM experiments").fetchall()
    assert rows == [("Default",)]


@pytest.fixture
def stale_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """Handover variables a previous run in this shell might have left behind."""
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_PARENT_RUN_ID"):
        monkeypatch.setenv(name, "stale")
    monkeypatch.setenv("TRAINKIT_RUN_ID", "stale")
    monkeypatch.setenv("TRAINKIT_RUN_SPEC", "{}")


def test_store_clears_handover_variables(stale_env: None, trainkit_store: TrainkitStore) -> None:
    for name in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME", "MLFLOW_PARENT_RUN_ID"):
        assert name not in os.environ
    assert "TRAINKIT_RUN_ID" not in os.environ
    assert "TRAINKIT_RUN_SPEC" not in os.environ
    # The suite's guard switch survives: children must stay on loopback.
    assert os.environ["TRAINKIT_NETGUARD"] == "1"


def test_store_points_the_fluent_api_at_it(trainkit_store: TrainkitStore) -> None:
    import mlflow

    mlflow.set_experiment("fluent-check")  # writes MLFLOW_EXPERIMENT_ID; undone after
    with mlflow.start_run() as run:
        mlflow.log_param("p", "1")
    got = MlflowClient(trainkit_store.uri).get_run(run.info.run_id)
    assert got.data.params == {"p": "1"}


def test_store_undid_the_fluent_state(trainkit_store: TrainkitStore) -> None:
    import mlflow

    assert "MLFLOW_EXPERIMENT_ID" not in os.environ
    assert mlflow.get_tracking_uri() == trainkit_store.uri
    assert _experiment_names(trainkit_store.uri) == {"Default"}
    # The previous test's set_experiment() is forgotten: runs go to the Default experiment.
    with mlflow.start_run() as run:
        pass
    assert run.info.experiment_id == "0"


# --- servers ------------------------------------------------------------------------


def _get_health(uri: str) -> int:
    host, port = uri.removeprefix("http://").rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=5)
    try:
        conn.request("GET", "/health")
        return conn.getresponse().status
    finally:
        conn.close()


def _log_a_run(uri: str, tmp_path: Path, experiment: str) -> str:
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(experiment)
    exp_id = exp.experiment_id if exp else client.create_experiment(experiment)
    run = client.create_run(exp_id)
    client.log_metric(run.info.run_id, "acc", 0.9)
    artifact = tmp_path / "model.txt"
    artifact.write_text("weights")
    client.log_artifact(run.info.run_id, str(artifact))
    client.set_terminated(run.info.run_id)
    return str(run.info.run_id)


@pytest.mark.server
def test_server_answers_and_logs_through_itself(
    trainkit_server: MlflowServer, tmp_path: Path
) -> None:
    assert trainkit_server.uri == f"http://127.0.0.1:{trainkit_server.port}"
    assert trainkit_server.pid is not None
    assert _get_health(trainkit_server.uri) == 200
    run_id = _log_a_run(trainkit_server.uri, tmp_path, "server-check")
    run = MlflowClient(trainkit_server.uri).get_run(run_id)
    assert run.data.metrics == {"acc": 0.9}
    # Served artifacts: the client uploaded through the server into its destination.
    assert run.info.artifact_uri.startswith("mlflow-artifacts:/")
    uploaded = list(trainkit_server.artifacts_dir.rglob("model.txt"))
    assert [p.read_text() for p in uploaded] == ["weights"]


@pytest.mark.server
def test_server_children_carry_the_net_guard(trainkit_server: MlflowServer) -> None:
    environ = Path(f"/proc/{trainkit_server.pid}/environ").read_bytes().split(b"\0")
    assert b"TRAINKIT_NETGUARD=1" in environ
    assert b"MLFLOW_SERVER_ENABLE_JOB_EXECUTION=false" in environ
    pythonpath = next(e for e in environ if e.startswith(b"PYTHONPATH=")).decode()
    assert pythonpath.split("=", 1)[1].split(os.pathsep)[0].endswith("netguard")


@pytest.mark.server
@pytest.mark.slow
def test_server_restart_keeps_data(trainkit_server: MlflowServer, tmp_path: Path) -> None:
    run_id = _log_a_run(trainkit_server.uri, tmp_path, "restart-check")
    uri, old_pid = trainkit_server.uri, trainkit_server.pid
    trainkit_server.restart()
    assert trainkit_server.uri == uri
    assert trainkit_server.pid not in (None, old_pid)
    run = MlflowClient(trainkit_server.uri).get_run(run_id)
    assert run.data.metrics == {"acc": 0.9}
    names = [a.path for a in MlflowClient(trainkit_server.uri).list_artifacts(run_id)]
    assert names == ["model.txt"]


@pytest.mark.slow
def test_server_start_failure_shows_the_log_tail(tmp_path: Path) -> None:
    server = MlflowServer("nosuchscheme://x", tmp_path / "artifacts")
    with pytest.raises(TrackingError, match="exited with code") as err:
        server.start(timeout=60)
    assert "nosuchscheme" in str(err.value).split("last lines:", 1)[1]
    assert server.pid is None
    assert server.log_path == tmp_path / "server.log"


@pytest.mark.postgres
@pytest.mark.server
@pytest.mark.slow
def test_postgres_server_logs_a_run(trainkit_postgres_server: MlflowServer, tmp_path: Path) -> None:
    assert trainkit_postgres_server.backend_store_uri.startswith("postgresql+psycopg2://")
    assert "@127.0.0.1:" in trainkit_postgres_server.backend_store_uri
    run_id = _log_a_run(trainkit_postgres_server.uri, tmp_path, "postgres-check")
    client = MlflowClient(trainkit_postgres_server.uri)
    exp = client.get_experiment_by_name("postgres-check")
    assert exp is not None
    found = client.search_runs([exp.experiment_id])
    assert [r.info.run_id for r in found] == [run_id]
    assert found[0].data.metrics == {"acc": 0.9}


def test_find_postgres_bin_names_a_usable_dir() -> None:
    bin_dir = find_postgres_bin()
    if bin_dir is None:
        pytest.skip("PostgreSQL binaries not installed")
    for name in ("initdb", "pg_ctl", "postgres"):
        assert os.access(bin_dir / name, os.X_OK)


# --- the network guard --------------------------------------------------------------


def test_session_environment() -> None:
    first = os.environ["PYTHONPATH"].split(os.pathsep)[0]
    assert Path(first) == Path(__file__).parent / "netguard"
    assert os.environ["TRAINKIT_NETGUARD"] == "1"
    assert os.environ["MLFLOW_DISABLE_TELEMETRY"] == "true"
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    spool = Path(os.environ["TRAINKIT_SPOOL_DIR"])
    assert spool.is_dir()
    assert spool.name.startswith("spool")


def _module_level_environ_writes(tree: ast.Module) -> list[int]:
    """Lines of statements outside any function or class that write os.environ."""
    writes = ("__setitem__", "__delitem__", "setdefault", "update", "pop", "clear")
    found: list[int] = []
    pending: list[ast.AST] = list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
            continue
        targets: list[ast.expr] = []
        if isinstance(node, (ast.Assign, ast.Delete)):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        for target in targets:
            if isinstance(target, ast.Subscript) and ast.unparse(target.value) == "os.environ":
                found.append(node.lineno)
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in writes
            and ast.unparse(node.func.value) == "os.environ"
        ) or (
            isinstance(node, ast.Call) and ast.unparse(node.func) in ("os.putenv", "os.unsetenv")
        ):
            found.append(node.lineno)
        pending.extend(ast.iter_child_nodes(node))
    return sorted(found)


def test_no_test_module_writes_the_environment_at_import() -> None:
    # Suite-wide variables are set in conftest.pytest_configure (children inherit them),
    # per-test ones with monkeypatch: an import-time write leaks into every later test.
    sample = ast.parse(
        'import os\nos.environ["A"] = "1"\nos.environ.setdefault("B", "2")\n'
        "def f():\n    os.environ['C'] = '3'\n"
    )
    assert _module_level_environ_writes(sample) == [2, 3]
    offenders = {
        str(path.relative_to(Path(__file__).parent)): lines
        for path in sorted(Path(__file__).parent.rglob("*.py"))
        if (lines := _module_level_environ_writes(ast.parse(path.read_text(encoding="utf-8"))))
    }
    assert offenders == {}


def test_pytest_socket_allows_only_loopback(pytestconfig: pytest.Config) -> None:
    hosts = set(pytestconfig.getoption("--allow-hosts").split(","))
    assert hosts == {"127.0.0.1", "localhost", "::1"}
    assert pytestconfig.getoption("--allow-unix-socket") is True


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("::ffff:127.0.0.1", True),
        ("localhost", True),
        ("LOCALHOST", True),
        (b"127.0.0.1", True),
        ("10.255.255.1", False),
        ("169.254.169.254", False),
        ("0.0.0.0", False),
        ("", False),
        ("example.invalid", False),
        ("localhost.example.invalid", False),
        ("::ffff:10.0.0.1", False),
        (None, False),
    ],
)
def test_is_allowed_host(netguard: ModuleType, host: object, allowed: bool) -> None:
    assert netguard.is_allowed_host(host) is allowed


@pytest.mark.enable_socket  # pytest-socket steps aside: our guard alone must hold
def test_guard_blocks_non_loopback_in_process(netguard: ModuleType) -> None:
    for func in (socket.socket.connect, socket.socket.connect_ex, socket.create_connection):
        if not getattr(func, netguard.MARK, False):
            pytest.fail(f"net guard not installed on {func!r}; refusing to try a connect")
    target = ("10.255.255.1", 9)
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.settimeout(5)
        started = time.monotonic()
        with pytest.raises(OSError, match=f"{GUARD_MESSAGE} 10.255.255.1:9 blocked"):
            sock.connect(target)
        with pytest.raises(OSError, match=GUARD_MESSAGE):
            sock.connect_ex(target)
        # Raised before any packet: an unroutable address would otherwise hang until timeout.
        assert time.monotonic() - started < 1.0
    with pytest.raises(OSError, match=GUARD_MESSAGE):
        socket.create_connection(target, timeout=5)
    with pytest.raises(OSError, match=GUARD_MESSAGE):
        socket.getaddrinfo("example.invalid", 80)
    with pytest.raises(OSError, match=GUARD_MESSAGE):
        socket.gethostbyname("example.invalid")
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as udp, pytest.raises(OSError):
        udp.sendto(b"x", target)


def test_both_layers_block_non_loopback_in_process(
    netguard: ModuleType, pytestconfig: pytest.Config
) -> None:
    import pytest_socket

    if pytestconfig.getoption("--force-enable-socket"):
        pytest.skip("pytest-socket switched off with --force-enable-socket")

    # pytest-socket wraps our guard, so both must refuse; check before trying.
    assert getattr(pytest_socket._true_connect, netguard.MARK, False)
    assert not getattr(socket.socket.connect, netguard.MARK, False)
    with (
        socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock,
        warnings.catch_warnings(),
    ):
        warnings.simplefilter("ignore")
        sock.settimeout(5)
        with pytest.raises((OSError, RuntimeError), match=r"10\.255\.255\.1"):
            sock.connect(("10.255.255.1", 9))


def test_loopback_works_in_process(listener: int) -> None:
    with socket.create_connection(("127.0.0.1", listener), timeout=5):
        pass
    with socket.create_connection(("localhost", listener), timeout=5):
        pass


def test_guard_blocks_non_loopback_in_a_subprocess(listener: int) -> None:
    done = _run_python(
        """
        import socket, sys
        # Never try the connect unless the guard is really in place.
        if not getattr(socket.socket.connect, "__trainkit_netguard__", False):
            print("GUARD MISSING")
            sys.exit(3)
        with socket.create_connection(("127.0.0.1", int(sys.argv[1])), timeout=5):
            print("loopback ok")
        sock = socket.socket()
        sock.settimeout(5)
        try:
            sock.connect(("169.254.169.254", 80))
        except OSError as e:
            print(e)
            sys.exit(0)
        print("CONNECTED")
        sys.exit(4)
        """,
        str(listener),
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0] == "loopback ok"
    assert lines[1].startswith(f"{GUARD_MESSAGE} 169.254.169.254:80 blocked")


def test_guard_can_be_switched_off_for_a_child(netguard: ModuleType) -> None:
    # Only an explicit 0 turns it off; unset keeps it on (fail closed).
    assert netguard.enabled({"TRAINKIT_NETGUARD": "1"})
    assert netguard.enabled({})
    assert not netguard.enabled({"TRAINKIT_NETGUARD": "0"})
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import socket; print(hasattr(socket.getaddrinfo, '__trainkit_netguard__'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TRAINKIT_NETGUARD": "0"},
    )
    assert done.stdout.strip() == "False", done.stderr
