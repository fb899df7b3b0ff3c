"""Azure ML: URI checks, failure reasons, job-run adoption on a real store, bounded fallbacks.

Nothing here leaves loopback: an unreachable workspace is one whose connections fail at
the socket (the suite's network guard) or one on 127.0.0.1 that never answers. The live
test at the end talks to a real workspace and runs only when asked to, with credentials.
"""

from __future__ import annotations

import base64
import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from importlib.util import find_spec
from typing import Any

import pytest
from mlflow.tracking import MlflowClient

from trainkit_tracking import RunSpec, StoreUnavailableError, Tracker, TrackingError
from trainkit_tracking._store import azure as _azure
from trainkit_tracking.testing import TrainkitStore

STUDY = "350a79aa0000ffff"
WORKSPACE_PATH = (
    "/subscriptions/0000aaaa-0000-0000-0000-000000000000/resourceGroups/rg-ner"
    "/providers/Microsoft.MachineLearningServices/workspaces/ws-ner"
)
AZURE_URI = f"azureml://eastus.api.azureml.ms/mlflow/v1.0{WORKSPACE_PATH}"
JOB_NAME = "olive_kettle_5bq3pnkh2w"  # what Azure ML job run ids look like
HAS_AZUREML = find_spec("azureml") is not None and find_spec("azureml.mlflow") is not None
AZURE_VARS = (
    "AZUREML_RUN_ID",
    "AZUREML_ARM_WORKSPACE_NAME",
    "AZUREML_EXPERIMENT_ID",
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_RESOURCE_GROUP",
    "AZUREML_WORKSPACE_NAME",
    "AZUREML_ARTIFACTS_DEFAULT_TIMEOUT",
    "MLFLOW_TRACKING_TOKEN",
    "AZURE_CLIENT_ID",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_SECRET",
)
# A token with the shape azureml-mlflow decodes (an unsigned JWT); never a real one.
FAKE_TOKEN_SECRET = "c2VjcmV0LXNpZ25hdHVyZS1uZXZlci1wcmludGVk"


def fake_job_token() -> str:
    def part(data: dict[str, Any]) -> str:
        return base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()

    claims = {"exp": int(time.time()) + 3600, "oid": "o", "tid": "t", "aud": "https://ml"}
    return f"{part({'alg': 'none', 'typ': 'JWT'})}.{part(claims)}.{FAKE_TOKEN_SECRET}"


@pytest.fixture(autouse=True)
def _no_azure_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """A developer's Azure login or job variables must not steer these tests."""
    for name in AZURE_VARS:
        # setenv first, so that undo also removes what the Tracker writes later.
        monkeypatch.setenv(name, "")
        monkeypatch.delenv(name)


def sweep_spec(**changes: Any) -> RunSpec:
    fields: dict[str, Any] = {
        "kind": "hpo_sweep",
        "model": "distilbert",
        "study_name": "ner study",
        "study_key_hash": STUDY,
    }
    fields.update(changes)
    return RunSpec(**fields)


# Pure pieces ----------------------------------------------------------------------


def test_workspace_uri_shape() -> None:
    workspace = _azure.parse_workspace_uri(AZURE_URI)
    assert workspace == _azure.Workspace(
        "eastus.api.azureml.ms",
        "0000aaaa-0000-0000-0000-000000000000",
        "rg-ner",
        "ws-ner",
    )
    assert _azure.parse_workspace_uri(AZURE_URI.replace("v1.0", "v2.0") + "/?x=1") == workspace
    for bad in ("azureml://bad", "azureml://eastus.api.azureml.ms/mlflow/v1.0/subscriptions/x"):
        assert _azure.parse_workspace_uri(bad) is None
        with pytest.raises(_azure.AzureUnavailable, match="not an Azure ML workspace URI"):
            _azure.check_uri(bad)
    assert _azure.is_azure_uri(AZURE_URI)
    assert not _azure.is_azure_uri("sqlite:///x.db")
    assert not _azure.is_azure_uri(None)


def test_malformed_uri_never_reaches_azureml_mlflow() -> None:
    # azureml-mlflow answers a malformed URI with AttributeError from deep inside; we name
    # the expected shape instead, before any Azure package is imported.
    with pytest.raises(_azure.AzureUnavailable) as info:
        _azure.connect("azureml://bad", None, timeout=5)
    assert "subscriptions/<id>/resourceGroups/<group>" in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("host", "studio"),
    [
        ("eastus.api.azureml.ms", "https://ml.azure.com"),
        ("usgovarizona.api.ml.azure.us", "https://ml.azure.us"),
        ("chinaeast2.api.ml.azure.cn", "https://ml.azure.cn"),
    ],
)
def test_studio_url_is_derived_without_network(host: str, studio: str) -> None:
    uri = AZURE_URI.replace("eastus.api.azureml.ms", host)
    assert _azure.studio_url(uri, "run-1") == (
        f"{studio}/runs/run-1?wsid=/subscriptions/0000aaaa-0000-0000-0000-000000000000"
        "/resourcegroups/rg-ner/workspaces/ws-ner"
    )


