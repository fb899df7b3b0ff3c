"""Run names from a RunSpec: the naming policy of SPEC section 4, loadable from a file.

Pure: rendering does no I/O and imports no mlflow; only ``from_yaml`` reads its file.
"""

from __future__ import annotations

import functools
import os
import re
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, model_validator

from trainkit_tracking.errors import PolicyError
from trainkit_tracking.models import RunKind, RunSpec, parse_training_id

MAX_NAME_LENGTH = 256
FORBIDDEN_CHARS = '/\\:*?"<>|'
HASH_LENGTH = 8
RUN_ID_LENGTH = 8
SUFFIX_LENGTH = 30
UNKNOWN = "unknown"
POLICY_FORMAT_VERSION = 1

# Components that come from optional RunSpec fields. When a kind has a fallback
# pattern and its main pattern uses one of these that has no value, the fallback is
# used; without a fallback the missing component renders as ``unknown``.
REQUIRED_PLACEHOLDERS = frozenset(
    {
        "study_hash",
        "trial_hash",
        "trial_number",
        "fold_idx",
        "spec_hash",
        "exec_hash",
        "conv_hash",
        "bench_hash",
    }
)
# Components that always have a value: never a reason to fall back.
DEFAULTED_PLACEHOLDERS = frozenset(
    {"env", "model", "variant", "semantic_suffix", "version", "run_id"}
)
PLACEHOLDERS = REQUIRED_PLACEHOLDERS | DEFAULTED_PLACEHOLDERS

_DEFAULT_KINDS: dict[str, dict[str, str]] = {
    "hpo_sweep": {
        "pattern": "{env}_{model}_hpo_study-{study_hash}{semantic_suffix}{version}",
    },
    "hpo_trial": {
        "pattern": "{env}_{model}_hpo_trial_study-{study_hash}_t{trial_number}{version}",
    },
    "hpo_trial_fold": {
        "pattern": "{env}_{model}_hpo_trial_study-{study_hash}_t{trial_number}_fold{fold_idx}",
    },
    "hpo_refit": {
        "pattern": (
            "{env}_{model}_hpo_refit_study-{study_hash}_trial-{trial_hash}_t{trial_number}{version}"
        ),
    },
    "final_training": {
        "pattern": "{env}_{model}_final_training_spec-{spec_hash}_exec-{exec_hash}_v{variant}",
        "fallback": "{env}_{model}_training_{run_id}",
    },
    "benchmarking": {
        "pattern": (
            "{env}_{model}_benchmark_study-{study_hash}_trial-{trial_hash}"
            "_bench-{bench_hash}{version}"
        ),
    },
    "conversion": {
        "pattern": (
            "{env}_{model}_conversion_spec-{spec_hash}_exec-{exec_hash}_v{variant}_conv-{conv_hash}"
        ),
    },
}

_PLACEHOLDER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_SUFFIX_DROP_RE = re.compile(r"[^A-Za-z0-9_-]")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_KIND_KEYS = frozenset({"pattern", "fallback"})
_TOP_KEYS = ("version", "extends", "kinds")

# A parsed pattern: (is_placeholder, text) segments in order.
_Segments = tuple[tuple[bool, str], ...]


class _PatternSyntaxError(ValueError):
    """A pattern that cannot be parsed; wrapped into PolicyError with the kind."""


@functools.lru_cache(maxsize=512)
def _parse(pattern: str) -> _Segments:
    """Split ``pattern`` into literal text and ``{name}`` placeholders (names unchecked)."""
    segments: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(pattern):
        open_at = pattern.find("{", pos)
        close_at = pattern.find("}", pos)
        if close_at != -1 and (open_at == -1 or close_at < open_at):
            raise _PatternSyntaxError(f"'}}' without a matching '{{' at position {close_at}")
        if open_at == -1:
            segments.append((False, pattern[pos:]))
            break
        if open_at > pos:
            segments.append((False, pattern[pos:open_at]))
        if close_at == -1:
            raise _PatternSyntaxError(f"unbalanced '{{' at position {open_at}: no closing '}}'")
        name = pattern[open_at + 1 : close_at]
        if "{" in name:
            raise _PatternSyntaxError(f"nested or unbalanced '{{' at position {open_at}")
        if not _PLACEHOLDER_NAME_RE.match(name):
            raise _PatternSyntaxError(
                f"malformed placeholder {pattern[open_at : close_at + 1]!r}: write placeholders "
                "as {name} with no format spec or conversion, e.g. {model}"
            )
        segments.append((True, name))
        pos = close_at + 1
    return tuple(segments)


