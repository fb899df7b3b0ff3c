"""Mistyped inputs get a message that says what to do (SPEC section 18): tracking URIs, RunSpec
fields, names the CLI does not find; and a reaped run ends at its last sign of life."""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from click.testing import CliRunner, Result
from mlflow import MlflowClient
from pydantic import ValidationError

from trainkit_tracking import Lineage, RunSpec, Tracker, TrackingError, push
from trainkit_tracking.cli import cli
from trainkit_tracking.testing import TrainkitStore


def invoke(*args: str) -> Result:
    return CliRunner().invoke(cli, list(args))


def error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr
    return lines[0]


# Tracking URIs --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("uri", "needles"),
    [
        ("htp://127.0.0.1:5000", ["unknown scheme 'htp:'", "did you mean 'http'"]),
        ("127.0.0.1:5000", ["has no scheme", "did you mean 'http://127.0.0.1:5000'?"]),
        ("localhost:5000", ["has no scheme", "did you mean 'http://localhost:5000'?"]),
        ("sqlit:///tmp/x.db", ["unknown scheme 'sqlit:'", "did you mean 'sqlite'"]),
        ("/tmp/mlruns", ["has no scheme", "file store", "MLFLOW_ALLOW_FILE_STORE=true"]),
        ("file:///tmp/mlruns", ["file store", "MLFLOW_ALLOW_FILE_STORE=true", "sqlite:////"]),
    ],
)
def test_a_tracking_uri_mlflow_cannot_open_names_the_forms_that_work(
    trainkit_store: TrainkitStore, uri: str, needles: list[str]
) -> None:
    # fallback_to_local is for stores that do not answer, not for URIs that are wrong.
    with pytest.raises(TrackingError) as info:
        Tracker("exp", uri, fallback_to_local=True).setup()
    message = str(info.value)
    for needle in [*needles, repr(uri)]:
        assert needle in message
    if "file store" not in message or "no scheme" in message:
        assert "http://HOST:PORT" in message and "sqlite:////abs/path/mlflow.db" in message
    assert "Model registry" not in message and "maintenance mode" not in message


def test_the_uri_check_names_the_variable_and_lets_good_uris_through(
    trainkit_store: TrainkitStore, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "127.0.0.1:5000")
    with pytest.raises(TrackingError, match=r"'127.0.0.1:5000' \(from MLFLOW_TRACKING_URI\)"):
        Tracker("exp").setup()
    tree = invoke("tree", "-e", "exp")
    assert tree.exit_code == 1 and "did you mean 'http://127.0.0.1:5000'?" in error_line(tree)
    for good in ("http://127.0.0.1:5000", "postgresql+psycopg2://db/x", "mysql://h/x"):
        assert Tracker("exp", good).resolve_tracking_uri() == (good, "argument")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    store = f"file://{tmp_path}/mlruns"
    assert Tracker("exp", store).resolve_tracking_uri() == (store, "argument")


def test_push_checks_its_uris_too(trainkit_store: TrainkitStore) -> None:
    Tracker("exp").setup()
    with pytest.raises(TrackingError, match=r"'htp://127.0.0.1:1' \(from --to\).*'http'"):
        push(trainkit_store.uri, "htp://127.0.0.1:1")


# RunSpec fields ---------------------------------------------------------------------------


def test_a_misspelt_runspec_field_names_the_field_it_resembles() -> None:
    with pytest.raises(ValidationError) as info:  # still pydantic's error type
        RunSpec(kind="hpo_trial_fold", model="m", study_key_hash="a", trial_number=1, fold=2)  # type: ignore[call-arg]
    assert "'fold' (did you mean 'fold_idx'?)" in str(info.value)
    with pytest.raises(ValidationError, match=r"'studyname' \(did you mean 'study_name'\?\)"):
        RunSpec.model_validate_json('{"kind": "hpo_sweep", "model": "m", "studyname": "x"}')
    sweep = RunSpec(kind="hpo_sweep", model="m", study_key_hash="a")
    with pytest.raises(ValidationError, match="did you mean 'trial_number'"):
        sweep.child("hpo_trial", trial_numbr=1)
    with pytest.raises(ValidationError, match="did you mean 'hpo_trial_run_id'"):
        Lineage(hpo_trial_id="0" * 32)  # type: ignore[call-arg]
    with pytest.raises(ValidationError, match="RunSpec has no field 'zzz'; its fields are kind"):
        RunSpec(kind="hpo_sweep", model="m", zzz=1)  # type: ignore[call-arg]