def test_studio_url_is_none_when_unknown() -> None:
    assert _azure.studio_url("azureml://bad", "r") is None
    assert _azure.studio_url(AZURE_URI.replace("eastus.api.azureml.ms", "127.0.0.1:9"), "r") is None
    assert _azure.studio_url("sqlite:///x.db", "r") is None


def test_workspace_from_arguments_or_environment() -> None:
    env = {
        "AZURE_SUBSCRIPTION_ID": "sub",
        "AZURE_RESOURCE_GROUP": "rg",
        "AZUREML_WORKSPACE_NAME": "ws",
    }
    assert _azure.workspace_configured(env, None, None, None) == ("sub", "rg", "ws")
    assert _azure.workspace_configured(env, "s2", None, "w2") == ("s2", "rg", "w2")
    assert _azure.workspace_configured({}, "s", "g", "w") == ("s", "g", "w")
    assert _azure.workspace_configured({"AZURE_SUBSCRIPTION_ID": "sub"}, None, "rg", None) is None


def test_bounded_returns_raises_and_gives_up_in_time() -> None:
    assert _azure.bounded(lambda: 42, timeout=5, what="x") == 42
    with pytest.raises(KeyError):
        _azure.bounded(lambda: {}["missing"], timeout=5, what="x")
    release = threading.Event()
    started = time.monotonic()
    with pytest.raises(_azure.AzureUnavailable, match=r"the workspace did not answer within 0.3 s"):
        _azure.bounded(lambda: release.wait(30), timeout=0.3, what="the workspace")
    assert time.monotonic() - started < 2
    release.set()


class _Named(Exception):
    """An exception that reports itself as one of azure.core's, by class name."""


class _Coded(Exception):
    """Carries an MLflow error code, as MlflowException does."""

    def __init__(self, error_code: str, message: str) -> None:
        super().__init__(message)
        self.error_code = error_code


def azure_like(name: str, message: str) -> Exception:
    cls = type(name, (_Named,), {"__module__": "azure.core.exceptions"})
    return cls(message)


@pytest.mark.parametrize(
    ("exc", "reason", "fix"),
    [
        (
            ImportError("No module named 'azureml'"),
            "azure extra is missing",
            "trainkit-tracking[azure]",
        ),
        (
            azure_like("ClientAuthenticationError", "DefaultAzureCredential failed\nmore"),
            "Azure sign-in failed (DefaultAzureCredential failed)",
            "az login",
        ),
        (
            azure_like("ResourceNotFoundError", "no such workspace"),
            "was not found",
            "AZUREML_WORKSPACE_NAME",
        ),
        (
            azure_like("ServiceRequestError", "connection refused"),
            "cannot be reached",
            "azure_timeout",
        ),
        (ConnectionRefusedError("refused"), "cannot be reached", "proxy"),
        (
            AttributeError("'NoneType' object has no attribute 'group'"),
            "could not use the tracking URI",
            "resourceGroups",
        ),
        (_Coded("UNAUTHENTICATED", "401"), "Azure sign-in failed", "az login"),
        (_Coded("PERMISSION_DENIED", "403"), "refused access", "has a role"),
        (RuntimeError("odd"), "RuntimeError: odd", "az login"),
    ],
)
def test_failures_become_one_line_with_a_fix(exc: Exception, reason: str, fix: str) -> None:
    failure = _azure.explain(exc)
    assert isinstance(failure, TrackingError)
    assert reason in failure.reason
    assert fix in failure.fix
    assert "\n" not in str(failure)
    assert isinstance(failure, ImportError) == isinstance(exc, ImportError)


@pytest.mark.parametrize(
    "cause", [_Coded("UNAUTHENTICATED", "401"), ConnectionRefusedError("refused")]
)
def test_the_store_check_is_explained_by_what_the_store_raised(cause: Exception) -> None:
    # check_store goes through Store, which wraps a transient error in StoreUnavailableError.
    try:
        raise StoreUnavailableError("no answer", uri="u", operation="ping", waited=1.0) from cause
    except StoreUnavailableError as wrapped:
        assert _azure.explain(wrapped).reason == _azure.explain(cause).reason


def test_failure_text_is_cut_and_masks_credentials() -> None:
    exc = RuntimeError(
        "GET https://user:hunter2@example.invalid/x?sig=abcdef&sv=2020 failed " + "x" * 500
    )
    failure = _azure.explain(exc)
    assert "hunter2" not in str(failure) and "abcdef" not in str(failure)
    assert len(failure.reason) < 300


@pytest.mark.skipif(not HAS_AZUREML, reason="needs the azure extra (azure-core)")
def test_real_azure_exceptions_are_classified() -> None:
    from azure.core.exceptions import (
        ClientAuthenticationError,
        ResourceNotFoundError,
        ServiceRequestError,
    )
    from azure.identity import CredentialUnavailableError

    assert "sign-in" in _azure.explain(ClientAuthenticationError("no")).reason
    assert "sign-in" in _azure.explain(CredentialUnavailableError("no")).reason
    assert "not found" in _azure.explain(ResourceNotFoundError("no")).reason
    assert "cannot be reached" in _azure.explain(ServiceRequestError("no")).reason


