"""A consumer's tests against the installed, pinned trainkit-tracking wheel (not the checkout)."""

from __future__ import annotations

import importlib.metadata
import os
import re
import sys
from pathlib import Path

from mlflow import MlflowClient

import trainkit_tracking
from trainkit_tracking import RunKind, RunSpec, Tracker, fingerprint
from trainkit_tracking.testing import TrainkitStore

HERE = Path(__file__).resolve().parent


def _pinned_version() -> str:
    text = (HERE / "requirements.txt").read_text(encoding="utf-8")
    match = re.search(r"^trainkit-tracking==(\S+)\s*$", text, re.M)
    assert match, "requirements.txt must pin trainkit-tracking==X.Y.Z exactly"
    return match.group(1)


def test_the_installed_wheel_is_the_pinned_version() -> None:
    pinned = _pinned_version()
    assert importlib.metadata.version("trainkit-tracking") == pinned
    assert trainkit_tracking.__version__ == pinned


def test_the_package_comes_from_site_packages_not_the_checkout() -> None:
    location = Path(trainkit_tracking.__file__).resolve()
    assert "site-packages" in location.parts, location
    assert location.is_relative_to(Path(sys.prefix).resolve()), (location, sys.prefix)
    checkout = os.environ.get("TRAINKIT_CHECKOUT")
    if checkout:  # set by .ci/consumer.sh
        assert not location.is_relative_to(Path(checkout).resolve()), location
    # A wheel, not an editable install: no .pth pointing back to a source tree.
    dist = importlib.metadata.distribution("trainkit-tracking")
    assert not any(str(f).endswith(".pth") for f in dist.files or []), dist.files
    assert (location.parent / "py.typed").is_file()


def test_a_sweep_with_a_trial_lands_in_the_plugin_store(trainkit_store: TrainkitStore) -> None:
    assert os.environ["MLFLOW_TRACKING_URI"] == trainkit_store.uri
    tracker = Tracker("consumer-example", project="consumer")
    study = fingerprint({"model": "tiny", "space": {"lr": [0.1, 0.01]}})
    sweep_spec = RunSpec(kind="hpo_sweep", model="tiny", study_key_hash=study)
    with tracker.start_run(sweep_spec) as sweep, sweep.child("hpo_trial", trial_number=0) as trial:
        trial.log_metric("val_loss", 0.25, step=1)
        trial.log_params({"optim": {"lr": 0.1}})
    assert tracker.tracking_uri == trainkit_store.uri

    client = MlflowClient(trainkit_store.uri)
    got_sweep = client.get_run(sweep.id)
    got_trial = client.get_run(trial.id)
    assert got_sweep.info.status == "FINISHED"
    assert got_trial.info.status == "FINISHED"
    assert got_trial.data.tags["mlflow.parentRunId"] == sweep.id
    assert got_trial.data.tags["code.run_kind"] == RunKind.HPO_TRIAL.value
    assert got_trial.info.experiment_id == got_sweep.info.experiment_id == tracker.experiment_id
    assert got_trial.data.metrics["val_loss"] == 0.25
    assert got_trial.data.params["optim.lr"] == "0.1"
    assert got_trial.info.run_name == trial.name
    assert tracker.find(sweep_spec) == [sweep.id]
