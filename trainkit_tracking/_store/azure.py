"""Everything Azure ML: workspace URI, scheme registration, bounded checks, job detection.

The Azure packages (azureml-mlflow, azure-ai-ml, azure-identity) are imported only for an
``azureml://`` URI or a configured workspace; this module itself is cheap to import.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable, Mapping
from typing import NamedTuple, TypeVar

from trainkit_tracking._core import env as _env
from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._process import bounded as _timeout
from trainkit_tracking._store.store import Store
from trainkit_tracking.errors import StoreUnavailableError, TrackingError

T = TypeVar("T")

SCHEME = "azureml://"
ARTIFACTS_TIMEOUT_DEFAULT = "600"
INSTALL_HINT = 'pip install "trainkit-tracking[azure]"'
LOGIN_HINT = (
    "sign in with `az login`, or set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET "
    "(any credential DefaultAzureCredential accepts)"
)
URI_SHAPE = (
    "azureml://<region>.api.azureml.ms/mlflow/v1.0/subscriptions/<id>/resourceGroups/<group>"
    "/providers/Microsoft.MachineLearningServices/workspaces/<name>"
)
NETWORK_HINT = (
    "check that this machine reaches Azure (proxy, firewall, private endpoint) or raise "
    "Tracker(azure_timeout=...)"
)
WORKSPACE_HINT = (
    "check the subscription, resource group and workspace name (arguments or "
    "AZURE_SUBSCRIPTION_ID, AZURE_RESOURCE_GROUP, AZUREML_WORKSPACE_NAME) and that your "
    "identity has a role on the workspace"
)
_REASON_LIMIT = 240

# The shape azureml-mlflow parses (its _WORKSPACE_INFO_REGEX); anything else makes it fail
# with an AttributeError deep inside, so we check first and say what is wrong.
_WORKSPACE_URI = re.compile(
    r"^azureml://(?P<host>[^/?#]+)/mlflow/v[0-9.]+/subscriptions/(?P<subscription>[^/?#]+)"
    r"/resourceGroups/(?P<group>[^/?#]+)/providers/Microsoft\.MachineLearningServices"
    r"/workspaces/(?P<workspace>[^/?#]+)/?(?:\?[^#]*)?$"
)
# Tracking hosts of the Azure clouds -> their studio (the AML resource ids of azure-ai-ml).
_STUDIO_BY_HOST_SUFFIX = (
    (".api.azureml.ms", "https://ml.azure.com"),
    (".api.ml.azure.us", "https://ml.azure.us"),
    (".api.ml.azure.cn", "https://ml.azure.cn"),
)


class AzureUnavailable(TrackingError):
    """Azure ML tracking cannot be used here; ``reason`` says why and ``fix`` what to do."""

    def __init__(self, reason: str, fix: str) -> None:
        super().__init__(f"Azure ML tracking is not available: {reason}; to fix it, {fix}")
        self.reason = reason
        self.fix = fix


class AzureExtraMissing(AzureUnavailable, ImportError):
    """The azure extra is not installed (an ImportError too, as SPEC section 1 asks)."""


class Workspace(NamedTuple):
    """The parts of an Azure ML workspace tracking URI."""

    host: str
    subscription_id: str
    resource_group: str
    workspace_name: str


def is_azure_uri(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(SCHEME)


def parse_workspace_uri(uri: str) -> Workspace | None:
    """The workspace an ``azureml://`` tracking URI points at, or None when it is malformed."""
    match = _WORKSPACE_URI.match(uri)
    if match is None:
        return None
    return Workspace(match["host"], match["subscription"], match["group"], match["workspace"])


def workspace_configured(
    environ: Mapping[str, str],
    subscription_id: str | None,
    resource_group: str | None,
    workspace_name: str | None,
) -> tuple[str, str, str] | None:
    """The (subscription, resource group, workspace) triple, when all three are known."""
    sub = subscription_id or environ.get(_env.AZURE_SUBSCRIPTION_ID)
    group = resource_group or environ.get(_env.AZURE_RESOURCE_GROUP)
    workspace = workspace_name or environ.get(_env.AZUREML_WORKSPACE_NAME)
    if sub and group and workspace:
        return sub, group, workspace
    return None


