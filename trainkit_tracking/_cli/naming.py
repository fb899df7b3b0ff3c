"""The ``name`` and ``policy`` commands' helpers: a RunSpec from options, sample names, YAML.

Errors name the option (``--trial-number``), not the RunSpec field, so users can fix them.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from trainkit_tracking._cli.common import EXIT_USAGE, CliError
from trainkit_tracking._core import seed_policy as _seed
from trainkit_tracking._core.naming import NamingPolicy
from trainkit_tracking._core.spec import REQUIRED_FIELDS, RunKind, RunSpec
from trainkit_tracking._core.tag_keys import TagKeys
from trainkit_tracking.errors import PolicyError

# `name` option -> RunSpec field.
NAME_FIELDS = {
    "study_key_hash": "study_key_hash",
    "study_name": "study_name",
    "trial_key_hash": "trial_key_hash",
    "trial_number": "trial_number",
    "fold_idx": "fold_idx",
    "spec_fp": "spec_fp",
    "exec_fp": "exec_fp",
    "variant": "variant",
    "conv_fp": "conv_fp",
    "parent_training_id": "parent_training_id",
    "benchmark_config_hash": "benchmark_config_hash",
    "env": "environment",
    "storage_env": "storage_env",
}
_OPTIONS = {field: option for option, field in NAME_FIELDS.items()}


def flag(field: str) -> str:
    """The command-line option of a RunSpec field (``environment`` -> ``--env``)."""
    return "--" + _OPTIONS.get(field, field).replace("_", "-")


def spec_error(exc: ValidationError, given: Collection[str]) -> str:
    """One line from a pydantic ValidationError, naming each bad field by its option."""
    parts = []
    for error in exc.errors():
        message = str(error.get("msg", "")).removeprefix("Value error, ")
        loc = [str(p) for p in error.get("loc", ()) if not isinstance(p, int)]
        if loc == ["storage_env"] and "storage_env" not in given:
            continue  # copied from --env, whose own error says it all
        parts.append(f"{flag(loc[0])}: {message}" if loc else message)
    return "invalid spec: " + "; ".join(parts)


def load_policy(given: str | None) -> NamingPolicy:
    """The policy of ``--policy``: a preset name or a file (a missing one gets close names),
    else the one TRAINKIT_NAMING_POLICY selects, as for a Tracker."""
    from trainkit_tracking._core import env as _env
    from trainkit_tracking._core.presets import PRESETS
    from trainkit_tracking._core.yaml_files import missing_file_hint

    if given is None:
        return NamingPolicy.from_env()
    if given.lower() in PRESETS:
        return NamingPolicy.from_env({_env.TRAINKIT_NAMING_POLICY: given})
    hint = missing_file_hint(given, extra=PRESETS)
    if hint is not None:
        raise CliError(f"{hint}pass a naming policy YAML file, 'default' or 'seed'", EXIT_USAGE)
    return NamingPolicy.from_yaml(given)


def build_spec(kind: str, model: str, options: Mapping[str, Any]) -> RunSpec:
    """The RunSpec of the ``name`` options; CliError (exit 2) naming the bad or missing option."""
    run_kind = RunKind(kind.lower())
    data: dict[str, Any] = {"kind": run_kind, "model": model}
    data.update({NAME_FIELDS[k]: v for k, v in options.items() if v is not None})
    missing = [flag(f) for f in REQUIRED_FIELDS.get(run_kind, ()) if f not in data]
    if missing:
        raise CliError(
            f"invalid spec: --kind {run_kind.value} needs {' and '.join(missing)}", EXIT_USAGE
        )
    try:
        return RunSpec(**data)
    except ValidationError as exc:
        raise CliError(spec_error(exc, data), EXIT_USAGE) from exc


# Sample specs for `policy check`: rendering catches what loading cannot (a literal ':').
_BASE: dict[str, Any] = {
    "model": "distilbert-base-uncased",
    "environment": "local",
    "study_key_hash": "350a79aa9c1e4b2f",
    "study_name": "ner study",
    "trial_key_hash": "7c1d02ab55e0f3a1",
    "trial_number": 5,
}
_PER_KIND: dict[RunKind, dict[str, Any]] = {
    RunKind.HPO_SWEEP: {},
    RunKind.HPO_TRIAL: {},
    RunKind.HPO_TRIAL_FOLD: {"fold_idx": 1},
    RunKind.HPO_REFIT: {},
    RunKind.FINAL_TRAINING: {"spec_fp": "abc123de4567", "exec_fp": "0f9e8d7c6b5a", "variant": 2},
    RunKind.BENCHMARKING: {"benchmark_config_hash": "be9c4a1f00d2"},
    RunKind.CONVERSION: {
        "conv_fp": "c0ffee123456",
        "parent_training_id": "spec_abc123de4567_exec_0f9e8d7c6b5a/v2",
    },
}
SAMPLE_RUN_ID = "4634a675293f420d8f6ae72fc55778c6"


def sample_names(policy: NamingPolicy) -> dict[str, str]:
    """kind -> the name ``policy`` gives a typical run of that kind (version 1 where used).

    A kind with a fallback pattern also gets ``"<kind> (fallback)"``, rendered from a spec
    without the optional fields. Raises PolicyError when a name is invalid.
    """
    names: dict[str, str] = {}
    for kind, extra in _PER_KIND.items():
        spec = RunSpec(kind=kind, **{**_BASE, **extra})
        names[kind.value] = policy.render(spec, version=1, run_id=SAMPLE_RUN_ID)
        if policy.kinds[kind].fallback is not None:
            bare = RunSpec(kind=kind, model=_BASE["model"], environment="local")
            if policy.pattern_for(bare) == policy.kinds[kind].fallback:
                names[f"{kind.value} (fallback)"] = policy.render(
                    bare, version=1, run_id=SAMPLE_RUN_ID
                )
    return names


_POLICY_HEADER = """\
# The default naming policy of trainkit-tracking (`trainkit-tracking policy show`).
# Copy this file, edit the patterns, and load it with NamingPolicy.from_yaml(path)
# or check it with `trainkit-tracking policy check FILE`. With `extends: default`,
# list only the kinds you change: the others keep these patterns.
# Placeholders and the fallback rule: the Naming page of the documentation.
"""
SEED_HEADER = """\
# The seed training repo's naming policy (`trainkit-tracking policy show --seed`),
# the default of trainkit-tracking until 0.2: NamingPolicy.seed(). Set
# TRAINKIT_NAMING_POLICY=seed (or Tracker(policy=NamingPolicy.seed())) to keep these
# names; a file with `extends: seed` lists only the kinds it changes.
"""
_FALLBACK_COMMENT = (
    "    # Used when spec_fp or exec_fp is missing; the Tracker renames the run right\n"
    "    # after creation, once its MLflow id is known.\n"
)


def _quoted(text: str) -> str:
    # JSON strings are YAML strings; a pattern starting with '{' must be quoted anyway.
    return json.dumps(text, ensure_ascii=False)


def policy_yaml(policy: NamingPolicy, header: str = _POLICY_HEADER) -> str:
    """``policy`` as a YAML policy file (the format ``NamingPolicy.from_yaml`` reads)."""
    lines = [header.rstrip("\n"), f"version: {policy.version}", "kinds:"]
    for kind, entry in policy.to_dict()["kinds"].items():
        lines.append(f"  {kind}:")
        lines.append(f"    pattern: {_quoted(entry['pattern'])}")
        if "fallback" in entry:
            lines.append(_FALLBACK_COMMENT.rstrip("\n"))
            lines.append(f"    fallback: {_quoted(entry['fallback'])}")
    return "\n".join(lines) + "\n"


def tag_keys_yaml(overrides: Mapping[str, str], source: str) -> str:
    """Tag-key overrides as a YAML file for ``TagKeys.from_yaml``."""
    head = f"# Tag keys converted from {source} by `trainkit-tracking policy convert`.\n"
    if not overrides:
        return head + "# The seed's keys are this SDK's defaults: no overrides are needed.\n{}\n"
    body = "".join(f"{name}: {_quoted(key)}\n" for name, key in sorted(overrides.items()))
    return head + body


def convert_file(path: Path) -> str:
    """Our YAML for a seed ``config/naming.yaml`` or ``config/tags.yaml`` (or one of ours)."""
    import yaml

    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, yaml.YAMLError, RecursionError):
        NamingPolicy.from_yaml(path)  # raises the PolicyError that names the file and why
        raise
    if isinstance(data, Mapping) and ("run_names" in data or "kinds" in data):
        policy = NamingPolicy.from_yaml(path)
        header = f"# Naming policy converted from {path} by `trainkit-tracking policy convert`.\n"
        return policy_yaml(policy, header)
    if _seed.is_seed_tags(data):
        keys = TagKeys.from_yaml(path)
        default = TagKeys.default()
        return tag_keys_yaml({n: k for n, k in keys.items() if default[n] != k}, str(path))
    raise PolicyError(
        f"{str(path)!r} is neither a naming file (with 'run_names' or 'kinds') nor a seed tag "
        "file (sections of name -> tag key); nothing to convert"
    )
