"""Platform detection and the embedded local store location, as pure functions."""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path, PurePosixPath
from typing import Literal

from trainkit_tracking._core import env as _env

Platform = Literal["local", "colab", "kaggle", "azureml"]

COLAB_DRIVE = "/content/drive/MyDrive"


def detect_platform(environ: Mapping[str, str] | None = None) -> Platform:
    """Return ``azureml``, ``colab``, ``kaggle`` or ``local`` for an environment mapping."""
    env = os.environ if environ is None else environ
    if any(env.get(name) for name in _env.AZUREML_PLATFORM_VARS):
        return "azureml"
    if env.get(_env.MLFLOW_TRACKING_URI, "").startswith("azureml://"):
        return "azureml"
    if any(env.get(name) for name in _env.COLAB_VARS):
        return "colab"
    if any(env.get(name) for name in _env.KAGGLE_VARS):
        return "kaggle"
    return "local"


def local_store_path(
    platform: Platform,
    *,
    cwd: str | os.PathLike[str],
    project: str | None = None,
    is_dir: Callable[[str], bool] = os.path.isdir,
) -> str:
    """Return the absolute path of the embedded sqlite database for ``platform``.

    ``is_dir`` is the filesystem probe (injectable for tests): on Colab it tells
    whether Google Drive is mounted.
    """
    if platform == "colab":
        if is_dir(COLAB_DRIVE):
            folder = f"{project or 'trainkit'}-mlflow"
            return str(PurePosixPath(COLAB_DRIVE) / folder / "mlflow.db")
        return "/content/mlflow.db"
    if platform == "kaggle":
        return "/kaggle/working/mlflow.db"
    return str(Path(cwd).resolve() / "mlruns" / "mlflow.db")


def local_store_uri(path: str) -> str:
    """Return the sqlite URI of an absolute database path."""
    return (
        f"sqlite:///{Path(path).as_posix().lstrip('/')}" if os.name == "nt" else f"sqlite:///{path}"
    )