def bounded(call: Callable[[], T], *, timeout: float, what: str) -> T:
    """Run ``call``; AzureUnavailable if it takes longer than ``timeout``."""
    try:
        return _timeout.bounded(call, timeout=timeout, what=what)
    except TimeoutError as exc:
        raise AzureUnavailable(str(exc), NETWORK_HINT) from exc


def register_scheme() -> None:
    """Import azureml.mlflow so that MLflow knows the ``azureml://`` scheme."""
    try:
        importlib.import_module("azureml.mlflow")
    except ImportError as exc:
        raise AzureExtraMissing(
            "an azureml:// tracking URI needs azureml-mlflow, which is not installed",
            INSTALL_HINT,
        ) from exc
    except Exception as exc:  # an azureml-mlflow that does not fit the installed mlflow
        raise AzureUnavailable(
            f"azureml-mlflow failed to import ({_one_line(exc)})",
            f"install matching versions with {INSTALL_HINT}",
        ) from exc


def check_uri(uri: str) -> Workspace:
    """The workspace of ``uri``; AzureUnavailable naming the expected shape when malformed."""
    workspace = parse_workspace_uri(uri)
    if workspace is None:
        raise AzureUnavailable(
            f"the tracking URI {redact_value(uri)!r} is not an Azure ML workspace URI",
            f"use the workspace's MLflow tracking URI ({URI_SHAPE})",
        )
    return workspace


def workspace_uri(subscription_id: str, resource_group: str, workspace_name: str) -> str:
    """The MLflow tracking URI of a workspace, looked up with azure-ai-ml (network)."""
    try:
        from azure.ai.ml import MLClient
        from azure.identity import DefaultAzureCredential
    except ImportError as exc:
        raise AzureExtraMissing(
            "an Azure ML workspace needs azure-ai-ml and azure-identity, which are not installed",
            INSTALL_HINT,
        ) from exc
    client = MLClient(
        DefaultAzureCredential(),
        subscription_id=subscription_id,
        resource_group_name=resource_group,
        workspace_name=workspace_name,
    )
    uri = client.workspaces.get(workspace_name).mlflow_tracking_uri
    if not uri:
        raise AzureUnavailable(
            f"workspace {workspace_name!r} has no MLflow tracking URI", WORKSPACE_HINT
        )
    return str(uri)


def check_store(uri: str, timeout: float) -> None:
    """Make one cheap call against the store so that auth and reachability fail now."""
    Store(uri, timeout=timeout, retries=False).ping()


def connect(uri: str | None, workspace: tuple[str, str, str] | None, *, timeout: float) -> str:
    """The checked Azure tracking URI: ``uri``, or the workspace's when ``uri`` is None.

    Looks the workspace up (if needed), registers the scheme and makes one call to the
    store, each network step within ``timeout`` seconds; every failure is an AzureUnavailable.
    """
    try:
        if uri is None:
            if workspace is None:
                raise ValueError("connect() needs a URI or a workspace")
            found = workspace
            uri = bounded(
                lambda: workspace_uri(*found), timeout=timeout, what="the Azure ML workspace lookup"
            )
        check_uri(uri)
        register_scheme()
        checked = uri
        bounded(
            lambda: check_store(checked, timeout), timeout=timeout, what="the Azure ML workspace"
        )
    except Exception as exc:
        raise explain(exc) from exc
    return uri


def _mro_names(exc: BaseException) -> set[str]:
    return {f"{cls.__module__}.{cls.__name__}" for cls in type(exc).__mro__}


