"""Run names from a RunSpec: the naming policies of SPEC sections 4 and 18, loadable from a file.

Pure: rendering does no I/O and imports no mlflow; only ``from_yaml`` (and ``from_env``
with a path) reads a file.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from trainkit_tracking._core import env as _env
from trainkit_tracking._core import seed_policy as _seed
from trainkit_tracking._core.patterns import (
    REQUIRED_PLACEHOLDERS,
    check_entry,
    check_pattern,
    missing_kind,
    parse,
    uses,
    validated,
)
from trainkit_tracking._core.presets import DEFAULT_KINDS, PRESETS, SEED_KINDS
from trainkit_tracking._core.redact import redact_value
from trainkit_tracking._core.spec import RunKind, RunSpec, parse_training_id
from trainkit_tracking._core.suggest import did_you_mean
from trainkit_tracking.errors import PolicyError

HASH_LENGTH = 8
RUN_ID_LENGTH = 8
SUFFIX_LENGTH = 30
UNKNOWN = "unknown"
POLICY_FORMAT_VERSION = 1

_TOP_KEYS = ("version", "extends", "kinds")
_SUFFIX_DROP_RE = re.compile(r"[^A-Za-z0-9_-]")


def _normalise(value: str) -> str:
    """Replace ``/``, ``-`` and spaces by ``_`` (for {env} and {model})."""
    return value.replace("/", "_").replace("-", "_").replace(" ", "_")


def _cut_hash(value: str | None) -> str | None:
    return value[:HASH_LENGTH] if value else None


def semantic_suffix(study_name: str | None) -> str:
    """``_<cleaned study name>`` for hpo_sweep names, or ``''`` when nothing is left.

    Spaces are removed, ``/`` becomes ``-``, only ``[A-Za-z0-9_-]`` is kept, and the
    result is cut to 30 characters before the ``_`` prefix.
    """
    if not study_name:
        return ""
    # Masked before it is cleaned: cleaning drops the `=` of `password=X` that masking needs.
    study_name = redact_value(study_name)
    cleaned = _SUFFIX_DROP_RE.sub("", study_name.replace(" ", "").replace("/", "-"))
    cleaned = cleaned[:SUFFIX_LENGTH]
    return f"_{cleaned}" if cleaned else ""


def _spec_values(spec: RunSpec) -> dict[str, str | None]:
    """The spec-derived placeholder values; ``None`` means the component has no value."""
    spec_fp, exec_fp, variant = spec.spec_fp, spec.exec_fp, spec.variant
    if spec.kind is RunKind.CONVERSION and spec.parent_training_id is not None:
        # SPEC 4: a conversion is named after the training it converts.
        try:
            spec_fp, exec_fp, variant = parse_training_id(spec.parent_training_id)
        except ValueError as e:
            raise PolicyError(f"kind 'conversion': {e}") from e
    return {
        "env": _normalise(spec.storage_env),
        "model": _normalise(spec.model),
        "study_hash": _cut_hash(spec.study_key_hash),
        "trial_hash": _cut_hash(spec.trial_key_hash),
        "trial_number": None if spec.trial_number is None else f"{spec.trial_number:02d}",
        "fold_idx": None if spec.fold_idx is None else str(spec.fold_idx),
        "spec_hash": _cut_hash(spec_fp),
        "exec_hash": _cut_hash(exec_fp),
        "variant": str(variant),
        "conv_hash": _cut_hash(spec.conv_fp),
        "bench_hash": _cut_hash(spec.benchmark_config_hash),
        "semantic_suffix": semantic_suffix(spec.study_name),
    }


class KindPattern(BaseModel):
    """The naming rule of one kind: a pattern and an optional fallback pattern."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    pattern: str
    fallback: str | None = None