def _check_pattern(kind: str, field: str, pattern: Any) -> None:
    """Raise PolicyError unless ``pattern`` is a valid pattern for ``kind``."""
    where = f"naming policy kind {kind!r} {field}"
    if not isinstance(pattern, str):
        raise PolicyError(f"{where} must be a string, got {pattern!r}")
    if not pattern:
        raise PolicyError(f"{where} is empty: give a pattern such as '{{env}}_{{model}}_{kind}'")
    try:
        segments = _parse(pattern)
    except _PatternSyntaxError as e:
        raise PolicyError(f"{where} {pattern!r} is malformed: {e}") from e
    for is_placeholder, text in segments:
        if is_placeholder and text not in PLACEHOLDERS:
            raise PolicyError(
                f"{where} {pattern!r} has an unknown placeholder {{{text}}}; "
                f"known placeholders: {', '.join(sorted(PLACEHOLDERS))}"
            )
        if not is_placeholder:
            bad = _bad_chars(text)
            if bad:
                raise PolicyError(
                    f"{where} {pattern!r} has the character(s) {bad!r} that run names may "
                    f"not contain ({FORBIDDEN_CHARS} and control characters): remove them"
                )


def _bad_chars(text: str) -> str:
    """The characters of ``text`` that a run name may not contain, in order, deduplicated."""
    bad = dict.fromkeys(c for c in text if c in FORBIDDEN_CHARS or _CONTROL_RE.match(c))
    return "".join(bad)


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