# Names the CLI does not find ------------------------------------------------------------


def test_cli_not_found_suggests_close_names(trainkit_store: TrainkitStore) -> None:
    tracker = Tracker("ner-experiment")
    with tracker.start_run(
        RunSpec(kind="hpo_sweep", model="bert", environment="local", study_key_hash="ab12cd34")
    ) as sweep:
        pass
    typo = invoke("tree", "-e", "ner-experimnet")
    assert typo.exit_code == 1
    assert "experiment 'ner-experimnet' does not exist" in error_line(typo)
    assert "did you mean 'ner-experiment'?" in error_line(typo)
    reap = invoke("reap", "--older-than", "1h", "-e", "ner_experiment")
    assert "did you mean 'ner-experiment'?" in error_line(reap)

    by_name = invoke("tree", "--run", sweep.name)  # a run name where an id is wanted
    assert by_name.exit_code == 2 and f"did you mean {sweep.id} ({sweep.name!r})?" in error_line(by_name)  # fmt: skip
    cut = invoke("tree", "-e", "ner-experiment", "--run", sweep.id[:8])  # an id cut short
    assert f"did you mean {sweep.id}" in error_line(cut)
    wrong = sweep.id[:-1] + ("0" if sweep.id[-1] != "0" else "1")  # one character off
    missing = invoke("tree", "--run", wrong)
    assert missing.exit_code == 1 and f"run {wrong!r} not found" in error_line(missing)
    assert f"did you mean {sweep.id}" in error_line(missing)

    pushed = invoke("push", "--from", trainkit_store.uri, "--to", "sqlite:////tmp/x.db", "--experiment", "ner-experimen")  # fmt: skip
    assert pushed.exit_code == 1 and "did you mean 'ner-experiment'?" in error_line(pushed)


def test_cli_missing_policy_file_suggests_its_neighbours(tmp_path: Path) -> None:
    (tmp_path / "naming.yaml").write_text("extends: default\nkinds: {}\n")
    result = invoke("policy", "check", str(tmp_path / "nameing.yaml"))
    assert result.exit_code == 2
    assert f"did you mean {str(tmp_path / 'naming.yaml')!r}?" in error_line(result)
    assert "does not exist" in error_line(result)


# reap ------------------------------------------------------------------------------------


def test_a_reaped_run_ends_at_its_last_sign_of_life(trainkit_store: TrainkitStore) -> None:
    client = MlflowClient(trainkit_store.uri)
    experiment_id = client.create_experiment("reaped")
    now = time.time()
    beat = int(now - 600)  # its last heartbeat: ten minutes ago (the one set at creation)
    run = client.create_run(experiment_id, start_time=beat * 1000, tags={"code.heartbeat": str(beat)})  # fmt: skip
    last_point = (beat + 12) * 1000 + 345  # it went on logging for 12 s, then died
    client.log_metric(run.info.run_id, "loss", 0.5, timestamp=(beat + 5) * 1000, step=0)
    client.log_metric(run.info.run_id, "loss", 0.4, timestamp=last_point, step=1)
    client.log_metric(run.info.run_id, "lr", 1e-5, timestamp=(beat + 3) * 1000, step=9)
    silent = client.create_run(experiment_id, start_time=beat * 1000, tags={"code.heartbeat": str(beat)})  # fmt: skip
    done = invoke("reap", "--older-than", "5m", "-e", "reaped")
    assert done.exit_code == 0, done.output
    info = client.get_run(run.info.run_id).info
    assert (info.status, info.end_time) == ("KILLED", last_point)
    quiet = client.get_run(silent.info.run_id).info
    assert (quiet.status, quiet.end_time) == ("KILLED", beat * 1000)  # no point: its heartbeat
    assert re.search(r"2 of 2 running runs ended as KILLED", done.stdout)
