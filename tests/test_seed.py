"""The seed repo's config/naming.yaml and config/tags.yaml load as they are and name runs as it did.

tests/data/seed_*.yaml are written from the seed's format description; the expected names
below are derived by hand from its patterns (hashes cut to 8, trial numbers padded to 2,
`_N` versions only on sweep, trial, refit and benchmarking runs).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml
from click.testing import CliRunner

from trainkit_tracking import (
    NamingPolicy,
    PolicyError,
    RunSpec,
    TagKeyError,
    TagKeys,
    TagSet,
    training_id,
)
from trainkit_tracking.cli import cli

DATA = Path(__file__).resolve().parent / "data"
SEED_NAMING = DATA / "seed_naming.yaml"
SEED_TAGS = DATA / "seed_tags.yaml"

COMMON: dict[str, Any] = {
    "model": "distilbert-base-uncased",
    "environment": "colab",
    "study_key_hash": "350a79aa9c1e4b2f",
    "trial_key_hash": "7c1d02ab55e0f3a1",
    "trial_number": 5,
}
TRAINING_ID = training_id("ABC123DE4567", "0f9e8d7c6b5a", 2)
# kind, spec fields, version, the name the seed gives
SEED_NAMES = [
    (
        "hpo_sweep",
        {"study_name": "ner study/v2"},
        3,
        "colab_distilbert_base_uncased_hpo_study-350a79aa_nerstudy-v2_3",
    ),
    ("hpo_trial", {}, 1, "colab_distilbert_base_uncased_hpo_trial_study-350a79aa_t05_1"),
    (
        "hpo_trial_fold",
        {"fold_idx": 1},
        1,
        "colab_distilbert_base_uncased_hpo_trial_study-350a79aa_t05_fold1",
    ),
    (
        "hpo_refit",
        {},
        2,
        "colab_distilbert_base_uncased_hpo_refit_study-350a79aa_trial-7c1d02ab_t05_2",
    ),
    (
        "final_training",
        {"spec_fp": "abc123de4567", "exec_fp": "0f9e8d7c6b5a", "variant": 2},
        1,
        "colab_distilbert_base_uncased_final_training_spec-abc123de_exec-0f9e8d7c_v2",
    ),
    (
        "benchmarking",
        {"benchmark_config_hash": "be9c4a1f00d2"},
        1,
        "colab_distilbert_base_uncased_benchmark_study-350a79aa_trial-7c1d02ab_bench-be9c4a1f_1",
    ),
    (
        "conversion",
        {"conv_fp": "c0ffee123456", "parent_training_id": TRAINING_ID},
        1,
        "colab_distilbert_base_uncased_conversion_spec-abc123de_exec-0f9e8d7c_v2_conv-c0ffee12",
    ),
]


@pytest.mark.parametrize(("kind", "fields", "version", "expected"), SEED_NAMES)
def test_seed_naming_file_gives_the_seed_names(
    kind: str, fields: dict[str, Any], version: int, expected: str
) -> None:
    policy = NamingPolicy.from_yaml(SEED_NAMING)
    spec = RunSpec(kind=kind, **{**COMMON, **fields})
    assert policy.render(spec, version=version) == expected


def test_seed_versions_only_where_the_seed_versioned() -> None:
    # final_training and conversion patterns carry {version} in the seed file, unused there.
    policy = NamingPolicy.from_yaml(SEED_NAMING)
    versioned = {
        kind
        for kind, fields, _, _ in SEED_NAMES
        if policy.is_versioned(RunSpec(kind=kind, **{**COMMON, **fields}))
    }
    assert versioned == {"hpo_sweep", "hpo_trial", "hpo_refit", "benchmarking"}


def test_seed_file_with_some_kinds_keeps_the_seeds_for_the_rest(tmp_path: Path) -> None:
    data = yaml.safe_load(SEED_NAMING.read_text(encoding="utf-8"))
    data["run_names"] = {"hpo_trial": data["run_names"]["hpo_trial"]}
    data["run_names"]["hpo_trial"]["pattern"] = "{env}_{model}_trial{trial_number}{version}"
    path = tmp_path / "naming.yaml"
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    policy = NamingPolicy.from_yaml(path)
    trial = RunSpec(kind="hpo_trial", **COMMON)
    assert policy.render(trial, version=1) == "colab_distilbert_base_uncased_trial05_1"
    # The kinds the file leaves out are named as the seed named them, not by the new default.
    assert policy.kinds["hpo_sweep"] == NamingPolicy.seed().kinds["hpo_sweep"]


@pytest.mark.parametrize(
    ("path", "value", "named"),
    [
        (("run_names", "hpo_trial", "components", "study_hash", "length"), 6, "length 6"),
        (("run_names", "hpo_trial", "components", "trial_number", "zero_pad"), 3, "zero_pad 3"),
        (("normalize", "model", "lowercase"), True, "normalize.model.lowercase"),
        (("version", "separator"), "-", "version.separator"),
        (("validate", "max_length"), 100, "validate.max_length"),
    ],
)
def test_seed_settings_we_cannot_render_are_refused(
    tmp_path: Path, path: tuple[str, ...], value: object, named: str
) -> None:
    data = yaml.safe_load(SEED_NAMING.read_text(encoding="utf-8"))
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    file = tmp_path / "naming.yaml"
    file.write_text(yaml.safe_dump(data), encoding="utf-8")
    with pytest.raises(PolicyError, match="differently from the seed") as caught:
        NamingPolicy.from_yaml(file)
    assert named in str(caught.value) and str(file) in str(caught.value)


def test_seed_semantic_suffix_disabled_drops_it(tmp_path: Path) -> None:
    data = yaml.safe_load(SEED_NAMING.read_text(encoding="utf-8"))
    data["run_names"]["hpo_sweep"]["components"]["semantic_suffix"]["enabled"] = False
    file = tmp_path / "naming.yaml"
    file.write_text(yaml.safe_dump(data), encoding="utf-8")
    spec = RunSpec(kind="hpo_sweep", study_name="ner study", **COMMON)
    name = NamingPolicy.from_yaml(file).render(spec, version=1)
    assert name == "colab_distilbert_base_uncased_hpo_study-350a79aa_1"


def test_seed_tags_file_gives_the_seed_keys() -> None:
    keys = TagKeys.from_yaml(SEED_TAGS)
    assert keys == TagKeys.default()
    # grouping.parent_run_id (code.parent_run_id) does not replace MLflow's parent link.
    assert keys["parent_run_id"] == "mlflow.parentRunId"
    assert keys["trial_number"] == "code.hpo.trial_number"  # hpo.trial_number, not legacy's
    assert keys["code_run_type"] == "code.run_type"
    assert keys["run_type"] == "mlflow.runType"
    refit = TagSet.for_spec(RunSpec(kind="hpo_refit", **COMMON), keys)
    assert refit["code.run_type"] == "refit" and refit["mlflow.runType"] == "refit"


def test_seed_tags_file_renames_carry_over(tmp_path: Path) -> None:
    data = yaml.safe_load(SEED_TAGS.read_text(encoding="utf-8"))
    data["process"]["stage"] = "myorg.stage"
    data["mlflow"]["run_type"] = "myorg.runType"
    file = tmp_path / "tags.yaml"
    file.write_text(yaml.safe_dump(data), encoding="utf-8")
    keys = TagKeys.from_yaml(file)
    assert keys["stage"] == "myorg.stage" and keys["run_type"] == "myorg.runType"
    converted = CliRunner().invoke(cli, ["policy", "convert", str(file)])
    assert converted.exit_code == 0, converted.output
    assert yaml.safe_load(converted.stdout) == {"run_type": "myorg.runType", "stage": "myorg.stage"}


def test_policy_convert_writes_our_format(tmp_path: Path) -> None:
    out = tmp_path / "policy.yaml"
    done = CliRunner().invoke(cli, ["policy", "convert", str(SEED_NAMING), "-o", str(out)])
    assert done.exit_code == 0, done.output
    converted = NamingPolicy.from_yaml(out)
    assert converted == NamingPolicy.from_yaml(SEED_NAMING)
    assert "run_names" not in out.read_text(encoding="utf-8")
    for kind, fields, version, expected in SEED_NAMES:
        assert converted.render(RunSpec(kind=kind, **{**COMMON, **fields}), version=version) == (
            expected
        )
    tags = CliRunner().invoke(cli, ["policy", "convert", str(SEED_TAGS)])
    assert tags.exit_code == 0 and yaml.safe_load(tags.stdout) == {}


def test_policy_convert_refuses_what_it_cannot_convert(tmp_path: Path) -> None:
    other = tmp_path / "other.yaml"
    other.write_text("- a\n- b\n", encoding="utf-8")
    done = CliRunner().invoke(cli, ["policy", "convert", str(other)])
    assert done.exit_code == 1 and "nothing to convert" in done.stderr


# Files that are not text, or YAML nested absurdly deep --------------------------------


def test_non_utf8_files_raise_errors_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "latin1.yaml"
    bad.write_bytes("kinds:\n  hpo_sweep: caf\xe9\n".encode("latin-1"))
    with pytest.raises(PolicyError, match="not UTF-8") as policy_error:
        NamingPolicy.from_yaml(bad)
    assert str(bad) in str(policy_error.value)
    with pytest.raises(TagKeyError, match="not UTF-8") as keys_error:
        TagKeys.from_yaml(bad)
    assert str(bad) in str(keys_error.value)
    done = CliRunner().invoke(cli, ["policy", "check", str(bad)])
    assert done.exit_code == 1 and "not UTF-8" in done.stderr


def test_absurdly_deep_yaml_raises_errors_naming_the_file(tmp_path: Path) -> None:
    deep = tmp_path / "deep.yaml"
    deep.write_text("[" * 5000 + "]" * 5000 + "\n", encoding="utf-8")
    with pytest.raises(PolicyError, match="nested too deeply") as policy_error:
        NamingPolicy.from_yaml(deep)
    assert str(deep) in str(policy_error.value)
    with pytest.raises(TagKeyError, match="nested too deeply") as keys_error:
        TagKeys.from_yaml(deep)
    assert str(deep) in str(keys_error.value)


# Partial policies and `policy show` ----------------------------------------------------


def test_extends_default_inherits_the_kinds_not_listed() -> None:
    policy = NamingPolicy.from_dict(
        {"extends": "default", "kinds": {"hpo_trial": {"pattern": "{model}_t{trial_number}"}}}
    )
    default = NamingPolicy.default()
    assert policy.kinds["hpo_trial"].pattern == "{model}_t{trial_number}"
    assert {k: v for k, v in policy.kinds.items() if k.value != "hpo_trial"} == {
        k: v for k, v in default.kinds.items() if k.value != "hpo_trial"
    }
    with pytest.raises(PolicyError, match="extends: default"):
        NamingPolicy.from_dict({"kinds": {"hpo_trial": {"pattern": "{model}"}}})
    with pytest.raises(PolicyError, match="'extends' must be 'default'"):
        NamingPolicy.from_dict({"extends": "mine", "kinds": {}})


def test_policy_show_prints_the_default_policy(tmp_path: Path) -> None:
    done = CliRunner().invoke(cli, ["policy", "show"])
    assert done.exit_code == 0, done.output
    shown = tmp_path / "shown.yaml"
    shown.write_text(done.stdout, encoding="utf-8")
    assert NamingPolicy.from_yaml(shown) == NamingPolicy.default()
    # The copy in the docs is exactly what the command prints.
    docs_copy = Path(__file__).resolve().parents[1] / "docs" / "default-policy.yaml"
    assert docs_copy.read_text(encoding="utf-8") == done.stdout