def job_env(**extra: str) -> dict[str, str]:
    return {"AZUREML_RUN_ID": "job1", "MLFLOW_RUN_ID": "job1", "MLFLOW_TRACKING_URI": "u", **extra}


@pytest.mark.parametrize(
    ("environ", "uri", "expected"),
    [
        (job_env(), "u", "job1"),
        (job_env(AZUREML_RUN_ID="", AZUREML_ARM_WORKSPACE_NAME="ws"), "u", "job1"),
        ({"MLFLOW_RUN_ID": "job1", "MLFLOW_TRACKING_URI": "u"}, "u", None),  # not a job
        (job_env(MLFLOW_RUN_ID=""), "u", None),  # a job without an MLflow run
        (job_env(MLFLOW_RUN_ID="other"), "u", None),  # a run handed to us, not the job's
        (job_env(TRAINKIT_PARENT_RUN_ID="p"), "u", None),  # a handed-over subprocess
        (job_env(TRAINKIT_RUN_ID="job1"), "u", None),
        (job_env(), "sqlite:///local.db", None),  # fell back, or another store given
    ],
)
def test_when_a_job_run_is_adopted(environ: dict[str, str], uri: str, expected: str | None) -> None:
    assert _azure.job_run_id(environ, uri) == expected


def test_token_sign_in_run_is_handed_on_only_for_azure() -> None:
    env = {"MLFLOW_TRACKING_TOKEN": "t", "MLFLOW_RUN_ID": "job1"}
    assert _azure.token_auth_run_id(env, AZURE_URI) == "job1"
    assert _azure.token_auth_run_id(env, "sqlite:///local.db") is None
    assert _azure.token_auth_run_id({"MLFLOW_RUN_ID": "job1"}, AZURE_URI) is None


@pytest.mark.azure
@pytest.mark.skipif(not HAS_AZUREML, reason="needs the azure extra (CI's .venv-azure)")
def test_azureml_mlflow_is_imported_only_for_an_azure_uri(tmp_path: Any) -> None:
    code = (
        "import sys, warnings; warnings.simplefilter('ignore'); "
        "from trainkit_tracking import Tracker; "
        "Tracker('e', sys.argv[1], azure_timeout=3).resolve_tracking_uri(); "
        "print('azureml.mlflow' in sys.modules)"
    )
    loaded: dict[str, str] = {}
    for uri in (f"sqlite:///{tmp_path}/never.db", "azureml://bad", AZURE_URI):
        result = subprocess.run(
            [sys.executable, "-c", code, uri], capture_output=True, text=True, timeout=60
        )
        assert result.returncode == 0, result.stderr[-2000:]
        loaded[uri.split(":")[0] if uri != "azureml://bad" else "bad"] = result.stdout.split()[-1]
    assert loaded == {"sqlite": "False", "bad": "False", "azureml": "True"}


# Job-run adoption against a real local store -----------------------------------------


@pytest.fixture
def azure_job(trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """A simulated Azure ML job: its run pre-created in the store, the job's variables set."""
    client = MlflowClient(trainkit_store.uri)
    experiment_id = client.create_experiment("ner-job")
    job_run = client.create_run(experiment_id, run_name="olive_kettle_display").info.run_id
    monkeypatch.setenv("AZUREML_RUN_ID", job_run)
    monkeypatch.setenv("AZUREML_ARM_WORKSPACE_NAME", "ws-ner")
    monkeypatch.setenv("AZUREML_EXPERIMENT_ID", "azure-experiment-guid")
    monkeypatch.setenv("MLFLOW_RUN_ID", job_run)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "ner-job")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_ID", experiment_id)
    yield job_run


def test_top_level_run_adopts_the_jobs_run(trainkit_store: TrainkitStore, azure_job: str) -> None:
    client = MlflowClient(trainkit_store.uri)
    tracker = Tracker.from_env()
    assert tracker.platform == "azureml"
    with tracker.start_run(sweep_spec()) as sweep:
        assert sweep.id == azure_job
        policy_name = f"sweep_1 {STUDY[:8]}_nerstudy distilbert"
        assert sweep.name == policy_name
        with (
            sweep.child("hpo_trial", trial_number=0, trial_key_hash="t0") as trial,
            trial.child("hpo_trial_fold", fold_idx=1) as fold,
        ):
            fold.log_metric("f1", 0.5)
        sweep.log_metric("best_f1", 0.5)
    job = client.get_run(azure_job)
    tags = job.data.tags
    assert tags["code.run_name"] == policy_name
    assert tags["mlflow.runName"] == "olive_kettle_display"  # Azure shows the job's name
    assert tags["code.run_kind"] == "hpo_sweep"
    assert tags["code.env"] == "azureml"
    assert tags["azureml.runType"] == "sweep" and tags["azureml.sweep"] == "true"
    assert job.info.status == "RUNNING"  # Azure ML owns it: the SDK never ends it
    assert job.data.metrics["best_f1"] == 0.5
    trial_run = client.get_run(trial.id)
    assert trial_run.data.tags["mlflow.parentRunId"] == azure_job
    assert trial_run.data.tags["azureml.trial"] == "true"
    assert trial_run.info.status == "FINISHED"
    assert client.get_run(fold.id).data.tags["mlflow.parentRunId"] == trial.id
    top_level = client.search_runs([job.info.experiment_id], "tags.`code.run_kind` = 'hpo_sweep'")
    assert [r.info.run_id for r in top_level] == [azure_job]  # no second top-level run


