"""Every environment variable name the package reads or hands on, declared once."""

from __future__ import annotations

import math
import os
from collections.abc import Mapping

from trainkit_tracking.errors import TrackingError

# MLflow's own variables.
MLFLOW_TRACKING_URI = "MLFLOW_TRACKING_URI"
MLFLOW_EXPERIMENT_NAME = "MLFLOW_EXPERIMENT_NAME"
MLFLOW_EXPERIMENT_ID = "MLFLOW_EXPERIMENT_ID"
MLFLOW_RUN_ID = "MLFLOW_RUN_ID"
MLFLOW_TRACKING_TOKEN = "MLFLOW_TRACKING_TOKEN"

# The seed pipeline's handover variables (honoured by Tracker.attach()).
MLFLOW_PARENT_RUN_ID = "MLFLOW_PARENT_RUN_ID"
MLFLOW_RUN_NAME = "MLFLOW_RUN_NAME"
MLFLOW_TRIAL_NUMBER = "MLFLOW_TRIAL_NUMBER"
MLFLOW_FOLD_IDX = "MLFLOW_FOLD_IDX"

# Our own handover protocol.
TRAINKIT_PREFIX = "TRAINKIT_"
TRAINKIT_RUN_ID = "TRAINKIT_RUN_ID"
TRAINKIT_PARENT_RUN_ID = "TRAINKIT_PARENT_RUN_ID"
TRAINKIT_RUN_SPEC = "TRAINKIT_RUN_SPEC"
TRAINKIT_SPOOL_DIR = "TRAINKIT_SPOOL_DIR"
TRAINKIT_PROJECT = "TRAINKIT_PROJECT"
TRAINKIT_TIMEOUT = "TRAINKIT_TIMEOUT"
TRAINKIT_EXIT_TIMEOUT = "TRAINKIT_EXIT_TIMEOUT"
# Who sends the spool (docs/logging.md): "process" (the default) or "thread".
TRAINKIT_SENDER = "TRAINKIT_SENDER"
TRAINKIT_SENDER_LINGER = "TRAINKIT_SENDER_LINGER"
TRAINKIT_MAX_MEMORY_MB = "TRAINKIT_MAX_MEMORY_MB"
# The naming policy of a Tracker built without policy=: default, seed, or a YAML path
# (docs/naming.md); a Tracker hands its own policy to subprocesses here, as JSON.
TRAINKIT_NAMING_POLICY = "TRAINKIT_NAMING_POLICY"
# The CV summary's metrics of a Tracker built without cv_metrics= (comma-separated names
# or patterns; docs/kfold-hpo.md); a Tracker hands its own to subprocesses here.
TRAINKIT_CV_METRICS = "TRAINKIT_CV_METRICS"
# Which service's limits a store keeps to (SPEC section 19): "azureml" makes any store
# behave as an Azure ML workspace (tests use it for a simulated one); "mlflow" or unset:
# decided by the URI.
TRAINKIT_STORE_FLAVOR = "TRAINKIT_STORE_FLAVOR"
STORE_FLAVORS = ("mlflow", "azureml")

# Variables removed from a subprocess environment before ours are added.
STALE_HANDOVER = (
    MLFLOW_RUN_ID,
    MLFLOW_PARENT_RUN_ID,
    MLFLOW_RUN_NAME,
    MLFLOW_TRIAL_NUMBER,
    MLFLOW_FOLD_IDX,
)

# Platform detection.
AZUREML_PLATFORM_VARS = ("AZUREML_RUN_ID", "AZUREML_ARM_WORKSPACE_NAME", "AZUREML_EXPERIMENT_ID")
COLAB_VARS = ("COLAB_RELEASE_TAG", "COLAB_GPU", "COLAB_TPU")
KAGGLE_VARS = ("KAGGLE_KERNEL_RUN_TYPE",)

# Azure ML workspace and jobs (a job's MLflow run id equals AZUREML_RUN_ID).
AZUREML_RUN_ID = "AZUREML_RUN_ID"
AZURE_SUBSCRIPTION_ID = "AZURE_SUBSCRIPTION_ID"
AZURE_RESOURCE_GROUP = "AZURE_RESOURCE_GROUP"
AZUREML_WORKSPACE_NAME = "AZUREML_WORKSPACE_NAME"
AZUREML_ARTIFACTS_DEFAULT_TIMEOUT = "AZUREML_ARTIFACTS_DEFAULT_TIMEOUT"

