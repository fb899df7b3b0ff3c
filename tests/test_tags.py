"""TagKeys and TagSet: SPEC section 5's tags per kind, key rules, cutting, merging, overrides."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from mlflow.exceptions import MlflowException
from mlflow.utils.validation import _validate_length_limit, _validate_tag_name

from trainkit_tracking import Lineage, RunKind, RunSpec, TagKeyError, TrackingWarning
from trainkit_tracking._core import tags as _tags
from trainkit_tracking._core.limits import check_key
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking._core.tags import TagSet, creation_tags
from trainkit_tracking._version import __version__

ENV = {"USER": "ana"}
SV = "9.9.9"
STUDY = "350a79aa" + "0" * 56
TRIAL = "7e1a0b2c" + "1" * 56
TRIAL_RUN = "0123456789abcdef0123456789abcdef"
REFIT_RUN = "1123456789abcdef0123456789abcdef"
SWEEP_RUN = "2123456789abcdef0123456789abcdef"
TRAIN_RUN = "3123456789abcdef0123456789abcdef"


def tags_of(spec: RunSpec, **kwargs: Any) -> dict[str, str]:
    kwargs.setdefault("environ", ENV)
    kwargs.setdefault("sdk_version", SV)
    return dict(TagSet.for_spec(spec, **kwargs))


def common(spec: RunSpec, stage: str, run_type: str, env: str = "local") -> dict[str, str]:
    return {
        "code.stage": stage,
        "code.run_kind": spec.kind.value,
        "mlflow.runType": run_type,
        "code.model": spec.model,
        "code.env": env,
        "code.storage_env": env,
        "code.execution_platform": env,
        "code.created_by": "ana",
        "code.project": "ner",
        "code.run_key_hash": spec.run_key_hash,
        "code.sdk_version": SV,
    }


# -- exact tags per kind ---------------------------------------------------------------


def test_hpo_sweep_local() -> None:
    spec = RunSpec(
        kind="hpo_sweep", model="distilbert-base-uncased", project="ner", environment="local",
        study_name="ner sweep", study_key_hash=STUDY,
    )  # fmt: skip
    assert tags_of(spec) == {
        **common(spec, "hpo", "sweep"),
        "code.study_name": "ner sweep",
        "code.study_key_hash": STUDY,
        "code.grouping_schema_version": "1",
    }


def test_hpo_sweep_azureml() -> None:
    spec = RunSpec(kind="hpo_sweep", model="distilbert", project="ner", environment="azureml")
    assert tags_of(spec) == {
        **common(spec, "hpo", "sweep", env="azureml"),
        "azureml.runType": "sweep",
        "azureml.sweep": "true",
    }


def test_hpo_trial_local_and_azureml() -> None:
    local = RunSpec(
        kind="hpo_trial", model="distilbert", project="ner", environment="local",
        study_key_hash=STUDY, trial_key_hash=TRIAL, trial_number=5,
    )  # fmt: skip
    assert tags_of(local) == {
        **common(local, "hpo", "trial"),
        "code.study_key_hash": STUDY,
        "code.trial_key_hash": TRIAL,
        "code.hpo.trial_number": "5",
        "code.grouping_schema_version": "1",
    }
    azure = local.model_copy(update={"environment": "azureml", "storage_env": "azureml"})
    assert tags_of(azure) == {
        **common(azure, "hpo", "trial", env="azureml"),
        "code.study_key_hash": STUDY,
        "code.trial_key_hash": TRIAL,
        "code.hpo.trial_number": "5",
        "azureml.runType": "trial",
        "azureml.trial": "true",
        "code.grouping_schema_version": "1",
    }


def test_hpo_trial_fold() -> None:
    spec = RunSpec(
        kind="hpo_trial_fold", model="distilbert", project="ner", environment="azureml",
        storage_env="local", study_key_hash=STUDY, trial_number=0, fold_idx=3,
    )  # fmt: skip
    assert tags_of(spec) == {
        "code.stage": "hpo",
        "code.run_kind": "hpo_trial_fold",
        "mlflow.runType": "fold",
        "code.model": "distilbert",
        "code.env": "azureml",
        "code.storage_env": "local",
        "code.execution_platform": "azureml",
        "code.created_by": "ana",
        "code.project": "ner",
        "code.run_key_hash": spec.run_key_hash,
        "code.sdk_version": SV,
        "code.study_key_hash": STUDY,
        "code.hpo.trial_number": "0",
        "code.hpo.fold_idx": "3",
        "azureml.runType": "trial",
        "azureml.trial": "true",
        "code.grouping_schema_version": "1",
    }


def test_hpo_refit() -> None:
    spec = RunSpec(
        kind="hpo_refit", model="distilbert", project="ner", environment="local",
        study_key_hash=STUDY, trial_key_hash=TRIAL, trial_number=12, refit_protocol_fp="rp1",
    )  # fmt: skip
    assert tags_of(spec) == {
        **common(spec, "hpo_refit", "refit"),
        "code.study_key_hash": STUDY,
        "code.trial_key_hash": TRIAL,
        "code.refit_protocol_fp": "rp1",
        "code.hpo.trial_number": "12",
        "code.run_type": "refit",
        "code.refit": "true",
        "code.grouping_schema_version": "1",
    }


def test_hpo_refit_gets_no_azure_tags() -> None:
    spec = RunSpec(
        kind="hpo_refit", model="m", environment="azureml", study_key_hash=STUDY, trial_number=1
    )
    assert not [k for k in tags_of(spec) if k.startswith("azureml.")]


def test_final_training_without_lineage() -> None:
    spec = RunSpec(
        kind="final_training", model="distilbert-base-uncased", project="ner",
        environment="local", spec_fp="abc123de", exec_fp="xyz789ab", variant=2,
        output_dir="/data/out",
    )  # fmt: skip
    assert tags_of(spec) == {
        **common(spec, "final_training", "training"),
        "code.spec_fp": "abc123de",
        "code.exec_fp": "xyz789ab",
        "code.output_dir": "/data/out",
        "code.variant": "2",
        "training_type": "final",
        "code.trained_on_full_data": "true",
    }


def test_final_training_fallback_spec_still_tags_variant() -> None:
    spec = RunSpec(kind="final_training", model="m", project="ner", environment="local")
    assert tags_of(spec) == {
        **common(spec, "final_training", "training"),
        "code.variant": "1",
        "training_type": "final",
        "code.trained_on_full_data": "true",
    }


def test_final_training_with_hpo_lineage_fills_grouping_hashes() -> None:
    lineage = Lineage(
        hpo_study_key_hash=STUDY, hpo_trial_key_hash=TRIAL,
        hpo_trial_run_id=TRIAL_RUN, hpo_refit_run_id=REFIT_RUN, hpo_sweep_run_id=SWEEP_RUN,
    )  # fmt: skip
    spec = RunSpec(
        kind="final_training", model="m", project="ner", environment="local",
        spec_fp="s1", exec_fp="e1", lineage=lineage,
    )  # fmt: skip
    assert tags_of(spec) == {
        **common(spec, "final_training", "training"),
        "code.spec_fp": "s1",
        "code.exec_fp": "e1",
        "code.variant": "1",
        "training_type": "final",
        "code.trained_on_full_data": "true",
        "code.lineage.source": "hpo_best_selected",
        "code.study_key_hash": STUDY,
        "code.trial_key_hash": TRIAL,
        "code.lineage.hpo_study_key_hash": STUDY,
        "code.lineage.hpo_trial_key_hash": TRIAL,
        "code.lineage.hpo_trial_run_id": TRIAL_RUN,
        "code.lineage.hpo_refit_run_id": REFIT_RUN,
        "code.lineage.hpo_sweep_run_id": SWEEP_RUN,
        "code.grouping_schema_version": "1",
    }


def test_final_training_spec_hashes_win_over_lineage() -> None:
    lineage = Lineage(hpo_study_key_hash="lineage-study", hpo_trial_run_id=TRIAL_RUN)
    spec = RunSpec(
        kind="final_training",
        model="m",
        environment="local",
        study_key_hash="spec-study",
        lineage=lineage,
    )
    tags = tags_of(spec)
    assert tags["code.study_key_hash"] == "spec-study"
    assert tags["code.lineage.hpo_study_key_hash"] == "lineage-study"
    assert "code.trial_key_hash" not in tags
    assert "code.lineage.hpo_trial_key_hash" not in tags


def test_final_training_lineage_free_text_source() -> None:
    spec = RunSpec(
        kind="final_training", model="m", environment="local", lineage=Lineage(source="manual")
    )
    tags = tags_of(spec)
    assert tags["code.lineage.source"] == "manual"
    assert not [k for k in tags if k.startswith("code.lineage.") and k != "code.lineage.source"]
    assert "code.grouping_schema_version" not in tags


@pytest.mark.parametrize(
    ("lineage", "parent", "parent_kind"),
    [
        ({"hpo_trial_run_id": TRIAL_RUN, "hpo_refit_run_id": REFIT_RUN}, TRIAL_RUN, "trial"),
        ({"hpo_refit_run_id": REFIT_RUN, "hpo_sweep_run_id": SWEEP_RUN}, REFIT_RUN, "refit"),
        ({"hpo_sweep_run_id": SWEEP_RUN, "parent_training_run_id": TRAIN_RUN}, SWEEP_RUN, "sweep"),
        ({"parent_training_run_id": TRAIN_RUN}, TRAIN_RUN, "final_training"),
    ],
)
def test_benchmarking_lineage(lineage: dict[str, str], parent: str, parent_kind: str) -> None:
    spec = RunSpec(
        kind="benchmarking", model="m", project="ner", environment="local",
        study_key_hash=STUDY, trial_key_hash=TRIAL, benchmark_config_hash="bc1",
        lineage=Lineage(**lineage),
    )  # fmt: skip
    expected = {
        **common(spec, "benchmarking", "benchmark"),
        "code.study_key_hash": STUDY,
        "code.trial_key_hash": TRIAL,
        "code.benchmark_config_hash": "bc1",
        "code.lineage.parent_training_run_id": parent,
        "code.lineage.parent_kind": parent_kind,
        "code.grouping_schema_version": "1",
    }
    for field in ("hpo_trial_run_id", "hpo_refit_run_id", "hpo_sweep_run_id"):
        if field in lineage:
            expected[f"code.lineage.{field}"] = lineage[field]
    assert tags_of(spec) == expected


def test_benchmarking_without_lineage() -> None:
    spec = RunSpec(kind="benchmarking", model="m", project="ner", environment="local")
    assert tags_of(spec) == common(spec, "benchmarking", "benchmark")


def test_conversion() -> None:
    spec = RunSpec(
        kind="conversion", model="distilbert", project="ner", environment="local",
        conv_fp="cf1", parent_training_id="spec_ABC123_exec_DEF456/v3",
        lineage=Lineage(parent_training_run_id=TRAIN_RUN),
    )  # fmt: skip
    assert tags_of(spec) == {
        **common(spec, "conversion", "conversion"),
        "code.conv_fp": "cf1",
        "code.parent_training_id": "spec_ABC123_exec_DEF456/v3",
        "code.variant": "3",
        "code.lineage.source": "final_training",
        "code.lineage.parent_spec_fp": "abc123",
        "code.lineage.parent_exec_fp": "def456",
        "code.lineage.parent_training_run_id": TRAIN_RUN,
    }


def test_conversion_without_lineage_and_variant_from_parent_id() -> None:
    spec = RunSpec(
        kind="conversion", model="m", environment="local", conv_fp="c",
        parent_training_id="spec_ab_exec_cd/v7", variant=2,
    )  # fmt: skip
    tags = tags_of(spec)
    assert tags["code.variant"] == "7"
    assert tags["code.lineage.source"] == "final_training"
    assert "code.lineage.parent_training_run_id" not in tags


def test_variant_only_for_final_training_and_conversion() -> None:
    spec = RunSpec(kind="hpo_trial", model="m", study_key_hash="s", trial_number=1, variant=4)
    assert "code.variant" not in tags_of(spec)


def test_grouping_schema_version_from_family_hash_alone() -> None:
    spec = RunSpec(kind="hpo_sweep", model="m", study_family_hash="fam")
    assert tags_of(spec)["code.grouping_schema_version"] == "1"
    assert "code.grouping_schema_version" not in tags_of(RunSpec(kind="hpo_sweep", model="m"))


def test_every_identity_field_is_tagged_when_set() -> None:
    spec = RunSpec(
        kind="final_training", model="m", environment="kaggle", study_name="s n",
        study_key_hash="sk", study_family_hash="sf", trial_key_hash="tk", trial_number=7,
        fold_idx=2, spec_fp="sp", exec_fp="ex", variant=3, conv_fp="cv",
        parent_training_id="spec_a_exec_b/v1", benchmark_config_hash="bc",
        refit_protocol_fp="rp", group_id="g1", output_dir="out",
    )  # fmt: skip
    tags = tags_of(spec)
    expected = {
        "code.study_name": "s n", "code.study_key_hash": "sk", "code.study_family_hash": "sf",
        "code.trial_key_hash": "tk", "code.hpo.trial_number": "7", "code.hpo.fold_idx": "2",
        "code.spec_fp": "sp", "code.exec_fp": "ex", "code.variant": "3", "code.conv_fp": "cv",
        "code.parent_training_id": "spec_a_exec_b/v1", "code.benchmark_config_hash": "bc",
        "code.refit_protocol_fp": "rp", "code.group_id": "g1", "code.output_dir": "out",
    }  # fmt: skip
    assert {k: tags[k] for k in expected} == expected


@pytest.mark.parametrize(
    ("kind", "stage"),
    [
        ("hpo_sweep", "hpo"),
        ("hpo_trial", "hpo"),
        ("hpo_trial_fold", "hpo"),
        ("hpo_refit", "hpo_refit"),
        ("final_training", "final_training"),
        ("benchmarking", "benchmarking"),
        ("conversion", "conversion"),
    ],
)
def test_stage_per_kind(kind: str, stage: str) -> None:
    spec = RunSpec(
        kind=kind, model="m", study_key_hash="s", trial_number=1, fold_idx=0,
        conv_fp="c", parent_training_id="spec_a_exec_b/v1",
    )  # fmt: skip
    tags = tags_of(spec)
    assert tags["code.stage"] == stage
    assert tags["code.run_kind"] == kind
    for creation_key in ("mlflow.runName", "code.run_name", "mlflow.parentRunId"):
        assert creation_key not in tags


# -- environment-dependent values ------------------------------------------------------


@pytest.mark.parametrize(
    ("environ", "expected"),
    [
        ({"USER": "ana", "USERNAME": "bob"}, "ana"),
        ({"USERNAME": "bob"}, "bob"),
        ({"USER": "", "USERNAME": "bob"}, "bob"),
        ({}, _tags.os_account() or "system"),  # containers often set neither variable
    ],
)
def test_created_by(environ: dict[str, str], expected: str) -> None:
    spec = RunSpec(kind="hpo_sweep", model="m")
    assert tags_of(spec, environ=environ)["code.created_by"] == expected


def test_created_by_without_any_account_name(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_tags, "os_account", lambda: None)
    assert tags_of(RunSpec(kind="hpo_sweep", model="m"), environ={})["code.created_by"] == "system"


def test_project_precedence() -> None:
    with_project = RunSpec(kind="hpo_sweep", model="m", project="from-spec")
    without = RunSpec(kind="hpo_sweep", model="m")
    assert tags_of(with_project, project="from-tracker")["code.project"] == "from-spec"
    assert tags_of(without, project="from-tracker")["code.project"] == "from-tracker"
    assert tags_of(without)["code.project"] == "unknown"


def test_sdk_version_defaults_to_package_version() -> None:
    spec = RunSpec(kind="hpo_sweep", model="m")
    assert TagSet.for_spec(spec, environ=ENV)["code.sdk_version"] == __version__


def test_model_is_raw_and_integers_are_plain_decimals() -> None:
    spec = RunSpec(kind="hpo_trial", model="org/Distil BERT-x", study_key_hash="s", trial_number=5)
    tags = tags_of(spec)
    assert tags["code.model"] == "org/Distil BERT-x"
    assert tags["code.hpo.trial_number"] == "5"


def test_output_dir_credentials_are_masked() -> None:
    spec = RunSpec(kind="final_training", model="m", output_dir="https://u:pw@store/x?sig=abc")
    assert tags_of(spec)["code.output_dir"] == "https://***@store/x?sig=***"


# -- user tags -------------------------------------------------------------------------


def test_user_tags_merge_last_and_override_sdk_tags() -> None:
    spec = RunSpec(
        kind="hpo_sweep", model="m", project="ner",
        tags={"team": "nlp", "code.project": "override", "hf_token": "abc"},
    )  # fmt: skip
    tags = tags_of(spec)
    assert tags["team"] == "nlp"
    assert tags["code.project"] == "override"
    assert tags["hf_token"] == "***"


@pytest.mark.parametrize(
    "key",
    ["code.run_key_hash", "code.run_kind", "mlflow.runName", "code.run_name", "mlflow.parentRunId"],
)
def test_user_tags_cannot_override_protected_tags(key: str) -> None:
    spec = RunSpec(kind="hpo_sweep", model="m", tags={key: "mine"})
    with pytest.raises(TagKeyError, match=repr(key)):
        tags_of(spec)


def test_user_tag_equal_to_sdk_value_is_accepted() -> None:
    base = RunSpec(kind="hpo_sweep", model="m")
    spec = base.model_copy(update={"tags": {"code.run_kind": "hpo_sweep"}})
    assert tags_of(spec)["code.run_kind"] == "hpo_sweep"


def test_invalid_user_tag_key_is_rejected() -> None:
    spec = RunSpec(kind="hpo_sweep", model="m", tags={"bad*key": "x"})
    with pytest.raises(TagKeyError, match=r"'bad\*key'"):
        tags_of(spec)


# -- creation tags ---------------------------------------------------------------------


def test_creation_tags() -> None:
    keys = TagKeys.default()
    assert creation_tags(keys, run_name="n_1", parent_run_id=None) == {
        "mlflow.runName": "n_1",
        "code.run_name": "n_1",
    }
    assert creation_tags(keys, run_name="n_1", parent_run_id=TRIAL_RUN) == {
        "mlflow.runName": "n_1",
        "code.run_name": "n_1",
        "mlflow.parentRunId": TRIAL_RUN,
    }
    custom = TagKeys.from_dict({"run_name": "myorg.run_name"})
    assert creation_tags(custom, run_name="x") == {"mlflow.runName": "x", "myorg.run_name": "x"}


# -- TagKeys ---------------------------------------------------------------------------


def test_default_keys_cover_section_5() -> None:
    keys = TagKeys.default()
    assert keys["stage"] == "code.stage"
    assert keys["mlflow_run_name"] == "mlflow.runName"
    assert keys["parent_run_id"] == "mlflow.parentRunId"
    assert keys["run_type"] == "mlflow.runType"
    assert keys["interrupted"] == "code.interrupted"
    assert keys["heartbeat"] == "code.heartbeat"
    assert keys["base_name"] == "code.base_name"
    assert keys["version"] == "code.version"
    assert keys["trial_number"] == "code.hpo.trial_number"
    assert keys["lineage_source"] == "code.lineage.source"
    values = set(keys.values())
    assert len(values) == len(keys)
    for key in values:
        assert check_key(key, "tag") == key
    assert TagKeys.default() is TagKeys.default()
    assert repr(keys) == "TagKeys.default()"


def test_unknown_logical_name_is_a_tag_key_error_and_a_key_error() -> None:
    keys = TagKeys.default()
    with pytest.raises(TagKeyError, match="'nope'"):
        keys["nope"]
    with pytest.raises(KeyError):
        keys["nope"]
    assert keys.get("nope") is None
    assert issubclass(TagKeyError, KeyError)


def test_override_from_dict_changes_for_spec_output() -> None:
    keys = TagKeys.from_dict({"stage": "myorg.stage", "project": "myorg.project"})
    assert keys["stage"] == "myorg.stage"
    assert keys["run_kind"] == "code.run_kind"
    spec = RunSpec(kind="hpo_sweep", model="m", project="ner")
    tags = tags_of(spec, keys=keys)
    assert tags["myorg.stage"] == "hpo"
    assert tags["myorg.project"] == "ner"
    assert "code.stage" not in tags
    assert "code.project" not in tags
    assert keys != TagKeys.default()
    assert keys == TagKeys.from_dict({"project": "myorg.project", "stage": "myorg.stage"})
    assert hash(keys) == hash(
        TagKeys.from_dict({"stage": "myorg.stage", "project": "myorg.project"})
    )


def test_override_of_protected_key_is_still_protected() -> None:
    keys = TagKeys.from_dict({"run_kind": "myorg.kind"})
    spec = RunSpec(kind="hpo_sweep", model="m", tags={"myorg.kind": "other"})
    with pytest.raises(TagKeyError, match=r"'myorg\.kind'"):
        tags_of(spec, keys=keys)


def test_from_dict_rejects_unknown_names_naming_them() -> None:
    with pytest.raises(TagKeyError, match=r"'bogus'.*'stagee'|'stagee'.*'bogus'") as info:
        TagKeys.from_dict({"stagee": "x.stage", "bogus": "x.b", "stage": "ok.stage"})
    assert "known names are" in str(info.value)


@pytest.mark.parametrize("bad", ["", "/abs", "..b", "bad*key", "x" * 251, 5])
def test_from_dict_validates_keys(bad: Any) -> None:
    with pytest.raises(TagKeyError, match="'stage'"):
        TagKeys.from_dict({"stage": bad})


def test_from_dict_rejects_two_names_for_one_key() -> None:
    with pytest.raises(TagKeyError, match=r"'code\.run_kind'"):
        TagKeys.from_dict({"stage": "code.run_kind"})


def test_from_yaml(tmp_path: Path) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text("stage: myorg.stage\nheartbeat: myorg.heartbeat\n", encoding="utf-8")
    keys = TagKeys.from_yaml(path)
    assert keys["stage"] == "myorg.stage"
    assert keys["heartbeat"] == "myorg.heartbeat"
    assert keys == TagKeys.from_dict({"stage": "myorg.stage", "heartbeat": "myorg.heartbeat"})
    spec = RunSpec(kind="hpo_trial", model="m", study_key_hash="s", trial_number=1)
    assert tags_of(spec, keys=TagKeys.from_yaml(str(path)))["myorg.stage"] == "hpo"


def test_from_yaml_empty_file_is_default(tmp_path: Path) -> None:
    path = tmp_path / "empty.yaml"
    path.write_text("", encoding="utf-8")
    assert TagKeys.from_yaml(path) == TagKeys.default()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("stagee: x.stage\n", "'stagee'"),
        ("- stage\n- x\n", "mapping"),
        ("stage: [unclosed\n", "not valid YAML"),
        ("stage: /abs\n", "'/abs'"),
    ],
)
def test_from_yaml_errors_name_the_file(tmp_path: Path, text: str, match: str) -> None:
    path = tmp_path / "keys.yaml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(TagKeyError, match=match) as info:
        TagKeys.from_yaml(path)
    assert str(path) in str(info.value)


def test_tag_keys_are_immutable_and_picklable() -> None:
    keys = TagKeys.from_dict({"stage": "myorg.stage"})
    with pytest.raises(AttributeError):
        keys._keys = {}
    with pytest.raises(TypeError):
        keys["stage"] = "x"  # type: ignore[index]
    assert pickle.loads(pickle.dumps(keys)) == keys


# -- TagSet ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["a" * 250, "code.x", "a b", "a:b", "a/b", "a-b_c.d", "x1", "näme", "a..b", "a/..b"],
)
def test_valid_keys(key: str) -> None:
    assert TagSet({key: "v"})[key] == "v"


@pytest.mark.parametrize(
    "key",
    [
        *("", ".", "a" * 251, "/lead", "a/../b", "..", "..a", "a//b", "a/", "./a", "a/."),
        *("bad*", "a\nb", "a,b", "a@b", "tab\tkey"),
    ],
)
def test_invalid_keys_raise_naming_the_key(key: str) -> None:
    with pytest.raises(TagKeyError) as info:
        TagSet({key: "v"})
    assert repr(key) in str(info.value) or len(key) > 250
    assert isinstance(info.value, KeyError)


def test_non_str_key_and_value() -> None:
    with pytest.raises(TypeError, match="tag key must be a str, got 5"):
        TagSet({5: "v"})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="'epochs'"):
        TagSet({"epochs": 3})  # type: ignore[dict-item]
    with pytest.raises(TypeError, match="'flag'"):
        TagSet({"flag": True})  # type: ignore[dict-item]


def test_long_value_is_cut_with_a_warning() -> None:
    value = "x" * 9000
    with pytest.warns(TrackingWarning, match="'notes'"):
        tags = TagSet({"notes": value})
    assert len(tags["notes"]) == 8000
    assert tags["notes"] == "x" * 7997 + "..."


def test_value_of_exactly_8000_is_kept_without_warning() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tags = TagSet({"notes": "y" * 8000})
    assert tags["notes"] == "y" * 8000


def test_long_user_tag_through_for_spec_is_cut() -> None:
    spec = RunSpec(kind="hpo_sweep", model="m", tags={"notes": "z" * 10_000})
    with pytest.warns(TrackingWarning, match="'notes'"):
        tags = tags_of(spec)
    assert len(tags["notes"]) == 8000


def test_secrets_are_redacted() -> None:
    tags = TagSet({"hf_token": "abc", "uri": "https://u:p@host/x", "pad_token_id": "0"})
    assert tags == {"hf_token": "***", "uri": "https://***@host/x", "pad_token_id": "0"}


def test_merge_right_wins() -> None:
    left = TagSet({"a": "1", "b": "2"})
    right = TagSet({"b": "3", "c": "4"})
    merged = left | right
    assert isinstance(merged, TagSet)
    assert merged == {"a": "1", "b": "3", "c": "4"}
    assert left == {"a": "1", "b": "2"}  # unchanged
    with_dict = left | {"b": "9", "hf_token": "abc"}
    assert isinstance(with_dict, TagSet)
    assert with_dict == {"a": "1", "b": "9", "hf_token": "***"}
    reflected = {"a": "0", "z": "1"} | left
    assert isinstance(reflected, TagSet)
    assert reflected == {"a": "1", "z": "1", "b": "2"}


def test_merge_validates_the_plain_mapping() -> None:
    with pytest.raises(TagKeyError, match="'/bad'"):
        TagSet({"a": "1"}) | {"/bad": "x"}
    with pytest.raises(TypeError):
        TagSet({"a": "1"}) | [("b", "2")]  # type: ignore[operator]


def test_tag_set_mapping_behaviour() -> None:
    tags = TagSet({"a": "1"})
    assert tags == {"a": "1"}
    assert tags != {"a": "2"}
    assert TagSet() == {}
    assert len(tags) == 1
    assert list(tags) == ["a"]
    assert "a" in tags
    assert tags.get("b") is None
    assert repr(tags) == "TagSet({'a': '1'})"
    assert TagSet(tags) == tags
    with pytest.raises(TypeError):
        tags["b"] = "2"  # type: ignore[index]
    with pytest.raises(AttributeError):
        tags._tags = {}
    assert pickle.loads(pickle.dumps(tags)) == tags


# -- properties ------------------------------------------------------------------------

_KEY_CHARS = st.sampled_from(list("abcXYZ019_-. /:"))
valid_keys = st.text(_KEY_CHARS, min_size=1, max_size=60).filter(
    lambda k: k != "." and not k.startswith(("/", "..")) and os.path.normpath(k) == k
)


@given(st.dictionaries(valid_keys, st.text(max_size=9000), max_size=5))
def test_values_never_exceed_8000(mapping: dict[str, str]) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingWarning)
        tags = TagSet(mapping)
    assert set(tags) == set(mapping)
    assert all(len(value) <= 8000 for value in tags.values())


@settings(deadline=None)
@given(st.text(max_size=300) | valid_keys)
def test_our_key_rule_is_never_looser_than_mlflow(key: str) -> None:
    try:
        check_key(key, "tag")
    except TagKeyError:
        return
    try:
        _validate_tag_name(key)  # type: ignore[no-untyped-call]
        _validate_length_limit("Tag key", 250, key)  # type: ignore[no-untyped-call]
    except MlflowException as e:  # pragma: no cover - the assertion below reports it
        pytest.fail(f"we accepted {key!r} but MLflow rejects it: {e}")


_SPEC_FIELDS = {
    "kind": st.sampled_from(list(RunKind)),
    "model": st.text(min_size=1, max_size=30),
    "project": st.none() | st.text(max_size=20),
    "environment": st.sampled_from(["local", "colab", "kaggle", "azureml", "my-env_2"]),
    "study_name": st.none() | st.text(max_size=40),
    "study_key_hash": st.none() | st.text("0123456789abcdef", min_size=8, max_size=64),
    "trial_key_hash": st.none() | st.text("0123456789abcdef", min_size=8, max_size=64),
    "trial_number": st.none() | st.integers(0, 500),
    "fold_idx": st.none() | st.integers(0, 20),
    "spec_fp": st.none() | st.text(max_size=20),
    "variant": st.integers(1, 9),
    "output_dir": st.none() | st.text(max_size=9000),
    "lineage": st.none() | st.builds(Lineage, hpo_study_key_hash=st.none() | st.text(max_size=10)),
}


@st.composite
def specs(draw: st.DrawFn) -> RunSpec:
    data = {name: draw(strategy) for name, strategy in _SPEC_FIELDS.items()}
    kind = data["kind"]
    if kind in (RunKind.HPO_TRIAL, RunKind.HPO_TRIAL_FOLD, RunKind.HPO_REFIT):
        data["study_key_hash"] = data["study_key_hash"] or "abcdef01"
        data["trial_number"] = 0 if data["trial_number"] is None else data["trial_number"]
    if kind is RunKind.HPO_TRIAL_FOLD and data["fold_idx"] is None:
        data["fold_idx"] = 0
    if kind is RunKind.CONVERSION:
        data["conv_fp"] = "c0"
        data["parent_training_id"] = f"spec_ab_exec_cd/v{data['variant']}"
    return RunSpec(**data)


_OVERRIDES = st.dictionaries(
    st.sampled_from(sorted(TagKeys.default())),
    valid_keys.map(lambda k: "custom." + k.strip(" /.:")).filter(
        lambda k: os.path.normpath(k) == k and not k.endswith((" ", "."))
    ),
    max_size=4,
)


@given(spec=specs(), overrides=_OVERRIDES)
def test_for_spec_keys_are_always_valid(spec: RunSpec, overrides: dict[str, str]) -> None:
    try:
        keys = TagKeys.from_dict(overrides)
    except TagKeyError:
        return  # two names drawn onto one key: rejected, which is right
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingWarning)
        tags = TagSet.for_spec(spec, keys, environ={})
    for key, value in tags.items():
        assert check_key(key, "tag") == key
        assert len(value) <= 8000
    assert tags[keys["run_kind"]] == spec.kind.value
    assert tags[keys["run_key_hash"]] == spec.run_key_hash


@given(spec=specs(), other_number=st.integers(0, 500))
def test_run_key_hash_follows_identity(spec: RunSpec, other_number: int) -> None:
    # Same identity, different non-identity fields: same hash.
    twin = RunSpec(
        **{
            **spec.model_dump(),
            "output_dir": "elsewhere",
            "tags": {"note": "x"},
            "run_name": "explicit",
            "lineage": None,
        }
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", TrackingWarning)
        hash_of = TagSet.for_spec(spec, environ={})["code.run_key_hash"]
        assert TagSet.for_spec(twin, environ={})["code.run_key_hash"] == hash_of
        changed = other_number + 1 if other_number == spec.trial_number else other_number
        moved = spec.model_copy(update={"trial_number": changed})
        assert TagSet.for_spec(moved, environ={})["code.run_key_hash"] != hash_of


# -- a real store accepts what TagSet builds ---------------------------------------------


def test_real_store_stores_every_tag_as_built(trainkit_store: Any) -> None:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=trainkit_store.uri)
    experiment_id = client.create_experiment("tags")
    lineage = Lineage(hpo_study_key_hash=STUDY, hpo_trial_run_id=TRIAL_RUN)
    spec_list = [
        RunSpec(kind="hpo_sweep", model="m", environment="azureml", study_name="s"),
        RunSpec(kind="hpo_trial_fold", model="m", study_key_hash=STUDY, trial_number=1, fold_idx=0),
        RunSpec(kind="hpo_refit", model="m", study_key_hash=STUDY, trial_number=1),
        RunSpec(kind="final_training", model="m", spec_fp="a", exec_fp="b", lineage=lineage),
        RunSpec(kind="benchmarking", model="m", lineage=lineage),
        RunSpec(
            kind="conversion", model="m", conv_fp="c", parent_training_id="spec_a_exec_b/v2",
            tags={"x" * 250: "long key", "notes": "n" * 9000},
        ),
    ]  # fmt: skip
    for spec in spec_list:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", TrackingWarning)
            tags = TagSet.for_spec(spec, environ=ENV) | creation_tags(
                TagKeys.default(), run_name=f"{spec.kind.value}_1", parent_run_id=None
            )
        run = client.create_run(experiment_id, tags=dict(tags), run_name=tags["mlflow.runName"])
        stored = client.get_run(run.info.run_id).data.tags
        assert {key: stored.get(key) for key in tags} == dict(tags)
