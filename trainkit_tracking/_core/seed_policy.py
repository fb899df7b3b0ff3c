"""The seed training repo's ``config/naming.yaml`` and ``config/tags.yaml``, read into our formats.

Pure: converts parsed YAML. A seed setting that would make the seed name runs differently
from what our policy renders is a PolicyError naming the setting, never a silent change.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from trainkit_tracking.errors import PolicyError, TagKeyError

# Kinds the seed versioned, whatever its patterns contain.
SEED_VERSIONED = frozenset({"hpo_sweep", "hpo_trial", "hpo_refit", "benchmarking"})

_HASHES = {
    "study_hash": "study_key_hash",
    "trial_hash": "trial_key_hash",
    "spec_hash": "spec_fp",
    "exec_hash": "exec_fp",
    "conv_hash": "conv_fp",
    "bench_hash": "benchmark_config_hash",
}
_NUMBERS = {"trial_number": 2, "fold_idx": None, "variant": None}  # placeholder -> zero_pad
# A conversion takes spec, exec and variant from parent_training_id (the seed says so too).
_FROM_TRAINING_ID = frozenset({"spec_hash", "exec_hash", "variant"})
_NORMALISE = {"/": "_", "-": "_", " ": "_"}
_FORBIDDEN = frozenset('/\\:*?"<>|')
_TOP_KEYS = frozenset(
    {"schema_version", "separators", "run_names", "version", "normalize", "validate"}
)


def is_seed_naming(data: object) -> bool:
    """Whether ``data`` is the seed's ``config/naming.yaml`` (it has ``run_names``)."""
    return isinstance(data, Mapping) and "run_names" in data


def is_seed_tags(data: object) -> bool:
    """Whether ``data`` is the seed's ``config/tags.yaml`` (sections of name -> key)."""
    return isinstance(data, Mapping) and (
        "schema_version" in data or any(isinstance(v, Mapping) for v in data.values())
    )


def _fail(where: str, problem: str) -> PolicyError:
    return PolicyError(
        f"seed naming config {where}: {problem}; this SDK would name runs differently from the "
        "seed, so it does not convert it: change the setting or write the policy by hand "
        "(`trainkit-tracking policy show` prints the default to start from)"
    )


def _component(kind: str, name: str, config: Any) -> bool:
    """Check one component against what our placeholder renders; False: drop it from the pattern."""
    where = f"run_names.{kind}.components.{name}"
    if not isinstance(config, Mapping):
        raise _fail(where, f"must be a mapping, got {config!r}")
    source = config.get("source")
    if name in _HASHES:
        allowed = {_HASHES[name]}
        if kind == "conversion" and name in _FROM_TRAINING_ID:
            allowed.add("parent_training_id")
        if source is not None and source not in allowed:
            raise _fail(where, f"source {source!r} is not {' or '.join(sorted(allowed))}")
        if config.get("length", 8) != 8:
            raise _fail(where, f"length {config['length']!r}: hashes are cut to 8 characters")
        if config.get("default", "unknown") != "unknown":
            raise _fail(where, f"default {config['default']!r}: a missing hash renders 'unknown'")
        return True
    if name in _NUMBERS:
        allowed = {name}
        if kind == "conversion" and name in _FROM_TRAINING_ID:
            allowed.add("parent_training_id")
        if source is not None and source not in allowed:
            raise _fail(where, f"source {source!r} is not {' or '.join(sorted(allowed))}")
        if config.get("format", "{number}") != "{number}":
            raise _fail(where, f"format {config['format']!r}: only '{{number}}' is supported")
        pad = config.get("zero_pad")
        expected = _NUMBERS[name]
        if (pad or None) != expected and not (expected is None and pad in (0, 1)):
            raise _fail(
                where,
                f"zero_pad {pad!r}: {name} renders "
                + (f"zero-padded to {expected} digits" if expected else "unpadded"),
            )
        return True
    if name == "semantic_suffix":
        if source is not None and source != "study_name":
            raise _fail(where, f"source {source!r} is not 'study_name'")
        if config.get("default", "") != "":
            raise _fail(where, f"default {config['default']!r}: a missing suffix renders ''")
        if not config.get("enabled", True):
            return False
        if config.get("max_length", 30) != 30:
            raise _fail(where, f"max_length {config['max_length']!r}: the suffix is cut to 30")
        return True
    # Unknown component names surface as unknown placeholders when the pattern is checked.
    return True


def _strip(pattern: str, placeholder: str) -> str:
    return pattern.replace("{" + placeholder + "}", "")


def _check_globals(data: Mapping[str, Any]) -> None:
    unknown = sorted(str(k) for k in data if k not in _TOP_KEYS)
    if unknown:
        raise _fail("top level", f"unknown key(s) {unknown!r}")
    separators = data.get("separators")
    if separators is not None and not isinstance(separators, Mapping):
        raise _fail("separators", f"must be a mapping, got {separators!r}")
    version = data.get("version") or {}
    if not isinstance(version, Mapping):
        raise _fail("version", f"must be a mapping, got {version!r}")
    if version.get("format", "{separator}{number}") != "{separator}{number}":
        raise _fail("version.format", f"{version['format']!r}: versions render as _N")
    if version.get("separator", "_") != "_":
        raise _fail("version.separator", f"{version['separator']!r}: versions render as _N")
    normalize = data.get("normalize") or {}
    if not isinstance(normalize, Mapping):
        raise _fail("normalize", f"must be a mapping, got {normalize!r}")
    for field in ("env", "model"):
        rule = normalize.get(field) or {}
        if not isinstance(rule, Mapping):
            raise _fail(f"normalize.{field}", f"must be a mapping, got {rule!r}")
        replace = rule.get("replace", _NORMALISE)
        if not isinstance(replace, Mapping) or dict(replace) != _NORMALISE:
            raise _fail(f"normalize.{field}.replace", f"{replace!r}: '/', '-', ' ' become '_'")
        if rule.get("lowercase", False):
            raise _fail(f"normalize.{field}.lowercase", "true: names keep the case")
    validate = data.get("validate") or {}
    if not isinstance(validate, Mapping):
        raise _fail("validate", f"must be a mapping, got {validate!r}")
    if validate.get("max_length", 256) != 256:
        raise _fail("validate.max_length", f"{validate['max_length']!r}: names are at most 256")
    forbidden = validate.get("forbidden_chars")
    if forbidden is not None and set(forbidden) != _FORBIDDEN:
        raise _fail("validate.forbidden_chars", f"{forbidden!r}: the forbidden set is fixed")
    # validate.warn_length only warned in the seed; separators were documentation only.