# Who created a run.
USER_VARS = ("USER", "USERNAME")

# Cache location for the spool.
XDG_CACHE_HOME = "XDG_CACHE_HOME"

# Distributed rank, in order of precedence after torch.distributed.
RANK_VARS = ("RANK", "SLURM_PROCID", "OMPI_COMM_WORLD_RANK", "PMI_RANK", "LOCAL_RANK")

# Run context tags and system metrics (docs/context.md).
TRAINKIT_CONTEXT = "TRAINKIT_CONTEXT"
TRAINKIT_CONTEXT_GIT = "TRAINKIT_CONTEXT_GIT"
TRAINKIT_SYSTEM_METRICS = "TRAINKIT_SYSTEM_METRICS"
TRAINKIT_SYSTEM_METRICS_INTERVAL = "TRAINKIT_SYSTEM_METRICS_INTERVAL"

# Where a run ran (code.slurm.*, code.node_rank, code.world_size) and which process samples.
SLURM_JOB_ID = "SLURM_JOB_ID"
SLURM_ARRAY_JOB_ID = "SLURM_ARRAY_JOB_ID"
SLURM_ARRAY_TASK_ID = "SLURM_ARRAY_TASK_ID"
SLURM_NODEID = "SLURM_NODEID"
SLURM_LOCALID = "SLURM_LOCALID"
GROUP_RANK = "GROUP_RANK"
LOCAL_RANK = "LOCAL_RANK"
WORLD_SIZE = "WORLD_SIZE"
DDP_VARS = ("RANK", LOCAL_RANK)  # either one set: a distributed launch
KAGGLE_KERNEL_RUN_TYPE = KAGGLE_VARS[0]  # "Batch" for a committed notebook: a job

# The notebook a Jupyter kernel runs (jupyter_server >= 2, VS Code).
NOTEBOOK_VARS = ("JPY_SESSION_NAME", "__vsc_ipynb_file__", "IPYNB_FILE")

# The GPUs this process may use.
CUDA_VISIBLE_DEVICES = "CUDA_VISIBLE_DEVICES"


def store_flavor(uri: str, environ: Mapping[str, str] | None = None) -> str:
    """``azureml`` for an ``azureml://`` URI, the store of the Azure ML job this process
    runs in, or ``TRAINKIT_STORE_FLAVOR=azureml``; else ``mlflow``."""
    environ = os.environ if environ is None else environ
    raw = environ.get(TRAINKIT_STORE_FLAVOR, "").strip().lower()
    if raw and raw not in STORE_FLAVORS:
        raise TrackingError(
            f"environment variable {TRAINKIT_STORE_FLAVOR}={raw!r} must be one of "
            f"{', '.join(STORE_FLAVORS)}; fix or unset it"
        )
    in_job = bool(environ.get(AZUREML_RUN_ID)) and environ.get(MLFLOW_TRACKING_URI) == uri
    if raw == "azureml" or uri.startswith("azureml://") or in_job:
        return "azureml"
    return "mlflow"


def read_int(environ: Mapping[str, str], name: str, *, minimum: int = 0) -> int | None:
    """``environ[name]`` as an int >= ``minimum``; None when unset or empty.

    A malformed value is a TrackingError naming the variable and its value: a silently
    ignored ``RANK=O`` would make every DDP rank think it is rank 0.
    """
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = int(raw)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise TrackingError(
            f"environment variable {name}={raw!r} must be a whole number >= {minimum}; fix or "
            "unset it"
        )
    return value


def read_seconds(environ: Mapping[str, str], name: str) -> float | None:
    """``environ[name]`` as a number of seconds > 0; None when unset or empty."""
    raw = environ.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = math.nan
    if not (value > 0 and math.isfinite(value)):
        raise TrackingError(
            f"environment variable {name}={raw!r} must be a number of seconds > 0 (e.g. 30); "
            "fix or unset it"
        )
    return value