def test_job_run_status_survives_a_failure(trainkit_store: TrainkitStore, azure_job: str) -> None:
    tracker = Tracker.from_env()
    with pytest.raises(ValueError, match="boom"), tracker.start_run(sweep_spec()) as sweep:
        child = sweep.child("hpo_trial", trial_number=3)
        child.end("FAILED")
        raise ValueError("boom")
    client = MlflowClient(trainkit_store.uri)
    assert client.get_run(azure_job).info.status == "RUNNING"
    assert client.get_run(child.id).info.status == "FAILED"


def test_same_identity_readopts_and_another_gets_its_own_run(
    trainkit_store: TrainkitStore, azure_job: str
) -> None:
    tracker = Tracker.from_env()
    first = tracker.start_run(sweep_spec())
    first.end()
    again = Tracker.from_env().start_run(sweep_spec())
    assert (again.id, again.name) == (azure_job, first.name)  # no new version claimed
    final = tracker.start_run(
        RunSpec(kind="final_training", model="distilbert", spec_fp="abc123de99", exec_fp="fe98")
    )
    assert final.id != azure_job
    client = MlflowClient(trainkit_store.uri)
    assert client.get_run(azure_job).data.tags["code.run_kind"] == "hpo_sweep"
    assert client.get_run(final.id).data.tags.get("mlflow.parentRunId") is None
    final.end()
    assert client.get_run(final.id).info.status == "FINISHED"


def test_fallback_pattern_uses_the_job_run_id(
    trainkit_store: TrainkitStore, azure_job: str
) -> None:
    run = Tracker.from_env().start_run(RunSpec(kind="final_training", model="bert"))
    assert run.id == azure_job
    assert run.name == f"final {azure_job[:8]} bert"
    tags = MlflowClient(trainkit_store.uri).get_run(azure_job).data.tags
    assert tags["code.run_name"] == run.name


def test_children_and_explicit_parents_never_adopt(
    trainkit_store: TrainkitStore, azure_job: str
) -> None:
    tracker = Tracker.from_env()
    outside = MlflowClient(trainkit_store.uri).create_run(tracker.experiment_id).info.run_id
    child = tracker.start_run(sweep_spec().child("hpo_trial", trial_number=1), parent=outside)
    assert child.id not in (azure_job, outside)
    assert child.parent_id == outside
    tags = MlflowClient(trainkit_store.uri).get_run(azure_job).data.tags
    assert "code.run_kind" not in tags  # the job's run was left alone


def test_another_store_than_the_jobs_does_not_adopt(
    trainkit_store: TrainkitStore, azure_job: str
) -> None:
    other = f"sqlite:///{trainkit_store.root / 'other' / 'mlflow.db'}"
    run = Tracker("elsewhere", other).start_run(sweep_spec())
    assert run.id != azure_job
    assert run.name.startswith("sweep_1 ")  # an ordinary run of its own, named by the policy
    assert MlflowClient(other).get_run(run.id).data.tags["code.env"] == "azureml"
    run.end()


def test_mlflow_run_id_outside_a_job_is_not_adopted(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient(trainkit_store.uri)
    stray = client.create_run(client.create_experiment("e")).info.run_id
    monkeypatch.setenv("MLFLOW_RUN_ID", stray)
    run = Tracker("e").start_run(sweep_spec(environment="local"))
    assert run.id != stray
    run.end()
    assert "code.run_kind" not in client.get_run(stray).data.tags


def test_handover_from_an_adopted_run(trainkit_store: TrainkitStore, azure_job: str) -> None:
    tracker = Tracker.from_env()
    run = tracker.start_run(sweep_spec())
    joined = run.subprocess_env()
    assert joined["MLFLOW_RUN_ID"] == joined["TRAINKIT_RUN_ID"] == azure_job
    child = run.subprocess_env(child=sweep_spec().child("hpo_trial", trial_number=0))
    assert "MLFLOW_RUN_ID" not in child  # a local store needs no job token sign-in
    assert "AZUREML_ARTIFACTS_DEFAULT_TIMEOUT" not in child  # Azure URIs only
    assert child["TRAINKIT_PARENT_RUN_ID"] == azure_job
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from trainkit_tracking import Tracker; r = Tracker.from_env().attach(); "
            "r.end(); print(r.id, r.parent_id)",
        ],
        env=child,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    child_id, parent_id = result.stdout.split()
    assert parent_id == azure_job and child_id != azure_job
    joined_result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from trainkit_tracking import Tracker; r = Tracker.from_env().attach(); "
            "r.end(); print(r.id, r.spec.kind.value, r.spec.study_key_hash)",
        ],
        env=joined,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert joined_result.returncode == 0, joined_result.stderr
    assert joined_result.stdout.split() == [azure_job, "hpo_sweep", STUDY]
    status = MlflowClient(trainkit_store.uri).get_run(azure_job).info.status
    assert status == "RUNNING"  # neither the joiner nor anyone else ends the job's run