class NamingPolicy(BaseModel):
    """How runs are named, per kind. Build with ``default()``, ``from_dict`` or ``from_yaml``."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    version: Literal[1] = 1
    kinds: dict[RunKind, KindPattern]

    @model_validator(mode="after")
    def _check(self) -> NamingPolicy:
        # Direct construction gets the same checks as from_dict (wrapped by pydantic).
        for kind in RunKind:
            if kind not in self.kinds:
                raise missing_kind(kind.value)
            entry = self.kinds[kind]
            check_pattern(kind.value, "pattern", entry.pattern)
            if entry.fallback is not None:
                check_pattern(kind.value, "fallback", entry.fallback)
        return self

    # -- loading ---------------------------------------------------------------

    @classmethod
    def default(cls) -> NamingPolicy:
        """The default policy (what ``trainkit-tracking policy show`` prints): names whose
        first 18 characters tell siblings apart (SPEC section 18)."""
        return cls.from_dict({"version": POLICY_FORMAT_VERSION, "kinds": DEFAULT_KINDS})

    @classmethod
    def seed(cls) -> NamingPolicy:
        """The seed training repo's policy (SPEC section 4), the default until 0.2:
        ``{env}_{model}_hpo_trial_study-{study_hash}_t{trial_number}{version}``..."""
        return cls.from_dict({"version": POLICY_FORMAT_VERSION, "kinds": SEED_KINDS})

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NamingPolicy:
        """The policy ``TRAINKIT_NAMING_POLICY`` selects: ``default`` (also when unset),
        ``seed``, or the path of a policy file. A policy as JSON (``{...}``) is accepted
        too: that is how a Tracker hands its policy to the subprocesses it starts.

        Raises PolicyError naming the variable and its value when it is none of these.
        """
        environ = os.environ if environ is None else environ
        raw = environ.get(_env.TRAINKIT_NAMING_POLICY, "").strip()
        if not raw:
            return cls.default()
        if raw.lower() in PRESETS:
            return cls._preset(raw.lower())
        shown = raw if len(raw) <= 200 else f"{raw[:200]}..."
        where = f"environment variable {_env.TRAINKIT_NAMING_POLICY}={shown!r}"
        if not raw.startswith("{"):
            from trainkit_tracking._core.yaml_files import missing_file_hint

            hint = missing_file_hint(raw, extra=PRESETS)
            if hint is not None:
                raise PolicyError(
                    f"{where} is neither 'default', 'seed' nor an existing policy file "
                    f"({hint.rstrip('; ')}); set it to 'default', 'seed' or the path of a "
                    "naming policy YAML file, or unset it"
                )
        try:
            return cls.from_dict(json.loads(raw)) if raw.startswith("{") else cls.from_yaml(raw)
        except ValueError as e:  # PolicyError, or JSON that does not parse
            raise PolicyError(f"{where}: {e}") from e

    @classmethod
    def _preset(cls, name: str) -> NamingPolicy:
        return cls.seed() if name == "seed" else cls.default()

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NamingPolicy:
        """Build a policy from ``{"version": 1, "kinds": {kind: {"pattern", "fallback"}}}``.

        Every kind needs a pattern, unless ``"extends"`` names a built-in policy
        (``"default"`` or ``"seed"``): then the kinds not listed keep its patterns. The
        seed repo's ``config/naming.yaml`` structure (``run_names``) is read too (kinds
        it does not list keep the seed's patterns). Raises PolicyError naming the kind and the
        bad part.
        """
        if not isinstance(data, Mapping):
            raise PolicyError(
                f"a naming policy must be a mapping with 'version' and 'kinds', got {data!r}"
            )

        if _seed.is_seed_naming(data):
            data = _seed.naming_policy_dict(data)
        unknown_keys = sorted(str(k) for k in data if k not in _TOP_KEYS)
        if unknown_keys:
            raise PolicyError(
                f"naming policy has unknown top-level key(s) {unknown_keys!r}; "
                "only 'version', 'extends' and 'kinds' are allowed"
            )
        extends = data.get("extends")
        if extends is not None and extends not in PRESETS:
            hint = did_you_mean(str(extends), PRESETS)
            raise PolicyError(
                f"naming policy 'extends' must be 'default' or 'seed' (or left out), got "
                f"{extends!r}" + (f"; {hint}" if hint else "")
            )
        version = data.get("version", POLICY_FORMAT_VERSION)
        if version != POLICY_FORMAT_VERSION or isinstance(version, bool):
            raise PolicyError(
                f"naming policy version {version!r} is not supported: use 'version: 1'"
            )
        kinds = data.get("kinds")
        if not isinstance(kinds, Mapping):
            raise PolicyError(
                f"naming policy 'kinds' must be a mapping of kind -> {{pattern, fallback}}, "
                f"got {kinds!r}"
            )
        known = {k.value for k in RunKind}
        entries: dict[str, dict[str, Any]] = {}
        for raw_kind, entry in kinds.items():
            kind = raw_kind.value if isinstance(raw_kind, RunKind) else raw_kind
            if kind not in known:
                hint = did_you_mean(str(kind), known)
                raise PolicyError(
                    f"naming policy has an unknown kind {kind!r}; {hint + ' ' if hint else ''}"
                    f"known kinds: {', '.join(k.value for k in RunKind)}"
                )
            entries[kind] = check_entry(kind, entry)
        for kind in RunKind:
            if kind.value not in entries:
                if extends is None:
                    raise missing_kind(kind.value)
                default = PRESETS[extends][kind.value]
                entries[kind.value] = {
                    "pattern": default["pattern"],
                    "fallback": default.get("fallback"),
                }
        return cls(version=POLICY_FORMAT_VERSION, kinds=entries)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> NamingPolicy:
        """Load a policy file (the format of ``from_dict``, as YAML; the seed's naming.yaml too)."""
        from trainkit_tracking._core.yaml_files import load_config

        where = f"naming policy file {os.fspath(path)!r}"
        data = load_config(path, where, PolicyError, "a naming policy is two levels deep")
        try:
            return cls.from_dict(data)
        except PolicyError as e:
            raise PolicyError(f"naming policy file {os.fspath(path)!r}: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        """The policy in the file format of ``from_dict`` (round-trips)."""
        kinds: dict[str, dict[str, str]] = {}
        for kind in RunKind:
            entry = self.kinds[kind]
            kinds[kind.value] = {"pattern": entry.pattern}
            if entry.fallback is not None:
                kinds[kind.value]["fallback"] = entry.fallback
        return {"version": self.version, "kinds": kinds}

    # -- rendering -------------------------------------------------------------

    def pattern_for(self, spec: RunSpec) -> str | None:
        """The pattern that names ``spec`` (main or fallback); ``None`` for an explicit run_name."""
        if spec.run_name is not None:
            return None
        return self._select(spec, _spec_values(spec))

    def is_versioned(self, spec: RunSpec) -> bool:
        """Whether the pattern that names ``spec`` has ``{version}`` (never for a run_name)."""
        pattern = self.pattern_for(spec)
        return pattern is not None and uses(pattern, "version")

    def needs_run_id(self, spec: RunSpec) -> bool:
        """Whether the pattern that names ``spec`` has ``{run_id}`` (rename after creation)."""
        pattern = self.pattern_for(spec)
        return pattern is not None and uses(pattern, "run_id")

    def base_name(self, spec: RunSpec, run_id: str | None = None) -> str:
        """The name without version (``{version}`` renders ``''``). Pure; never versions."""
        return self.render(spec, version=None, run_id=run_id)

    def render(
        self, spec: RunSpec, *, version: int | None = None, run_id: str | None = None
    ) -> str:
        """The full name: ``{version}`` is ``_N`` for ``version=N`` (else ``''``).

        ``{run_id}`` is the first 8 characters of ``run_id``, or ``unknown``. A version
        given for a pattern without ``{version}`` is ignored. An explicit
        ``spec.run_name`` is returned as given. Raises PolicyError when the name is
        longer than 256 characters or contains ``/ \\ : * ? " < > |`` or a control
        character.
        """
        if version is not None and (
            not isinstance(version, int) or isinstance(version, bool) or version < 1
        ):
            raise ValueError(f"version must be an int >= 1 (or None), got {version!r}")
        if spec.run_name is not None:
            return validated(spec.kind.value, spec.run_name, explicit=True)
        values = _spec_values(spec)
        pattern = self._select(spec, values)
        extra = {
            "version": "" if version is None else f"_{version}",
            "run_id": UNKNOWN if not run_id else run_id[:RUN_ID_LENGTH],
        }
        parts: list[str] = []
        for is_placeholder, text in parse(pattern):
            if not is_placeholder:
                parts.append(text)
                continue
            value = extra[text] if text in extra else values[text]
            parts.append(UNKNOWN if value is None else value)
        return validated(spec.kind.value, "".join(parts), explicit=False)

    def _select(self, spec: RunSpec, values: Mapping[str, str | None]) -> str:
        entry = self.kinds[spec.kind]
        if entry.fallback is not None and any(
            is_placeholder and text in REQUIRED_PLACEHOLDERS and values[text] is None
            for is_placeholder, text in parse(entry.pattern)
        ):
            return entry.fallback
        return entry.pattern


def env_value(policy: NamingPolicy) -> str:
    """What ``TRAINKIT_NAMING_POLICY`` says for a subprocess to name runs as ``policy`` does:
    the preset's name, else the policy as JSON (never a path, which the child may not see)."""
    for name in PRESETS:
        if policy == NamingPolicy._preset(name):
            return name
    return json.dumps(policy.to_dict(), separators=(",", ":"))


def renumbered(name: str, base: str, old: int, new: int) -> str | None:
    """``name`` (``base`` rendered with version ``old``) with version ``new`` instead.

    A version renders ``_N`` where the pattern has ``{version}``; the policy is not needed
    to find it again: it is the ``_<old>`` whose removal gives ``base`` (the rightmost,
    should several). None when ``name`` is not ``base`` with that version (renamed by hand).
    """
    mark = f"_{old}"
    if len(name) != len(base) + len(mark):
        return None
    for at in range(len(base), -1, -1):
        if (
            name[:at] == base[:at]
            and name[at:].startswith(mark)
            and name[at + len(mark) :] == base[at:]
        ):
            return f"{base[:at]}_{new}{base[at:]}"
    return None
