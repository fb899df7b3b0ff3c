"""The run-name pattern language: ``{placeholder}`` parsing, the checks of a policy's
patterns and entries, and what makes a run name valid (length, forbidden characters)."""

from __future__ import annotations

import functools
import re
from collections.abc import Mapping
from typing import Any

from trainkit_tracking.errors import PolicyError

MAX_NAME_LENGTH = 256
FORBIDDEN_CHARS = '/\\:*?"<>|'

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

_PLACEHOLDER_NAME_RE = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")
_KIND_KEYS = frozenset({"pattern", "fallback"})

# A parsed pattern: (is_placeholder, text) segments in order.
_Segments = tuple[tuple[bool, str], ...]


class PatternSyntaxError(ValueError):
    """A pattern that cannot be parsed; wrapped into PolicyError with the kind."""


@functools.lru_cache(maxsize=512)
def parse(pattern: str) -> _Segments:
    """Split ``pattern`` into literal text and ``{name}`` placeholders (names unchecked)."""
    segments: list[tuple[bool, str]] = []
    pos = 0
    while pos < len(pattern):
        open_at = pattern.find("{", pos)
        close_at = pattern.find("}", pos)
        if close_at != -1 and (open_at == -1 or close_at < open_at):
            raise PatternSyntaxError(f"'}}' without a matching '{{' at position {close_at}")
        if open_at == -1:
            segments.append((False, pattern[pos:]))
            break
        if open_at > pos:
            segments.append((False, pattern[pos:open_at]))
        if close_at == -1:
            raise PatternSyntaxError(f"unbalanced '{{' at position {open_at}: no closing '}}'")
        name = pattern[open_at + 1 : close_at]
        if "{" in name:
            raise PatternSyntaxError(f"nested or unbalanced '{{' at position {open_at}")
        if not _PLACEHOLDER_NAME_RE.match(name):
            raise PatternSyntaxError(
                f"malformed placeholder {pattern[open_at : close_at + 1]!r}: write placeholders "
                "as {name} with no format spec or conversion, e.g. {model}"
            )
        segments.append((True, name))
        pos = close_at + 1
    return tuple(segments)


def check_pattern(kind: str, field: str, pattern: Any) -> None:
    """Raise PolicyError unless ``pattern`` is a valid pattern for ``kind``."""
    where = f"naming policy kind {kind!r} {field}"
    if not isinstance(pattern, str):
        raise PolicyError(f"{where} must be a string, got {pattern!r}")
    if not pattern:
        raise PolicyError(f"{where} is empty: give a pattern such as '{{env}}_{{model}}_{kind}'")
    try:
        segments = parse(pattern)
    except PatternSyntaxError as e:
        raise PolicyError(f"{where} {pattern!r} is malformed: {e}") from e
    for is_placeholder, text in segments:
        if is_placeholder and text not in PLACEHOLDERS:
            raise PolicyError(
                f"{where} {pattern!r} has an unknown placeholder {{{text}}}; "
                f"known placeholders: {', '.join(sorted(PLACEHOLDERS))}"
            )
        if not is_placeholder:
            bad = bad_chars(text)
            if bad:
                raise PolicyError(
                    f"{where} {pattern!r} has the character(s) {bad!r} that run names may "
                    f"not contain ({FORBIDDEN_CHARS} and control characters): remove them"
                )


def bad_chars(text: str) -> str:
    """The characters of ``text`` that a run name may not contain, in order, deduplicated."""
    bad = dict.fromkeys(c for c in text if c in FORBIDDEN_CHARS or _CONTROL_RE.match(c))
    return "".join(bad)


def uses(pattern: str, placeholder: str) -> bool:
    return (True, placeholder) in parse(pattern)


def check_entry(kind: str, entry: Any) -> dict[str, Any]:
    if entry is None:
        raise missing_kind(kind)
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
        raise missing_kind(kind)
    check_pattern(kind, "pattern", entry["pattern"])
    fallback = entry.get("fallback")
    if fallback is not None:
        check_pattern(kind, "fallback", fallback)
    return {"pattern": entry["pattern"], "fallback": fallback}


def missing_kind(kind: str) -> PolicyError:
    return PolicyError(
        f"naming policy kind {kind!r} has no pattern: set kinds.{kind}.pattern, or add "
        "'extends: default' to keep the default's (`trainkit-tracking policy show` prints it)"
    )


def validated(kind: str, name: str, *, explicit: bool) -> str:
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
    bad = bad_chars(name)
    if bad:
        raise PolicyError(
            f"the {what} for kind {kind!r} contains {bad!r}, which run names may not "
            f"contain: {shown!r}; remove {FORBIDDEN_CHARS} and control characters from "
            "the model, hashes or run_name"
        )
    return name