def _uses(pattern: str, placeholder: str) -> bool:
    return (True, placeholder) in _parse(pattern)


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
                raise _missing_kind(kind.value)
            entry = self.kinds[kind]
            _check_pattern(kind.value, "pattern", entry.pattern)
            if entry.fallback is not None:
                _check_pattern(kind.value, "fallback", entry.fallback)
        return self

    # -- loading ---------------------------------------------------------------

    @classmethod
    def default(cls) -> NamingPolicy:
        """The default policy (what ``trainkit-tracking policy show`` prints)."""
        return cls.from_dict({"version": POLICY_FORMAT_VERSION, "kinds": _DEFAULT_KINDS})

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> NamingPolicy:
        """Build a policy from ``{"version": 1, "kinds": {kind: {"pattern", "fallback"}}}``.

        Every kind needs a pattern, unless ``"extends": "default"`` is given: then the
        kinds not listed keep the default policy's. The seed repo's ``config/naming.yaml``
        structure (``run_names``) is read too. Raises PolicyError naming the kind and the
        bad part.
        """
        if not isinstance(data, Mapping):
            raise PolicyError(
                f"a naming policy must be a mapping with 'version' and 'kinds', got {data!r}"
            )
        from trainkit_tracking import _seed

        if _seed.is_seed_naming(data):
            data = _seed.naming_policy_dict(data)
        unknown_keys = sorted(str(k) for k in data if k not in _TOP_KEYS)
        if unknown_keys:
            raise PolicyError(
                f"naming policy has unknown top-level key(s) {unknown_keys!r}; "
                "only 'version', 'extends' and 'kinds' are allowed"
            )
        extends = data.get("extends")
        if extends not in (None, "default"):
            raise PolicyError(
                f"naming policy 'extends' must be 'default' (or left out), got {extends!r}"
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
                raise PolicyError(
                    f"naming policy has an unknown kind {kind!r}; "
                    f"known kinds: {', '.join(k.value for k in RunKind)}"
                )
            entries[kind] = _check_entry(kind, entry)
        for kind in RunKind:
            if kind.value not in entries:
                if extends != "default":
                    raise _missing_kind(kind.value)
                default = _DEFAULT_KINDS[kind.value]
                entries[kind.value] = {
                    "pattern": default["pattern"],
                    "fallback": default.get("fallback"),
                }
        return cls(version=POLICY_FORMAT_VERSION, kinds=entries)

    @classmethod
    def from_yaml(cls, path: str | os.PathLike[str]) -> NamingPolicy:
        """Load a policy file (the format of ``from_dict``, as YAML; the seed's naming.yaml too)."""
        from trainkit_tracking._yaml import load_config

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
        return pattern is not None and _uses(pattern, "version")

    def needs_run_id(self, spec: RunSpec) -> bool:
        """Whether the pattern that names ``spec`` has ``{run_id}`` (rename after creation)."""
        pattern = self.pattern_for(spec)
        return pattern is not None and _uses(pattern, "run_id")

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
            return _validated(spec.kind.value, spec.run_name, explicit=True)
        values = _spec_values(spec)
        pattern = self._select(spec, values)
        extra = {
            "version": "" if version is None else f"_{version}",
            "run_id": UNKNOWN if not run_id else run_id[:RUN_ID_LENGTH],
        }
        parts: list[str] = []
        for is_placeholder, text in _parse(pattern):
            if not is_placeholder:
                parts.append(text)
                continue
            value = extra[text] if text in extra else values[text]
            parts.append(UNKNOWN if value is None else value)
        return _validated(spec.kind.value, "".join(parts), explicit=False)

    def _select(self, spec: RunSpec, values: Mapping[str, str | None]) -> str:
        entry = self.kinds[spec.kind]
        if entry.fallback is not None and any(
            is_placeholder and text in REQUIRED_PLACEHOLDERS and values[text] is None
            for is_placeholder, text in _parse(entry.pattern)
        ):
            return entry.fallback
        return entry.pattern


def _check_entry(kind: str, entry: Any) -> dict[str, Any]:
    if entry is None:
        raise _missing_kind(kind)
    if not isinstance(entry, Mapping):
        raise PolicyError(
            f"naming policy kind {kind!r} must be a mapping with 'pattern' "
            f"(and optionally 'fallback'), got {entry!r}"
        )
    unknown = sorted(str(k) for k in entry if k not in _KIND_KEYS)
    if unknown:
        raise PolicyError(
            f"naming policy kind {kind!r} has unknown key(s) {unknown!r}; "
            "only 'pattern' and 'fallback' are allowed"
        )
    if entry.get("pattern") is None:
        raise _missing_kind(kind)
    _check_pattern(kind, "pattern", entry["pattern"])
    fallback = entry.get("fallback")
    if fallback is not None:
        _check_pattern(kind, "fallback", fallback)
    return {"pattern": entry["pattern"], "fallback": fallback}


def _missing_kind(kind: str) -> PolicyError:
    return PolicyError(
        f"naming policy kind {kind!r} has no pattern: set kinds.{kind}.pattern, or add "
        "'extends: default' to keep the default's (`trainkit-tracking policy show` prints it)"
    )


def _validated(kind: str, name: str, *, explicit: bool) -> str:
    """Return ``name`` when it is a valid run name, else raise PolicyError."""
    what = "explicit run_name" if explicit else "rendered name"
    shown = name if len(name) <= 300 else f"{name[:300]}..."
    if not name:
        raise PolicyError(f"the {what} for kind {kind!r} is empty: check the policy's pattern")
    if len(name) > MAX_NAME_LENGTH:
        raise PolicyError(
            f"the {what} for kind {kind!r} has {len(name)} characters, more than "
            f"{MAX_NAME_LENGTH}: {shown!r}; shorten the model name or the pattern"
        )
    bad = _bad_chars(name)
    if bad:
        raise PolicyError(
            f"the {what} for kind {kind!r} contains {bad!r}, which run names may not "
            f"contain: {shown!r}; remove {FORBIDDEN_CHARS} and control characters from "
            "the model, hashes or run_name"
        )
    return name