def _one_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message, cut and with credentials masked."""
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else ""
    line = redact_value(line or type(exc).__name__)
    if len(line) > _REASON_LIMIT:
        line = line[: _REASON_LIMIT - 3] + "..."
    return line


def explain(exc: BaseException) -> AzureUnavailable:
    """Turn whatever Azure or azureml-mlflow raised into one clear reason and fix.

    Azure fails with azure.core.exceptions.AzureError subclasses (not MlflowException);
    classes are compared by name so that azure need not be importable here.
    """
    if isinstance(exc, AzureUnavailable):
        return exc
    if isinstance(exc, StoreUnavailableError) and exc.__cause__ is not None:
        exc = exc.__cause__  # Store's wrapper: the reason is what the store raised
    if isinstance(exc, ImportError):
        return AzureExtraMissing(
            f"a package of the azure extra is missing ({_one_line(exc)})", INSTALL_HINT
        )
    names = _mro_names(exc)
    status = getattr(exc, "status_code", None)  # azure.core's HttpResponseError
    code = getattr(exc, "error_code", None)  # MlflowException from the workspace's REST API
    if (
        "azure.core.exceptions.ClientAuthenticationError" in names
        or status == 401
        or code == "UNAUTHENTICATED"
    ):
        return AzureUnavailable(f"Azure sign-in failed ({_one_line(exc)})", LOGIN_HINT)
    if (
        "azure.core.exceptions.ResourceNotFoundError" in names
        or status in (403, 404)
        or code in ("PERMISSION_DENIED", "RESOURCE_DOES_NOT_EXIST")
    ):
        return AzureUnavailable(
            f"the workspace was not found or refused access ({_one_line(exc)})", WORKSPACE_HINT
        )
    if (
        "azure.core.exceptions.ServiceRequestError" in names
        or "azure.core.exceptions.ServiceResponseError" in names
        or isinstance(exc, OSError)
    ):
        return AzureUnavailable(f"the workspace cannot be reached ({_one_line(exc)})", NETWORK_HINT)
    if isinstance(exc, AttributeError):
        # azureml-mlflow's reaction to a URI it cannot parse.
        return AzureUnavailable(
            f"azureml-mlflow could not use the tracking URI ({_one_line(exc)})",
            f"use the workspace's MLflow tracking URI ({URI_SHAPE})",
        )
    return AzureUnavailable(
        f"the workspace cannot be used ({type(exc).__name__}: {_one_line(exc)})",
        f"{LOGIN_HINT}, and {NETWORK_HINT}",
    )


def job_run_id(environ: Mapping[str, str], tracking_uri: str) -> str | None:
    """The run an Azure ML job pre-created for this process, when this process should adopt it.

    Inside a job Azure ML sets ``AZUREML_*`` and ``MLFLOW_RUN_ID`` (equal to
    ``AZUREML_RUN_ID``: azureml-mlflow relies on that to leave the job's status alone).
    Not adopted by a subprocess that was handed a run (``TRAINKIT_*``), nor when the
    tracker uses another store than the job's ``MLFLOW_TRACKING_URI`` (after a fallback
    to local, or an explicit other URI): the job's run does not exist there.
    """
    if not any(environ.get(name) for name in _env.AZUREML_PLATFORM_VARS):
        return None
    run_id = environ.get(_env.MLFLOW_RUN_ID)
    if not run_id:
        return None
    azure_run = environ.get(_env.AZUREML_RUN_ID)
    if azure_run and azure_run != run_id:
        return None
    if environ.get(_env.TRAINKIT_RUN_ID) or environ.get(_env.TRAINKIT_PARENT_RUN_ID):
        return None
    if environ.get(_env.MLFLOW_TRACKING_URI) != tracking_uri:
        return None
    return run_id


def token_auth_run_id(environ: Mapping[str, str], tracking_uri: str) -> str | None:
    """The ``MLFLOW_RUN_ID`` a subprocess needs to sign in to Azure as this process does.

    azureml-mlflow signs in with the job's ``MLFLOW_TRACKING_TOKEN`` only while
    ``MLFLOW_RUN_ID`` is also set (``_mlflow_env_vars_set`` in its service context
    loader); without it a child process falls back to DefaultAzureCredential, which a
    job's compute usually cannot satisfy.
    """
    if not is_azure_uri(tracking_uri) or not environ.get(_env.MLFLOW_TRACKING_TOKEN):
        return None
    return environ.get(_env.MLFLOW_RUN_ID) or None


def studio_url(tracking_uri: str, run_id: str) -> str | None:
    """The Azure ML studio page of a run, derived from the tracking URI (no network)."""
    workspace = parse_workspace_uri(tracking_uri)
    if workspace is None:
        return None
    host = workspace.host.lower().split(":", 1)[0]
    for suffix, studio in _STUDIO_BY_HOST_SUFFIX:
        if host.endswith(suffix):
            return (
                f"{studio}/runs/{run_id}?wsid=/subscriptions/{workspace.subscription_id}"
                f"/resourcegroups/{workspace.resource_group}/workspaces/{workspace.workspace_name}"
            )
    return None
