"""detect_platform() and the local store location, as pure functions."""

from __future__ import annotations

from pathlib import Path

import pytest

from trainkit_tracking import detect_platform
from trainkit_tracking._core.platform import local_store_path, local_store_uri


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({}, "local"),
        ({"AZUREML_RUN_ID": "x"}, "azureml"),
        ({"AZUREML_ARM_WORKSPACE_NAME": "ws"}, "azureml"),
        ({"AZUREML_EXPERIMENT_ID": "1"}, "azureml"),
        ({"MLFLOW_TRACKING_URI": "azureml://eastus.api.azureml.ms/mlflow/v1.0/x"}, "azureml"),
        ({"MLFLOW_TRACKING_URI": "http://127.0.0.1:5000"}, "local"),
        ({"COLAB_RELEASE_TAG": "release-1"}, "colab"),
        ({"COLAB_GPU": "1"}, "colab"),
        ({"COLAB_TPU": "1"}, "colab"),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Batch"}, "kaggle"),
        ({"KAGGLE_KERNEL_RUN_TYPE": "Batch", "AZUREML_RUN_ID": "r"}, "azureml"),
        ({"COLAB_GPU": ""}, "local"),
    ],
)
def test_detect_platform(environ: dict[str, str], expected: str) -> None:
    assert detect_platform(environ) == expected


def test_detect_platform_reads_os_environ_by_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLAB_GPU", "1")
    assert detect_platform() == "colab"


def test_local_store_paths(tmp_path: Path) -> None:
    assert local_store_path("local", cwd=tmp_path) == str(
        tmp_path.resolve() / "mlruns" / "mlflow.db"
    )
    assert local_store_path("azureml", cwd=tmp_path).endswith("/mlruns/mlflow.db")
    assert local_store_path("kaggle", cwd=tmp_path) == "/kaggle/working/mlflow.db"
    mounted = local_store_path("colab", cwd=tmp_path, project="ner", is_dir=lambda p: True)
    assert mounted == "/content/drive/MyDrive/ner-mlflow/mlflow.db"
    unmounted = local_store_path("colab", cwd=tmp_path, project="ner", is_dir=lambda p: False)
    assert unmounted == "/content/mlflow.db"


def test_local_store_uri_is_absolute_sqlite() -> None:
    assert local_store_uri("/a/b/mlflow.db") == "sqlite:////a/b/mlflow.db"
