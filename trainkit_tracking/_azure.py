"""Everything Azure ML: scheme registration, workspace URI, job detection, bounded checks.

Imported only when the tracking URI, the arguments or the platform say Azure.
"""

from __future__ import annotations

import importlib
import threading
from collections.abc import Callable, Mapping
from typing import TypeVar

from trainkit_tracking import _env
from trainkit_tracking.errors import TrackingError

T = TypeVar("T")

SCHEME = "azureml://"
ARTIFACTS_TIMEOUT_DEFAULT = "600"
INSTALL_HINT = 'pip install "trainkit-tracking[azure]"'


def is_azure_uri(uri: str | None) -> bool:
    return bool(uri) and str(uri).startswith(SCHEME)


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
    """Run ``call`` in a daemon thread; raise TrackingError if it takes longer than ``timeout``."""
    result: list[T] = []
    error: list[BaseException] = []

    def target() -> None:
        try:
            result.append(call())
        except BaseException as exc:
            error.append(exc)

    thread = threading.Thread(target=target, name=f"trainkit-azure-{what}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        raise TrackingError(f"{what} did not answer within {timeout:g} s")
    if error:
        raise error[0]
    return result[0]


def register_scheme() -> None:
    """Import azureml.mlflow so that MLflow knows the ``azureml://`` scheme."""
    try:
        importlib.import_module("azureml.mlflow")
    except ImportError as exc:
        raise ImportError(
            f"an azureml:// tracking URI needs azureml-mlflow: {INSTALL_HINT}"
        ) from exc


def workspace_uri(subscription_id: str, resource_group: str, workspace_name: str) -> str:
    """The MLflow tracking URI of an Azure ML workspace (azure-ai-ml + azure-identity)."""
    try:
        from azure.ai.ml import MLClient
        from azure.identity import DefaultAzureCredential
    except ImportError as exc:
        raise ImportError(f"an Azure ML workspace needs the azure extra: {INSTALL_HINT}") from exc
    client = MLClient(
        DefaultAzureCredential(),
        subscription_id=subscription_id,
        resource_group_name=resource_group,
        workspace_name=workspace_name,
    )
    return str(client.workspaces.get(workspace_name).mlflow_tracking_uri)


def check_store(uri: str) -> None:
    """Make one cheap call against the store so that auth and reachability fail now."""
    from mlflow.tracking import MlflowClient

    MlflowClient(tracking_uri=uri).search_experiments(max_results=1)


def job_run_id(environ: Mapping[str, str]) -> str | None:
    """The run an Azure ML job pre-created for this process, if we are inside one."""
    if not any(environ.get(name) for name in _env.AZUREML_PLATFORM_VARS):
        return None
    return environ.get(_env.MLFLOW_RUN_ID) or None


def prepare(uri: str, *, timeout: float) -> None:
    """Register the scheme and check the workspace answers, all within ``timeout``."""
    register_scheme()
    try:
        bounded(lambda: check_store(uri), timeout=timeout, what="the Azure ML workspace")
    except TrackingError:
        raise
    except Exception as exc:
        raise TrackingError(f"the Azure ML workspace cannot be reached: {exc}") from exc