# Fallbacks, in subprocesses with a time bound -----------------------------------------

FALLBACK_SCRIPT = textwrap.dedent(
    """
    import json, os, socket, sys, time, warnings
    started = time.monotonic()
    from trainkit_tracking import RunSpec, Tracker, TrackingError, TrackingWarning
    timeout = float(sys.argv[1])
    out = {"guard": bool(getattr(socket.getaddrinfo, "__trainkit_netguard__", False))}
    spec = RunSpec(kind="hpo_sweep", model="distilbert", study_key_hash="350a79aa0000ffff")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker.from_env(azure_timeout=timeout)
        uri, experiment_id = tracker.setup()
        run = tracker.start_run(spec)
        joined = run.subprocess_env()
        child = run.subprocess_env(child=spec.child("hpo_trial", trial_number=0))
        run.end()
        tracker.start_run(spec).end()
    out.update(
        uri=uri,
        source=tracker.uri_source,
        fell_back=tracker.fell_back_to_local,
        run_id=run.id,
        experiment_id=experiment_id,
        warnings=[str(w.message) for w in caught if issubclass(w.category, TrackingWarning)],
        joined_run=joined.get("MLFLOW_RUN_ID"),
        child_run=child.get("MLFLOW_RUN_ID"),
        handed_uri=child["MLFLOW_TRACKING_URI"],
        handed_experiment=child["MLFLOW_EXPERIMENT_ID"],
        handed_timeout=child.get("AZUREML_ARTIFACTS_DEFAULT_TIMEOUT"),
        own_timeout=os.environ.get("AZUREML_ARTIFACTS_DEFAULT_TIMEOUT"),
        fallback_elapsed=time.monotonic() - started,
    )
    strict_started = time.monotonic()
    try:
        Tracker.from_env(fallback_to_local=False, azure_timeout=timeout).setup()
        out["strict"] = None
    except TrackingError as exc:
        out["strict"] = {"message": str(exc), "import_error": isinstance(exc, ImportError)}
    out["strict_elapsed"] = time.monotonic() - strict_started
    print(json.dumps(out))
    """
)


def run_fallback(
    trainkit_store: TrainkitStore, extra: dict[str, str], timeout: float
) -> dict[str, Any]:
    env = dict(os.environ)  # keeps the network guard (PYTHONPATH, TRAINKIT_NETGUARD)
    env.pop("MLFLOW_TRACKING_URI", None)
    env.update({"MLFLOW_EXPERIMENT_NAME": "ner", **extra})
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-c", FALLBACK_SCRIPT, str(timeout)],
        env=env,
        cwd=trainkit_store.root,
        capture_output=True,
        text=True,
        timeout=4 * timeout + 60,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stderr[-3000:]
    out: dict[str, Any] = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["guard"], "the subprocess must run under the loopback-only network guard"
    out["elapsed"] = elapsed
    out["output"] = result.stdout + result.stderr
    local_uri = f"sqlite:///{trainkit_store.root.resolve()}/mlruns/mlflow.db"
    assert out["uri"] == out["handed_uri"] == local_uri
    assert out["source"] == "local store"
    assert out["fell_back"] is True
    assert len(out["warnings"]) == 1, out["warnings"]  # once per Tracker
    warning = out["warnings"][0]
    assert "\n" not in warning
    assert warning.startswith("Azure ML tracking is not available: ")
    assert "using the local store instead" in warning and "to fix it, " in warning
    # No Azure run id or experiment is handed on: the local run is the one handed over.
    client = MlflowClient(local_uri)
    assert client.get_run(out["run_id"]).info.status == "FINISHED"
    assert out["joined_run"] == out["run_id"]
    assert out["child_run"] is None
    assert out["handed_experiment"] == out["experiment_id"]
    assert client.get_experiment(out["experiment_id"]).name == "ner"
    # AZUREML_ARTIFACTS_DEFAULT_TIMEOUT is never set after a fallback.
    assert out["own_timeout"] is None and out["handed_timeout"] is None
    assert out["strict"] is not None, "fallback_to_local=False must raise"
    assert out["strict"]["message"].startswith("Azure ML tracking is not available: ")
    assert FAKE_TOKEN_SECRET not in out["output"]
    assert "s3cret-client-value" not in out["output"]
    return out


def job_on_azure(token: bool = True) -> dict[str, str]:
    env = {
        "MLFLOW_TRACKING_URI": AZURE_URI,
        "AZUREML_RUN_ID": JOB_NAME,
        "MLFLOW_RUN_ID": JOB_NAME,
        "AZUREML_ARM_WORKSPACE_NAME": "ws-ner",
        "MLFLOW_EXPERIMENT_ID": "4f1e7d1c-0000-0000-0000-azureexperim",
    }
    if token:
        env["MLFLOW_TRACKING_TOKEN"] = fake_job_token()
    return env


