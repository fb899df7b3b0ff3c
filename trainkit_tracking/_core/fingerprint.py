"""Stable fingerprints: SHA-256 of a canonical JSON form, and study/trial key helpers."""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import json
import math
import numbers
from collections.abc import Mapping
from typing import Any

_MAX_DEPTH = 100


def canonical_json(obj: Any) -> str:
    """Return the canonical JSON text of ``obj`` used by :func:`fingerprint`.

    Keys are sorted, separators are ``,`` and ``:``, floats are normalised to 12
    significant digits (``-0.0`` to ``0``; NaN and infinities as the strings
    ``"NaN"``, ``"Infinity"`` and ``"-Infinity"``), strings are kept as given,
    tuples are lists, pydantic models and dataclasses are their fields, enums their
    values. Anything else raises ``TypeError``.
    """
    parts: list[str] = []
    _write(obj, parts, 0)
    return "".join(parts)


def fingerprint(obj: Any, length: int = 64) -> str:
    """Return the SHA-256 hex digest of ``canonical_json(obj)``, cut to ``length``."""
    if not 1 <= length <= 64:
        raise ValueError(f"fingerprint length must be between 1 and 64, got {length!r}")
    digest = hashlib.sha256(canonical_json(obj).encode("utf-8")).hexdigest()
    return digest[:length]


def study_key(model: str, search_space: Any, **settings: Any) -> str:
    """Fingerprint of what defines an HPO study: the model, its search space and settings."""
    return fingerprint({"model": model, "search_space": search_space, "settings": settings})


def trial_key(study_key_hash: str, params: Mapping[str, Any]) -> str:
    """Fingerprint of one trial: its study's key and its hyper-parameters."""
    return fingerprint({"study_key_hash": study_key_hash, "params": dict(params)})


def _float_text(value: float) -> str:
    if math.isnan(value):
        return '"NaN"'
    if math.isinf(value):
        return '"Infinity"' if value > 0 else '"-Infinity"'
    text = format(value, ".12g")
    return "0" if text == "-0" else text


def _write(obj: Any, out: list[str], depth: int) -> None:
    if depth > _MAX_DEPTH:
        raise TypeError("fingerprint: object is nested too deeply (a cycle?)")
    if obj is None:
        out.append("null")
    elif isinstance(obj, bool):
        out.append("true" if obj else "false")
    elif isinstance(obj, enum.Enum):
        _write(obj.value, out, depth + 1)
    elif isinstance(obj, str):
        out.append(json.dumps(obj, ensure_ascii=False))
    elif isinstance(obj, numbers.Integral):
        out.append(str(int(obj)))
    elif isinstance(obj, numbers.Real):
        out.append(_float_text(float(obj)))
    elif isinstance(obj, Mapping):
        _write_mapping(obj, out, depth)
    elif isinstance(obj, (list, tuple)):
        out.append("[")
        for index, item in enumerate(obj):
            if index:
                out.append(",")
            _write(item, out, depth + 1)
        out.append("]")
    elif hasattr(obj, "model_dump") and hasattr(type(obj), "model_fields"):
        _write_mapping(obj.model_dump(mode="python"), out, depth)
    elif dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        fields = {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}
        _write_mapping(fields, out, depth)
    else:
        raise TypeError(
            f"fingerprint: cannot fingerprint {obj!r} of type {type(obj).__name__}; "
            "use dicts, lists, tuples, str, int, float, bool, None, enums, "
            "dataclasses or pydantic models"
        )


def _write_mapping(mapping: Mapping[Any, Any], out: list[str], depth: int) -> None:
    items: dict[str, Any] = {}
    for key, value in mapping.items():
        if isinstance(key, bool) or not isinstance(key, (str, int, enum.Enum)):
            raise TypeError(f"fingerprint: mapping keys must be str or int, got {key!r}")
        text = str(key.value) if isinstance(key, enum.Enum) else str(key)
        if text in items:
            raise TypeError(f"fingerprint: mapping has two keys that render as {text!r}")
        items[text] = value
    out.append("{")
    for index, key in enumerate(sorted(items)):
        if index:
            out.append(",")
        out.append(json.dumps(key, ensure_ascii=False))
        out.append(":")
        _write(items[key], out, depth + 1)
    out.append("}")
