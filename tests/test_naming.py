"""Tests of the naming policy language on the seed's policy (SPEC section 4): golden names,
loading, validation, properties. The default policy's names: tests/test_readable_names.py."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from trainkit_tracking._core.naming import NamingPolicy, semantic_suffix
from trainkit_tracking._core.patterns import FORBIDDEN_CHARS
from trainkit_tracking.errors import PolicyError
from trainkit_tracking.models import RunKind, RunSpec

DOCS = Path(__file__).resolve().parent.parent / "docs"

STUDY = "350a79aa" + "0" * 56
TRIAL = "7e1f00c2" + "1" * 56
SPEC_FP = "abc123de" + "2" * 56
EXEC_FP = "xyz789ab" + "3" * 56
CONV = "c0ffee12" + "4" * 56
BENCH = "1a2b3c4d" + "5" * 56
RUN_ID = "0f3a9c1e" + "6" * 24

# SPEC section 4's table, copied byte for byte.
SPEC_PATTERNS = {
    "hpo_sweep": "{env}_{model}_hpo_study-{study_hash}{semantic_suffix}{version}",
    "hpo_trial": "{env}_{model}_hpo_trial_study-{study_hash}_t{trial_number}{version}",
    "hpo_trial_fold": "{env}_{model}_hpo_trial_study-{study_hash}_t{trial_number}_fold{fold_idx}",
    "hpo_refit": "{env}_{model}_hpo_refit_study-{study_hash}_trial-{trial_hash}_t{trial_number}{version}",
    "final_training": "{env}_{model}_final_training_spec-{spec_hash}_exec-{exec_hash}_v{variant}",
    "benchmarking": "{env}_{model}_benchmark_study-{study_hash}_trial-{trial_hash}_bench-{bench_hash}{version}",
    "conversion": "{env}_{model}_conversion_spec-{spec_hash}_exec-{exec_hash}_v{variant}_conv-{conv_hash}",
}


def spec(kind: str, model: str = "distilbert", **fields: Any) -> RunSpec:
    fields.setdefault("environment", "local")
    return RunSpec(kind=RunKind(kind), model=model, **fields)


@pytest.fixture
def policy() -> NamingPolicy:
    return NamingPolicy.seed()


# -- the seed's policy -----------------------------------------------------------


def test_seed_policy_is_spec_table_byte_for_byte(policy: NamingPolicy) -> None:
    assert {k.value: v.pattern for k, v in policy.kinds.items()} == SPEC_PATTERNS
    fallbacks = {k.value: v.fallback for k, v in policy.kinds.items() if v.fallback}
    assert fallbacks == {"final_training": "{env}_{model}_training_{run_id}"}


def test_docs_default_policy_file_equals_default() -> None:
    assert NamingPolicy.from_yaml(DOCS / "default-policy.yaml") == NamingPolicy.default()
    assert NamingPolicy.from_yaml(str(DOCS / "default-policy.yaml")) == NamingPolicy.default()


def test_to_dict_round_trips(policy: NamingPolicy) -> None:
    data = policy.to_dict()
    assert data["version"] == 1
    assert NamingPolicy.from_dict(data) == policy


# -- golden names ------------------------------------------------------------------

GOLDEN: list[tuple[RunSpec, int | None, str | None, str]] = [
    # SPEC's examples
    (
        spec("hpo_trial", study_key_hash=STUDY, trial_number=5),
        1,
        None,
        "local_distilbert_hpo_trial_study-350a79aa_t05_1",
    ),
    (
        spec("hpo_trial_fold", study_key_hash=STUDY, trial_number=5, fold_idx=1),
        None,
        None,
        "local_distilbert_hpo_trial_study-350a79aa_t05_fold1",
    ),
    (
        spec(
            "final_training", "distilbert-base-uncased", spec_fp=SPEC_FP, exec_fp=EXEC_FP, variant=2
        ),
        None,
        None,
        "local_distilbert_base_uncased_final_training_spec-abc123de_exec-xyz789ab_v2",
    ),
    # every kind
    (
        spec("hpo_sweep", study_key_hash=STUDY, study_name="ner sweep/v2"),
        None,
        None,
        "local_distilbert_hpo_study-350a79aa_nersweep-v2",
    ),
    (
        spec("hpo_sweep", study_key_hash=STUDY),
        3,
        None,
        "local_distilbert_hpo_study-350a79aa_3",
    ),
    (
        spec("hpo_trial", study_key_hash=STUDY, trial_number=123),
        None,
        None,
        "local_distilbert_hpo_trial_study-350a79aa_t123",
    ),
    (
        spec("hpo_trial", study_key_hash=STUDY, trial_number=0),
        12,
        None,
        "local_distilbert_hpo_trial_study-350a79aa_t00_12",
    ),
    (
        spec("hpo_refit", study_key_hash=STUDY, trial_key_hash=TRIAL, trial_number=7),
        2,
        None,
        "local_distilbert_hpo_refit_study-350a79aa_trial-7e1f00c2_t07_2",
    ),
    (
        spec(
            "benchmarking",
            study_key_hash=STUDY,
            trial_key_hash=TRIAL,
            benchmark_config_hash=BENCH,
        ),
        1,
        None,
        "local_distilbert_benchmark_study-350a79aa_trial-7e1f00c2_bench-1a2b3c4d_1",
    ),
    (
        spec(
            "conversion",
            conv_fp=CONV,
            parent_training_id=f"spec_{SPEC_FP[:8]}00_exec_{'abcdef12'}34/v4",
        ),
        None,
        None,
        "local_distilbert_conversion_spec-abc123de_exec-abcdef12_v4_conv-c0ffee12",
    ),
    # normalisation
    (
        spec("hpo_trial_fold", "deberta-v3/base", study_key_hash=STUDY, trial_number=1, fold_idx=0),
        None,
        None,
        "local_deberta_v3_base_hpo_trial_study-350a79aa_t01_fold0",
    ),
    (
        spec("hpo_trial", "bert large", study_key_hash=STUDY, trial_number=5, storage_env="my-env"),
        None,
        None,
        "my_env_bert_large_hpo_trial_study-350a79aa_t05",
    ),
    # a missing optional component renders unknown
    (
        spec("benchmarking", "bert", benchmark_config_hash=BENCH),
        None,
        None,
        "local_bert_benchmark_study-unknown_trial-unknown_bench-1a2b3c4d",
    ),
    (
        spec("hpo_sweep"),
        None,
        None,
        "local_distilbert_hpo_study-unknown",
    ),
    # fallback with and without run id
    (
        spec("final_training", "distilbert-base-uncased"),
        None,
        RUN_ID,
        "local_distilbert_base_uncased_training_0f3a9c1e",
    ),
    (
        spec("final_training", "distilbert-base-uncased", spec_fp=SPEC_FP),
        None,
        None,
        "local_distilbert_base_uncased_training_unknown",
    ),
]


@pytest.mark.parametrize(("run_spec", "version", "run_id", "expected"), GOLDEN)
def test_golden_names(
    policy: NamingPolicy,
    run_spec: RunSpec,
    version: int | None,
    run_id: str | None,
    expected: str,
) -> None:
    assert policy.render(run_spec, version=version, run_id=run_id) == expected


def test_golden_table_covers_every_kind() -> None:
    assert {s.kind for s, *_ in GOLDEN} == set(RunKind)


def test_base_name_drops_the_version(policy: NamingPolicy) -> None:
    s = spec("hpo_trial", study_key_hash=STUDY, trial_number=5)
    assert policy.base_name(s) == "local_distilbert_hpo_trial_study-350a79aa_t05"
    assert policy.render(s) == policy.base_name(s)
    assert policy.render(s, version=1) == policy.base_name(s) + "_1"


def test_storage_env_not_environment_names_the_run(policy: NamingPolicy) -> None:
    s = spec("hpo_trial", study_key_hash=STUDY, trial_number=5, storage_env="azure-blob")
    assert policy.base_name(s).startswith("azure_blob_distilbert_")


def test_version_ignored_for_unversioned_patterns(policy: NamingPolicy) -> None:
    s = spec("hpo_trial_fold", study_key_hash=STUDY, trial_number=5, fold_idx=1)
    assert policy.render(s, version=4) == "local_distilbert_hpo_trial_study-350a79aa_t05_fold1"


@pytest.mark.parametrize("bad", [0, -1, True])
def test_bad_version_rejected(policy: NamingPolicy, bad: int) -> None:
    with pytest.raises(ValueError, match="version"):
        policy.render(spec("hpo_sweep", study_key_hash=STUDY), version=bad)


@pytest.mark.parametrize(
    "parent",
    [
        "spec_ABC123DE99_exec_FFEE0011AA/v2",
        "spec_abc123de99_exec_ffee0011aa/v2",
        "spec_AbC123dE99_exec_fFeE0011Aa/v2",
    ],
)
def test_conversion_parsed_from_parent_training_id_any_case(
    policy: NamingPolicy, parent: str
) -> None:
    s = spec("conversion", "bert", conv_fp=CONV, parent_training_id=parent)
    assert (
        policy.base_name(s) == "local_bert_conversion_spec-abc123de_exec-ffee0011_v2_conv-c0ffee12"
    )


def test_conversion_ignores_own_spec_fp_and_variant(policy: NamingPolicy) -> None:
    s = spec(
        "conversion",
        "bert",
        conv_fp=CONV,
        parent_training_id="spec_aaaaaaaa_exec_bbbbbbbb/v3",
        spec_fp="cccccccc",
        exec_fp="dddddddd",
        variant=9,
    )
    assert (
        policy.base_name(s) == "local_bert_conversion_spec-aaaaaaaa_exec-bbbbbbbb_v3_conv-c0ffee12"
    )


# -- semantic suffix ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("study_name", "expected"),
    [
        (None, ""),
        ("", ""),
        ("   ", ""),
        ("???", ""),
        ("My Study/v2", "_MyStudy-v2"),
        ("a b/c:d*e", "_ab-cde"),
        ("ok_name-1", "_ok_name-1"),
        ("résumé ner", "_rsumner"),
        ("x" * 40, "_" + "x" * 30),
        ("a b" * 20, "_" + "ab" * 15),
    ],
)
def test_semantic_suffix(study_name: str | None, expected: str) -> None:
    assert semantic_suffix(study_name) == expected


def test_semantic_suffix_in_sweep_name(policy: NamingPolicy) -> None:
    s = spec("hpo_sweep", study_key_hash=STUDY, study_name="???")
    assert policy.render(s, version=2) == "local_distilbert_hpo_study-350a79aa_2"


# -- fallback, run id, explicit names ---------------------------------------------


def test_fallback_selection_and_flags(policy: NamingPolicy) -> None:
    full = spec("final_training", spec_fp=SPEC_FP, exec_fp=EXEC_FP)
    partial = spec("final_training", exec_fp=EXEC_FP)
    assert policy.pattern_for(full) == SPEC_PATTERNS["final_training"]
    assert policy.pattern_for(partial) == "{env}_{model}_training_{run_id}"
    assert not policy.needs_run_id(full)
    assert policy.needs_run_id(partial)
    assert not policy.is_versioned(full)
    assert not policy.is_versioned(partial)
    assert policy.base_name(partial, run_id=RUN_ID) == "local_distilbert_training_0f3a9c1e"
    assert policy.base_name(partial, run_id="short") == "local_distilbert_training_short"


def test_empty_hash_counts_as_missing(policy: NamingPolicy) -> None:
    s = spec("final_training", spec_fp="", exec_fp=EXEC_FP)
    assert policy.base_name(s) == "local_distilbert_training_unknown"


def test_run_id_ignored_by_patterns_without_it(policy: NamingPolicy) -> None:
    s = spec("hpo_trial", study_key_hash=STUDY, trial_number=5)
    assert policy.base_name(s, run_id=RUN_ID) == policy.base_name(s)


@pytest.mark.parametrize(
    ("kind", "versioned"),
    [
        ("hpo_sweep", True),
        ("hpo_trial", True),
        ("hpo_trial_fold", False),
        ("hpo_refit", True),
        ("final_training", False),
        ("benchmarking", True),
        ("conversion", False),
    ],
)
def test_is_versioned_per_kind(policy: NamingPolicy, kind: str, versioned: bool) -> None:
    s = spec(
        kind,
        study_key_hash=STUDY,
        trial_number=1,
        fold_idx=0,
        spec_fp=SPEC_FP,
        exec_fp=EXEC_FP,
        conv_fp=CONV,
        parent_training_id="spec_aa_exec_bb/v1",
    )
    assert policy.is_versioned(s) is versioned
    assert policy.needs_run_id(s) is False


def test_explicit_run_name_wins(policy: NamingPolicy) -> None:
    s = spec("hpo_trial", study_key_hash=STUDY, trial_number=5, run_name="My run 1")
    assert policy.base_name(s) == "My run 1"
    assert policy.render(s, version=3, run_id=RUN_ID) == "My run 1"
    assert policy.is_versioned(s) is False
    assert policy.needs_run_id(s) is False
    assert policy.pattern_for(s) is None
    fallback = spec("final_training", run_name="given")
    assert policy.needs_run_id(fallback) is False
    assert policy.base_name(fallback) == "given"


def test_explicit_run_name_still_validated(policy: NamingPolicy) -> None:
    with pytest.raises(PolicyError, match=r"hpo_sweep.*'a/b'"):
        policy.base_name(spec("hpo_sweep", run_name="a/b"))


# -- validation after rendering ---------------------------------------------------


@pytest.mark.parametrize("char", [*FORBIDDEN_CHARS, "\n", "\x00"])
def test_forbidden_character_in_model(policy: NamingPolicy, char: str) -> None:
    if char == "/":
        # '/' is normalised away, so it is always safe in a model name.
        assert policy.base_name(spec("hpo_sweep", f"a{char}b")) == "local_a_b_hpo_study-unknown"
        return
    with pytest.raises(PolicyError) as info:
        policy.base_name(spec("hpo_sweep", f"a{char}b", study_key_hash=STUDY))
    message = str(info.value)
    assert "'hpo_sweep'" in message
    assert repr(f"local_a{char}b_hpo_study-350a79aa") in message


def test_forbidden_character_in_hash(policy: NamingPolicy) -> None:
    with pytest.raises(PolicyError, match="hpo_trial"):
        policy.base_name(spec("hpo_trial", study_key_hash="ab:cd", trial_number=1))


def test_name_length_limit(policy: NamingPolicy) -> None:
    fixed = len(policy.base_name(spec("hpo_sweep", "m", study_key_hash=STUDY))) - 1
    at_limit = spec("hpo_sweep", "m" * (256 - fixed), study_key_hash=STUDY)
    assert len(policy.base_name(at_limit)) == 256
    over = spec("hpo_sweep", "m" * (257 - fixed), study_key_hash=STUDY)
    with pytest.raises(PolicyError) as info:
        policy.base_name(over)
    assert "'hpo_sweep'" in str(info.value)
    assert "257" in str(info.value)
    assert "m" * 200 in str(info.value)
    # the version counts towards the limit too
    with pytest.raises(PolicyError):
        policy.render(at_limit, version=1)


# -- loading and load-time errors ---------------------------------------------------


def default_dict() -> dict[str, Any]:
    return copy.deepcopy(NamingPolicy.seed().to_dict())


def with_pattern(kind: str, pattern: Any, field: str = "pattern") -> dict[str, Any]:
    data = default_dict()
    data["kinds"][kind][field] = pattern
    return data


def test_custom_policy_from_dict() -> None:
    data = with_pattern("hpo_trial", "{model}-trial{trial_number}{version}")
    policy = NamingPolicy.from_dict(data)
    s = spec("hpo_trial", "deberta-v3", study_key_hash=STUDY, trial_number=3)
    assert policy.render(s, version=2) == "deberta_v3-trial03_2"
    assert policy != NamingPolicy.seed()


def test_custom_fallback_on_another_kind() -> None:
    data = default_dict()
    data["kinds"]["benchmarking"]["fallback"] = "{env}_{model}_bench_{run_id}{version}"
    policy = NamingPolicy.from_dict(data)
    missing = spec("benchmarking", benchmark_config_hash=BENCH)
    assert policy.is_versioned(missing) and policy.needs_run_id(missing)
    assert policy.render(missing, version=1, run_id=RUN_ID) == "local_distilbert_bench_0f3a9c1e_1"
    # the fallback renders its own missing components as unknown
    data["kinds"]["benchmarking"]["fallback"] = "{model}_{study_hash}"
    policy = NamingPolicy.from_dict(data)
    assert policy.base_name(missing) == "distilbert_unknown"


def test_kind_entry_replaces_default_fallback() -> None:
    data = with_pattern("final_training", "{model}_train_{spec_hash}")
    del data["kinds"]["final_training"]["fallback"]
    policy = NamingPolicy.from_dict(data)
    assert policy.base_name(spec("final_training")) == "distilbert_train_unknown"


def test_version_key_optional_but_must_be_1() -> None:
    data = default_dict()
    del data["version"]
    assert NamingPolicy.from_dict(data) == NamingPolicy.seed()
    for bad in (2, "1", True):
        data["version"] = bad
        with pytest.raises(PolicyError, match="version"):
            NamingPolicy.from_dict(data)


@pytest.mark.parametrize(
    ("data", "needles"),
    [
        (with_pattern("hpo_sweep", "{env}_{studyhash}"), ["'hpo_sweep'", "{studyhash}"]),
        (
            with_pattern("final_training", "{env}_{runid}", "fallback"),
            ["'final_training'", "{runid}", "fallback"],
        ),
        (with_pattern("hpo_trial", "{env}_{model"), ["'hpo_trial'", "unbalanced", "'{'"]),
        (with_pattern("hpo_trial", "{env}_model}"), ["'hpo_trial'", "'}'"]),
        (with_pattern("hpo_trial", "{env}_{}"), ["'hpo_trial'", "{}"]),
        (with_pattern("hpo_trial", "{env}_{{model}}"), ["'hpo_trial'"]),
        (with_pattern("hpo_trial", "{trial_number:03d}"), ["'hpo_trial'", "{trial_number:03d}"]),
        (with_pattern("hpo_trial", "{model!r}"), ["'hpo_trial'", "{model!r}"]),
        (with_pattern("hpo_refit", "{env}/{model}"), ["'hpo_refit'", "'/'"]),
        (with_pattern("hpo_refit", ""), ["'hpo_refit'", "empty"]),
        (with_pattern("hpo_refit", 5), ["'hpo_refit'", "5"]),
        (with_pattern("conversion", None), ["'conversion'", "no pattern"]),
        ({"kinds": {**default_dict()["kinds"], "hpo_trail": {"pattern": "x"}}}, ["'hpo_trail'"]),
        (
            {"kinds": {k: v for k, v in default_dict()["kinds"].items() if k != "benchmarking"}},
            ["'benchmarking'", "no pattern"],
        ),
        ({"kinds": {**default_dict()["kinds"], "hpo_sweep": None}}, ["'hpo_sweep'", "no pattern"]),
        (
            {"kinds": {**default_dict()["kinds"], "hpo_sweep": {"fallback": "{model}"}}},
            ["'hpo_sweep'", "no pattern"],
        ),
        (
            {"kinds": {**default_dict()["kinds"], "hpo_sweep": {"patern": "{model}"}}},
            ["'hpo_sweep'", "patern"],
        ),
        ({"kinds": {**default_dict()["kinds"], "hpo_sweep": "{model}"}}, ["'hpo_sweep'"]),
        ({**default_dict(), "extra": 1}, ["extra"]),
        ({"version": 1}, ["kinds"]),
        ([1, 2], ["mapping"]),
    ],
)
def test_load_time_errors(data: Any, needles: list[str]) -> None:
    with pytest.raises(PolicyError) as info:
        NamingPolicy.from_dict(data)
    for needle in needles:
        assert needle in str(info.value)


def test_direct_construction_is_validated_too() -> None:
    from pydantic import ValidationError

    kinds = {k: {"pattern": "{model}"} for k in RunKind}
    assert NamingPolicy(kinds=kinds).base_name(spec("hpo_sweep")) == "distilbert"
    kinds[RunKind.HPO_SWEEP] = {"pattern": "{nope}"}
    with pytest.raises(ValidationError, match="nope"):
        NamingPolicy(kinds=kinds)


def test_policy_is_frozen(policy: NamingPolicy) -> None:
    with pytest.raises(Exception, match="frozen"):
        policy.version = 1  # type: ignore[misc]


def test_from_yaml_errors_name_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "naming.yaml"
    bad.write_text("version: 1\nkinds:\n  hpo_sweep:\n    pattern: '{env}_{oops}'\n")
    with pytest.raises(PolicyError) as info:
        NamingPolicy.from_yaml(bad)
    assert "naming.yaml" in str(info.value) and "{oops}" in str(info.value)

    broken = tmp_path / "broken.yaml"
    broken.write_text("kinds: [unclosed\n")
    with pytest.raises(PolicyError, match=r"broken\.yaml.*not valid YAML"):
        NamingPolicy.from_yaml(broken)

    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    with pytest.raises(PolicyError, match=r"empty\.yaml"):
        NamingPolicy.from_yaml(empty)

    with pytest.raises(FileNotFoundError):
        NamingPolicy.from_yaml(tmp_path / "missing.yaml")


def test_from_yaml_custom_file(tmp_path: Path) -> None:
    text = (DOCS / "default-policy.yaml").read_text()
    text = text.replace(
        '"sweep{version} {study_hash}{semantic_suffix} {model}"', '"{env}_{model}_sweep{version}"'
    )
    path = tmp_path / "custom.yaml"
    path.write_text(text)
    policy = NamingPolicy.from_yaml(path)
    assert policy.render(spec("hpo_sweep", "bert"), version=1) == "local_bert_sweep_1"


# -- properties ---------------------------------------------------------------------

models = st.text(min_size=1, max_size=300)
optional_text = st.none() | st.text(max_size=80)
hashes = st.none() | st.text(max_size=70)


def _check_name(policy: NamingPolicy, run_spec: RunSpec, **kwargs: Any) -> None:
    try:
        name = policy.render(run_spec, **kwargs)
    except PolicyError as e:
        assert run_spec.kind.value in str(e)
        return
    assert 0 < len(name) <= 256
    assert not set(name) & set(FORBIDDEN_CHARS)
    assert all(ord(c) >= 0x20 and ord(c) != 0x7F for c in name)


@settings(max_examples=300, deadline=None)
@given(
    kind=st.sampled_from(list(RunKind)),
    model=models,
    study_name=optional_text,
    study_hash=hashes,
    trial_number=st.integers(min_value=0, max_value=10**6),
    version=st.none() | st.integers(min_value=1, max_value=10**9),
    run_id=st.none() | st.text(max_size=40),
)
def test_rendered_names_are_always_valid_or_policy_error(
    kind: RunKind,
    model: str,
    study_name: str | None,
    study_hash: str | None,
    trial_number: int,
    version: int | None,
    run_id: str | None,
) -> None:
    run_spec = spec(
        kind.value,
        model,
        study_name=study_name,
        study_key_hash=study_hash or "0" * 8,
        trial_number=trial_number,
        fold_idx=trial_number % 10,
        conv_fp="c" * 8,
        parent_training_id="spec_aa_exec_bb/v1",
    )
    _check_name(NamingPolicy.seed(), run_spec, version=version, run_id=run_id)


@settings(max_examples=200, deadline=None)
@given(
    model=st.text(
        alphabet=st.characters(exclude_characters=FORBIDDEN_CHARS[1:], exclude_categories=("Cs",)),
        min_size=1,
    )
)
def test_model_normalisation_makes_names_safe(model: str) -> None:
    # Only '/', '-' and space are rewritten; everything else is kept as given.
    run_spec = spec("hpo_sweep", model, study_key_hash=STUDY)
    try:
        name = NamingPolicy.seed().base_name(run_spec)
    except PolicyError as e:
        assert "hpo_sweep" in str(e)
        too_long = len(f"local_{model}_hpo_study-350a79aa") > 256
        assert too_long or any(ord(c) < 0x20 or ord(c) == 0x7F for c in model)
        return
    expected_model = model.replace("/", "_").replace("-", "_").replace(" ", "_")
    assert name == f"local_{expected_model}_hpo_study-350a79aa"


@settings(max_examples=200, deadline=None)
@given(
    model=models,
    study_name=optional_text,
    trial_number=st.integers(min_value=0, max_value=999),
    run_id=st.none() | st.text(min_size=1, max_size=40),
)
def test_base_name_is_deterministic_and_pure(
    model: str, study_name: str | None, trial_number: int, run_id: str | None
) -> None:
    run_spec = spec(
        "hpo_trial", model, study_name=study_name, study_key_hash=STUDY, trial_number=trial_number
    )
    before = run_spec.model_dump_json()
    first, second = NamingPolicy.seed(), NamingPolicy.seed()
    outcomes = []
    for policy in (first, second, first):
        try:
            outcomes.append(policy.base_name(run_spec, run_id=run_id))
        except PolicyError as e:
            outcomes.append(f"error: {e}")
    assert outcomes[0] == outcomes[1] == outcomes[2]
    assert run_spec.model_dump_json() == before
    assert first == second == NamingPolicy.seed()
    if not outcomes[0].startswith("error"):
        assert not outcomes[0].endswith("_1")
        assert outcomes[0].endswith(f"_t{trial_number:02d}")


@settings(max_examples=200, deadline=None)
@given(study_name=st.text(max_size=100))
def test_semantic_suffix_property(study_name: str) -> None:
    suffix = semantic_suffix(study_name)
    if suffix:
        assert suffix.startswith("_")
        assert 2 <= len(suffix) <= 31
        assert all(c.isascii() and (c.isalnum() or c in "_-") for c in suffix[1:])
    cleaned = "".join(
        c
        for c in study_name.replace(" ", "").replace("/", "-")
        if c.isascii() and (c.isalnum() or c in "_-")
    )
    assert suffix == ("_" + cleaned[:30] if cleaned else "")