def naming_policy_dict(data: Mapping[str, Any]) -> dict[str, Any]:
    """Our policy format (``{"version", "extends", "kinds"}``) from the seed's naming.yaml.

    Versions stay only on the kinds the seed versioned (sweep, trial, refit, benchmarking);
    kinds the file does not list come from the seed's own policy (``NamingPolicy.seed()``).
    """
    _check_globals(data)
    run_names = data.get("run_names")
    if not isinstance(run_names, Mapping):
        raise _fail(
            "run_names", f"must be a mapping of kind -> {{pattern, components}}, got {run_names!r}"
        )
    kinds: dict[str, dict[str, str]] = {}
    for kind, entry in run_names.items():
        where = f"run_names.{kind}"
        if not isinstance(entry, Mapping) or not isinstance(entry.get("pattern"), str):
            raise _fail(where, f"needs a 'pattern' string, got {entry!r}")
        pattern: str = entry["pattern"]
        components = entry.get("components") or {}
        if not isinstance(components, Mapping):
            raise _fail(f"{where}.components", f"must be a mapping, got {components!r}")
        for name, config in components.items():
            if not _component(str(kind), str(name), config):
                pattern = _strip(pattern, str(name))
        if kind not in SEED_VERSIONED:
            pattern = _strip(pattern, "version")
        kinds[str(kind)] = {"pattern": pattern}
    return {"version": 1, "extends": "seed", "kinds": kinds}


# (section, name) of the seed's tags.yaml -> our logical tag name. Seed names without an
# entry are tags this SDK does not write (or writes under a fixed name, as the Optuna
# integration's best_trial_* tags); they are ignored. grouping.parent_run_id is the
# seed's own code.parent_run_id, not MLflow's parent link (mlflow.parent_run_id).
SEED_TAG_NAMES: dict[tuple[str, str], str] = {
    ("grouping", "study_key_hash"): "study_key_hash",
    ("grouping", "trial_key_hash"): "trial_key_hash",
    ("grouping", "study_family_hash"): "study_family_hash",
    ("grouping", "run_key_hash"): "run_key_hash",
    ("grouping", "group_id"): "group_id",
    ("grouping", "grouping_schema_version"): "grouping_schema_version",
    ("process", "stage"): "stage",
    ("process", "project"): "project",
    ("process", "model"): "model",
    ("process", "run_type"): "code_run_type",
    ("process", "env"): "env",
    ("process", "storage_env"): "storage_env",
    ("process", "execution_platform"): "execution_platform",
    ("process", "created_by"): "created_by",
    ("training", "trained_on_full_data"): "trained_on_full_data",
    ("training", "refit"): "refit",
    ("training", "interrupted"): "interrupted",
    ("hpo", "trial_number"): "trial_number",
    ("lineage", "source"): "lineage_source",
    ("lineage", "hpo_study_key_hash"): "lineage_hpo_study_key_hash",
    ("lineage", "hpo_trial_key_hash"): "lineage_hpo_trial_key_hash",
    ("lineage", "hpo_trial_run_id"): "lineage_hpo_trial_run_id",
    ("lineage", "hpo_refit_run_id"): "lineage_hpo_refit_run_id",
    ("lineage", "hpo_sweep_run_id"): "lineage_hpo_sweep_run_id",
    ("lineage", "parent_training_run_id"): "lineage_parent_training_run_id",
    ("paths", "spec_fp"): "spec_fp",
    ("paths", "exec_fp"): "exec_fp",
    ("paths", "conv_fp"): "conv_fp",
    ("paths", "output_dir"): "output_dir",
    ("paths", "refit_protocol_fp"): "refit_protocol_fp",
    ("azureml", "run_type"): "azureml_run_type",
    ("azureml", "sweep"): "azureml_sweep",
    ("mlflow", "run_type"): "run_type",
    ("mlflow", "parent_run_id"): "parent_run_id",
    ("legacy", "parent_training_id"): "parent_training_id",
    ("legacy", "variant"): "variant",
    ("legacy", "benchmark_config_hash"): "benchmark_config_hash",
}


def tag_key_overrides(data: Mapping[str, Any]) -> dict[str, str]:
    """Our ``TagKeys`` overrides (logical name -> key) from the seed's tags.yaml."""
    overrides: dict[str, str] = {}
    for section, entries in data.items():
        if section == "schema_version":
            continue
        if not isinstance(entries, Mapping):
            raise TagKeyError(
                f"seed tag config section {section!r} must be a mapping of name -> tag key, "
                f"got {entries!r}"
            )
        for name, key in entries.items():
            logical = SEED_TAG_NAMES.get((str(section), str(name)))
            if logical is None:
                continue
            if not isinstance(key, str):
                raise TagKeyError(f"seed tag config {section}.{name} must be a string, got {key!r}")
            overrides[logical] = key
    return overrides