WORKSPACE_ENV = {
    "AZURE_SUBSCRIPTION_ID": "0000aaaa-0000-0000-0000-000000000000",
    "AZURE_RESOURCE_GROUP": "rg-ner",
    "AZUREML_WORKSPACE_NAME": "ws-ner",
    "AZURE_TENANT_ID": "0000bbbb-0000-0000-0000-000000000000",
    "AZURE_CLIENT_ID": "0000cccc-0000-0000-0000-000000000000",
    "AZURE_CLIENT_SECRET": "s3cret-client-value",
}


@pytest.mark.skipif(HAS_AZUREML, reason="checks the path where the azure extra is absent")
@pytest.mark.parametrize("case", ["job uri", "workspace"])
def test_fallback_when_the_azure_extra_is_missing(trainkit_store: TrainkitStore, case: str) -> None:
    extra = job_on_azure() if case == "job uri" else WORKSPACE_ENV
    out = run_fallback(trainkit_store, extra, timeout=20)
    assert 'pip install "trainkit-tracking[azure]"' in out["warnings"][0]
    assert "not installed" in out["warnings"][0]
    assert out["strict"]["import_error"] is True  # a missing extra is an ImportError too
    assert 'pip install "trainkit-tracking[azure]"' in out["strict"]["message"]
    assert out["elapsed"] < 60


def test_fallback_for_a_malformed_uri(trainkit_store: TrainkitStore) -> None:
    out = run_fallback(trainkit_store, {"MLFLOW_TRACKING_URI": "azureml://bad"}, timeout=20)
    assert "'azureml://bad' is not an Azure ML workspace URI" in out["warnings"][0]
    assert "AttributeError" not in out["output"]
    assert out["strict"]["import_error"] is False
    assert out["elapsed"] < 60


@pytest.mark.azure
@pytest.mark.skipif(not HAS_AZUREML, reason="needs the azure extra (CI's .venv-azure)")
@pytest.mark.parametrize(
    ("case", "reason"),
    [
        # Job token sign-in: the REST call to the region host fails at the socket, and
        # mlflow retries it with backoff, so the bound ends it.
        ("job uri", "did not answer within 8 s"),
        # No token: DefaultAzureCredential tries IMDS and the login host, both refused.
        ("job uri without token", "Azure sign-in failed"),
        # azure-ai-ml looks the workspace up: the service principal cannot sign in.
        ("workspace", "Azure sign-in failed"),
    ],
)
def test_fallback_when_the_workspace_is_unreachable(
    trainkit_store: TrainkitStore, case: str, reason: str
) -> None:
    extra = {
        "job uri": job_on_azure(),
        "job uri without token": job_on_azure(token=False),
        "workspace": WORKSPACE_ENV,
    }[case]
    # The sign-in cases fail on their own (about 5 s of Azure's credential chain on a quiet
    # machine, more under load): their bound is wide enough that the failure comes first.
    bound = 8 if reason.startswith("did not answer") else 20
    out = run_fallback(trainkit_store, extra, timeout=bound)
    assert reason in out["warnings"][0], out["warnings"][0]
    assert reason in out["strict"]["message"]
    # Bounded: each Azure step gives up after azure_timeout (lookup + store check).
    assert out["fallback_elapsed"] < 2 * bound + 10
    assert out["strict_elapsed"] < 2 * bound + 5


@pytest.fixture
def silent_listener() -> Iterator[int]:
    """A loopback port that accepts connections and never answers (a black-holed host)."""
    server = socket.create_server(("127.0.0.1", 0))
    accepted: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                accepted.append(server.accept()[0])
            except OSError:
                continue

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in accepted:
            conn.close()
        server.close()


@pytest.mark.azure
@pytest.mark.skipif(not HAS_AZUREML, reason="needs the azure extra (CI's .venv-azure)")
def test_a_workspace_that_never_answers_is_cut_off_by_azure_timeout(
    trainkit_store: TrainkitStore, silent_listener: int
) -> None:
    uri = AZURE_URI.replace("eastus.api.azureml.ms", f"127.0.0.1:{silent_listener}")
    out = run_fallback(trainkit_store, {**job_on_azure(), "MLFLOW_TRACKING_URI": uri}, timeout=3)
    assert "the Azure ML workspace did not answer within 3 s" in out["warnings"][0]
    assert "azure_timeout" in out["warnings"][0]
    assert 3 <= out["strict_elapsed"] < 3 + 3


# A stand-in workspace on loopback: the Azure path end to end -----------------------------

WORKSPACE_CHILD = textwrap.dedent(
    """
    import json, warnings
    from trainkit_tracking import Tracker, TrackingWarning
    out = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        tracker = Tracker.from_env(azure_timeout=20)
        try:
            run = tracker.attach()
            run.log_metric("f1", 0.75, step=1)
            run.end()
            out.update(id=run.id, parent=run.parent_id, error=None)
        except Exception as exc:
            out["error"] = f"{type(exc).__name__}: {exc}"
    out["fell_back"] = tracker.fell_back_to_local
    out["warnings"] = [str(w.message) for w in caught if issubclass(w.category, TrackingWarning)]
    print(json.dumps(out))
    """
)


