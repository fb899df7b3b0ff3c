"""RunSpec, RunKind and Lineage: validation, defaults, JSON round-trip, child()."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from trainkit_tracking import Lineage, RunKind, RunSpec
from trainkit_tracking.models import parse_training_id

RUN_ID = "0123456789abcdef0123456789abcdef"


def test_run_kind_values() -> None:
    assert [k.value for k in RunKind] == [
        "hpo_sweep",
        "hpo_trial",
        "hpo_trial_fold",
        "hpo_refit",
        "final_training",
        "benchmarking",
        "conversion",
    ]
    assert RunKind("hpo_trial") is RunKind.HPO_TRIAL
    assert isinstance(RunKind.HPO_TRIAL, str)


@pytest.mark.parametrize(
    ("kind", "given_fields", "missing"),
    [
        ("hpo_trial", {"trial_number": 1}, "study_key_hash"),
        ("hpo_trial", {"study_key_hash": "abc"}, "trial_number"),
        ("hpo_trial_fold", {"study_key_hash": "abc", "trial_number": 1}, "fold_idx"),
        ("hpo_refit", {"study_key_hash": "abc"}, "trial_number"),
        ("conversion", {"conv_fp": "c"}, "parent_training_id"),
        ("conversion", {"parent_training_id": "spec_ab_exec_cd/v1"}, "conv_fp"),
    ],
)
def test_per_kind_required_fields_name_field_and_kind(
    kind: str, given_fields: dict[str, object], missing: str
) -> None:
    with pytest.raises(ValidationError) as info:
        RunSpec(kind=kind, model="bert", **given_fields)
    text = str(info.value)
    assert missing in text
    assert kind in text


def test_final_training_needs_only_model() -> None:
    spec = RunSpec(kind="final_training", model="bert")
    assert spec.kind is RunKind.FINAL_TRAINING
    assert spec.variant == 1


def test_defaults_environment_and_storage_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAGGLE_KERNEL_RUN_TYPE", "Interactive")
    spec = RunSpec(kind="hpo_sweep", model="m")
    assert spec.environment == "kaggle"
    assert spec.storage_env == "kaggle"
    other = RunSpec(kind="hpo_sweep", model="m", environment="colab", storage_env="local")
    assert (other.environment, other.storage_env) == ("colab", "local")
    same = RunSpec(kind="hpo_sweep", model="m", environment="my-env")
    assert same.storage_env == "my-env"


@pytest.mark.parametrize("bad", ["has space", "a/b", "", "ü"])
def test_environment_charset(bad: str) -> None:
    with pytest.raises(ValidationError, match="environment"):
        RunSpec(kind="hpo_sweep", model="m", environment=bad or "x y")


@pytest.mark.parametrize(
    ("field", "value"), [("trial_number", -1), ("fold_idx", -2), ("variant", 0)]
)
def test_integer_bounds(field: str, value: int) -> None:
    with pytest.raises(ValidationError, match=field):
        RunSpec(kind="final_training", model="m", **{field: value})


def test_frozen_and_extra_forbidden() -> None:
    spec = RunSpec(kind="final_training", model="m")
    with pytest.raises(ValidationError):
        spec.model = "other"  # type: ignore[misc]
    with pytest.raises(ValidationError, match="unknown_field"):
        RunSpec(kind="final_training", model="m", unknown_field=1)  # type: ignore[call-arg]


def test_json_round_trip_with_lineage() -> None:
    spec = RunSpec(
        kind="final_training",
        model="deberta-v3/base",
        environment="colab",
        spec_fp="abc",
        exec_fp="def",
        variant=3,
        lineage=Lineage(hpo_trial_run_id=RUN_ID, hpo_study_key_hash="s"),
        tags={"team": "nlp"},
    )
    again = RunSpec.model_validate_json(spec.model_dump_json())
    assert again == spec
    assert again.lineage is not None and again.lineage.source == "hpo_best_selected"


def test_child_inherits_identity_not_name_tags_lineage_fold() -> None:
    sweep = RunSpec(
        kind="hpo_sweep",
        model="bert",
        project="p",
        environment="colab",
        storage_env="local",
        study_name="my study",
        study_key_hash="sk",
        study_family_hash="sf",
        run_name="explicit",
        tags={"a": "b"},
        lineage=Lineage(hpo_sweep_run_id=RUN_ID),
    )
    trial = sweep.child("hpo_trial", trial_number=3, trial_key_hash="tk")
    assert trial.kind is RunKind.HPO_TRIAL
    assert (trial.model, trial.project, trial.environment, trial.storage_env) == (
        "bert",
        "p",
        "colab",
        "local",
    )
    assert (trial.study_name, trial.study_key_hash, trial.study_family_hash) == (
        "my study",
        "sk",
        "sf",
    )
    assert trial.run_name is None and trial.tags == {} and trial.lineage is None
    fold = trial.child(RunKind.HPO_TRIAL_FOLD, fold_idx=2)
    assert (fold.trial_number, fold.trial_key_hash, fold.fold_idx) == (3, "tk", 2)
    refit = fold.child("hpo_refit")
    assert refit.fold_idx is None and refit.trial_number == 3


def test_run_key_hash_is_identity() -> None:
    a = RunSpec(
        kind="hpo_trial", model="m", study_key_hash="s", trial_number=1, environment="local"
    )
    b = RunSpec(
        kind="hpo_trial",
        model="m",
        study_key_hash="s",
        trial_number=1,
        environment="local",
        run_name="x",
        tags={"t": "v"},
        output_dir="/tmp/o",
    )
    c = RunSpec(
        kind="hpo_trial", model="m", study_key_hash="s", trial_number=2, environment="local"
    )
    assert a.run_key_hash == b.run_key_hash
    assert a.run_key_hash != c.run_key_hash
    assert len(a.run_key_hash) == 64


def test_lineage_run_ids() -> None:
    assert Lineage(hpo_trial_run_id=RUN_ID).hpo_trial_run_id == RUN_ID
    dashed = "123e4567-e89b-12d3-a456-426614174000"
    assert Lineage(parent_training_run_id=dashed).parent_training_run_id == dashed
    assert Lineage(parent_training_run_id=dashed).source is None
    with pytest.raises(ValidationError, match="hpo_trial_run_id"):
        Lineage(hpo_trial_run_id="ABCDEF0123456789ABCDEF0123456789")
    with pytest.raises(ValidationError, match="hpo_sweep_run_id"):
        Lineage(hpo_sweep_run_id="not-an-id")
    assert Lineage(source="final_training", hpo_sweep_run_id=RUN_ID).source == "final_training"


def test_parse_training_id() -> None:
    assert parse_training_id("spec_ABC123_exec_dEf456/v2") == ("abc123", "def456", 2)
    with pytest.raises(ValueError, match="parent_training_id"):
        parse_training_id("spec_xyz_exec_abc/v1")
    with pytest.raises(ValidationError, match="parent_training_id"):
        RunSpec(kind="conversion", model="m", conv_fp="c", parent_training_id="nope")


specs = st.builds(
    RunSpec,
    kind=st.sampled_from(["hpo_trial", "hpo_trial_fold", "hpo_refit"]),
    model=st.text(min_size=1, max_size=20),
    environment=st.from_regex(r"[A-Za-z0-9_-]{1,10}", fullmatch=True),
    study_key_hash=st.text(min_size=1, max_size=12),
    trial_number=st.integers(min_value=0, max_value=10_000),
    fold_idx=st.integers(min_value=0, max_value=20),
    study_name=st.none() | st.text(max_size=40),
    tags=st.dictionaries(st.text(max_size=10), st.text(max_size=10), max_size=3),
)


@given(specs)
def test_specs_round_trip_through_json(spec: RunSpec) -> None:
    assert RunSpec.model_validate_json(spec.model_dump_json()) == spec