@pytest.fixture
def workspace_job(
    trainkit_store: TrainkitStore,
    trainkit_server: Any,
    tmp_path: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> Iterator[tuple[Any, str, MlflowClient]]:
    """An Azure ML job whose workspace is a FakeWorkspace in front of the session server."""
    pytest.importorskip("cryptography")
    from azure_workspace import FakeWorkspace

    upstream = MlflowClient(trainkit_server.uri)
    name = f"ner-job-{time.monotonic_ns()}"
    experiment_id = upstream.create_experiment(name)
    job_run = upstream.create_run(experiment_id, run_name="olive_kettle_display").info.run_id
    token = fake_job_token()
    with FakeWorkspace(trainkit_server.uri, token, tmp_path) as workspace:
        for key, value in {
            "REQUESTS_CA_BUNDLE": str(workspace.cert),
            "MLFLOW_TRACKING_URI": workspace.uri,
            "MLFLOW_TRACKING_TOKEN": token,
            "MLFLOW_RUN_ID": job_run,
            "AZUREML_RUN_ID": job_run,
            "AZUREML_ARM_WORKSPACE_NAME": "ws-ner",
            "MLFLOW_EXPERIMENT_NAME": name,
            "MLFLOW_EXPERIMENT_ID": experiment_id,
        }.items():
            monkeypatch.setenv(key, value)
        yield workspace, job_run, upstream


def run_workspace_child(env: dict[str, str]) -> dict[str, Any]:
    result = subprocess.run(
        [sys.executable, "-c", WORKSPACE_CHILD],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert FAKE_TOKEN_SECRET not in result.stdout + result.stderr
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.azure
@pytest.mark.skipif(not HAS_AZUREML, reason="needs the azure extra (CI's .venv-azure)")
def test_job_on_a_workspace_end_to_end(workspace_job: tuple[Any, str, MlflowClient]) -> None:
    workspace, job_run, upstream = workspace_job
    tracker = Tracker.from_env(azure_timeout=20)
    uri, _ = tracker.setup()
    assert (uri, tracker.uri_source, tracker.fell_back_to_local) == (
        workspace.uri,
        "MLFLOW_TRACKING_URI",
        False,
    )
    assert os.environ["AZUREML_ARTIFACTS_DEFAULT_TIMEOUT"] == "600"
    with tracker.start_run(sweep_spec()) as sweep:
        assert sweep.id == job_run
        with sweep.child("hpo_trial", trial_number=0) as trial:
            trial.log_metric("f1", 0.5)
        child_env = sweep.subprocess_env(child=sweep_spec().child("hpo_trial", trial_number=1))
        # The job's run id stays, so that azureml-mlflow signs the child in with the job token.
        assert child_env["MLFLOW_RUN_ID"] == job_run
        assert child_env["AZUREML_ARTIFACTS_DEFAULT_TIMEOUT"] == "600"
        handed = run_workspace_child(child_env)
        assert handed["error"] is None and handed["warnings"] == []
        assert handed["fell_back"] is False and handed["parent"] == job_run
        # Without it the child cannot sign in (DefaultAzureCredential finds nothing here):
        # it falls back to the local store, where the handed parent run does not exist.
        without = {k: v for k, v in child_env.items() if k != "MLFLOW_RUN_ID"}
        refused = run_workspace_child(without)
        assert refused["fell_back"] is True and refused["error"] is not None
        assert "Azure sign-in failed" in refused["warnings"][0]
    job = upstream.get_run(job_run)
    assert job.info.status == "RUNNING"  # the SDK leaves the job's run to Azure ML
    assert job.data.tags["code.run_name"] == sweep.name
    assert job.data.tags["mlflow.runName"] == "olive_kettle_display"
    assert job.data.tags["azureml.runType"] == "sweep"
    for child in (trial.id, handed["id"]):
        record = upstream.get_run(child)
        assert record.data.tags["mlflow.parentRunId"] == job_run
        assert record.info.status == "FINISHED"
    assert upstream.get_run(handed["id"]).data.metrics["f1"] == 0.75
    # azureml-mlflow itself skips status updates of the run whose id is AZUREML_RUN_ID.
    MlflowClient(workspace.uri).set_terminated(job_run, "FAILED")
    assert upstream.get_run(job_run).info.status == "RUNNING"
    assert all(authorised for _, _, authorised in workspace.requests)
    assert any(path.endswith("/api/2.0/mlflow/runs/create") for _, path, _ in workspace.requests)


@pytest.mark.azure
@pytest.mark.skipif(not HAS_AZUREML, reason="needs the azure extra (CI's .venv-azure)")
def test_artifacts_timeout_already_set_is_kept(
    workspace_job: tuple[Any, str, MlflowClient], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("AZUREML_ARTIFACTS_DEFAULT_TIMEOUT", "1800")
    tracker = Tracker.from_env(azure_timeout=20)
    tracker.setup()
    assert os.environ["AZUREML_ARTIFACTS_DEFAULT_TIMEOUT"] == "1800"
    assert tracker.handover_env()["AZUREML_ARTIFACTS_DEFAULT_TIMEOUT"] == "1800"


# Live -----------------------------------------------------------------------------------

LIVE_VARS = (
    "AZURE_SUBSCRIPTION_ID",
    "AZURE_RESOURCE_GROUP",
    "AZUREML_WORKSPACE_NAME",
    "AZURE_TENANT_ID",
    "AZURE_CLIENT_ID",
    "AZURE_CLIENT_SECRET",
)
_LIVE_ENV = {name: os.environ.get(name, "") for name in (*LIVE_VARS, "TRAINKIT_AZURE_LIVE")}


def _live_skip_reason() -> str | None:
    if not HAS_AZUREML:
        return "live Azure ML test: the azure extra is not installed"
    if _LIVE_ENV["TRAINKIT_AZURE_LIVE"] != "1":
        return "live Azure ML test: set TRAINKIT_AZURE_LIVE=1 (it leaves loopback) to run it"
    missing = [name for name in LIVE_VARS if not _LIVE_ENV[name]]
    if missing:
        return f"live Azure ML test: Azure credentials are not set ({', '.join(missing)})"
    return None


LIVE_SCRIPT = textwrap.dedent(
    """
    import json, os
    from mlflow.tracking import MlflowClient
    from trainkit_tracking import RunSpec, Tracker
    tracker = Tracker("trainkit-tracking-live", fallback_to_local=False, azure_timeout=120)
    uri, _ = tracker.setup()
    spec = RunSpec(kind="hpo_sweep", model="distilbert", study_key_hash="11ee11ee22ff22ff")
    with tracker.start_run(spec) as sweep:
        with sweep.child("hpo_trial", trial_number=0) as trial:
            trial.log_metric("f1", 0.5, step=1)
            trial.log_params({"lr": 0.01})
    client = MlflowClient(uri)
    print(json.dumps({
        "uri": uri,
        "source": tracker.uri_source,
        "timeout": os.environ.get("AZUREML_ARTIFACTS_DEFAULT_TIMEOUT"),
        "parent": client.get_run(trial.id).data.tags.get("mlflow.parentRunId"),
        "sweep": sweep.id,
        "f1": client.get_run(trial.id).data.metrics.get("f1"),
        "status": client.get_run(trial.id).info.status,
        "url": sweep.url,
    }))
    """
)


@pytest.mark.azure
@pytest.mark.skipif(_live_skip_reason() is not None, reason=str(_live_skip_reason()))
def test_live_workspace(tmp_path: Any) -> None:
    env = {**os.environ, **{k: v for k, v in _LIVE_ENV.items() if v}, "TRAINKIT_NETGUARD": "0"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", LIVE_SCRIPT],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    assert out["uri"].startswith("azureml://")
    assert out["source"] == "azure workspace"
    assert out["timeout"] == "600"
    assert out["parent"] == out["sweep"]
    assert out["f1"] == 0.5 and out["status"] == "FINISHED"
    assert _LIVE_ENV["AZURE_CLIENT_SECRET"] not in result.stdout + result.stderr


# docs/versions.md: a version claim is a param of the experiment's claims run, and only
# one value of a param may go in. Azure ML does not document what it does with a second,
# different value; this checks what the workspace does today.
LIVE_CLAIM_SCRIPT = textwrap.dedent(
    """
    import json, uuid
    from trainkit_tracking import Tracker
    from trainkit_tracking._store import claims
    tracker = Tracker("trainkit-tracking-live", fallback_to_local=False, azure_timeout=120)
    uri, experiment_id = tracker.setup()
    store = tracker.store
    base = f"live-claims-{uuid.uuid4().hex[:8]}"
    first = claims.claim_version(store, experiment_id, base)
    view = claims.claims_of(store).view(experiment_id)
    key = f"{claims.version_prefix(base)}.{first}"
    try:
        store.client.log_param(view.open[0], key, "someone else")
        outcome = "changed"
    except Exception as exc:
        outcome = "refused"
    print(json.dumps({
        "outcome": outcome,
        "first": first,
        "second": claims.claim_version(store, experiment_id, base),
        "slash": [e.name for e in store.list_experiments() if "/" in e.name],
    }))
    """
)


@pytest.mark.azure
@pytest.mark.skipif(_live_skip_reason() is not None, reason=str(_live_skip_reason()))
def test_live_claims_refuse_a_second_value(tmp_path: Any) -> None:
    env = {**os.environ, **{k: v for k, v in _LIVE_ENV.items() if v}, "TRAINKIT_NETGUARD": "0"}
    for name in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID"):
        env.pop(name, None)
    result = subprocess.run(
        [sys.executable, "-c", LIVE_CLAIM_SCRIPT],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    # A param that took a second value would hand the same version to two runs.
    assert out["outcome"] == "refused", out
    assert out["second"] == out["first"] + 1, out
    assert out["slash"] == [], out
